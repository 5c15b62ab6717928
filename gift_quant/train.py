"""Training loop for the GIFT-SW recipes (and the STE / LoRA baselines).

- Causal-LM loss on packed windows; for chat data the labels of non-assistant tokens are -100.
- AdamW (paper defaults: lr 1e-4, weight decay 0), warmup over ``warmup_ratio`` of the steps, then
  linear decay to 0 (the method's schedule; ``cosine`` or ``constant`` on request), from transformers'
  ``get_scheduler``; gradient accumulation, bf16 autocast on CUDA, fp32 on CPU.
- Only parameters with ``requires_grad`` train; everything else is frozen.
- Checkpoints every ``save_every`` steps into ``work_dir`` (safetensors only, no pickle): trainable
  tensors, AdamW moments, the best-so-far tensors, and a JSON with step, losses and a fingerprint of
  model + recipe. ``resume=True`` continues bit-identically: the data order and the noise seeds are
  functions of (seed, step), so nothing else has to be restored. A checkpoint from a different model
  or recipe is refused with a one-line :class:`GiftError`.
- Held-out split: ``val`` windows (from the training corpus) are scored every ``eval_every`` steps;
  the best tensors are kept, and training stops early after ``patience`` evaluations without
  improvement.
- Multi-GPU: under ``accelerate launch`` the model is wrapped by accelerate (DDP); each rank takes its
  own slice of every global batch and its own noise seeds; rank 0 writes checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .errors import GiftError

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"


@dataclass
class TrainSettings:
    steps: int = 100
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    schedule: str = "linear"       # after warmup: linear (decay to 0) | cosine | constant
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_every: int = 0            # 0: only at the end
    eval_every: int = 0            # 0: never (then no best-by-val selection)
    patience: int = 0              # evaluations without improvement before stopping (0: never stop early)
    progress: bool = True


@dataclass
class TrainReport:
    steps_done: int = 0
    losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)   # (step, loss)
    best_step: int | None = None
    best_val: float | None = None
    step_seconds: float = 0.0      # median wall time of one optimizer step
    tokens_per_second: float = 0.0
    peak_memory_mb: float = 0.0
    trainable_params: int = 0
    resumed_from: int | None = None
    stopped_early: bool = False

    def to_dict(self):
        d = asdict(self)
        d["losses"] = [round(x, 4) for x in self.losses]
        return d


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def fingerprint(model, recipe: dict) -> str:
    """Hash of the model architecture, a sample of its frozen weights, and the training recipe."""
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "_name_or_path", "transformers_version",
                                                     "dtype", "torch_dtype")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(json.dumps(recipe, sort_keys=True, default=str).encode())
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        h.update(emb.detach().float()[:8].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def warmup_steps(s: TrainSettings) -> int:
    return max(1, int(math.ceil(s.warmup_ratio * s.steps))) if s.warmup_ratio > 0 else 0


def make_scheduler(opt, s: TrainSettings, start: int = 0):
    """transformers' scheduler for ``s.schedule``, advanced to step ``start`` (for resume)."""
    from transformers import get_scheduler
    if s.schedule not in SCHEDULES:
        raise GiftError(f"schedule must be one of {', '.join(SCHEDULES)}, got {s.schedule!r}")
    sched = get_scheduler(SCHEDULES[s.schedule], opt, num_warmup_steps=warmup_steps(s), num_training_steps=s.steps)
    with warnings.catch_warnings():  # replaying steps without optimizer steps is intended here
        warnings.simplefilter("ignore")
        for _ in range(start):
            sched.step()
    return sched


def batch_rows(step: int, micro: int, n: int, s: TrainSettings, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Row indices of this rank's micro-batch: epochs are seeded permutations of the n windows."""
    per_step = s.batch_size * s.grad_accum * world
    start = step * per_step + (micro * world + rank) * s.batch_size
    pos = torch.arange(start, start + s.batch_size)
    epochs = pos // n
    out = torch.empty_like(pos)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed * 7919 + e))
        sel = epochs == e
        out[sel] = perm[pos[sel] % n]
    return out


def _atomic_save(tensors: dict, meta: dict, work_dir: Path):
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp_t = work_dir / f".{STATE_TENSORS}.tmp{os.getpid()}"
    tmp_j = work_dir / f".{STATE_JSON}.tmp{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp_t))
    tmp_j.write_text(json.dumps(meta, indent=1))
    for f in (tmp_t, tmp_j):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp_t, work_dir / STATE_TENSORS)  # tensors first: the JSON names the step they belong to
    os.replace(tmp_j, work_dir / STATE_JSON)


def _opt_tensors(opt, names) -> dict:
    out = {}
    for i, (n, _) in enumerate(names):
        st = opt.state.get(opt.param_groups[0]["params"][i], {})
        for k, v in st.items():
            out[f"opt.{n}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_opt(opt, names, tensors):
    params = opt.param_groups[0]["params"]
    for i, (n, _) in enumerate(names):
        st = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{n}.") and
              k[len(f"opt.{n}."):].count(".") == 0}
        if st:
            p = params[i]
            opt.state[p] = {k: (v.to(p.device) if k != "step" else v.to(torch.float32)) for k, v in st.items()}


def read_state(work_dir) -> dict | None:
    f = Path(work_dir) / STATE_JSON
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        raise GiftError(f"training checkpoint {f} is unreadable; delete {work_dir} to start over") from None


def dist_rank() -> tuple[int, int]:
    """(rank, world size) of this process under ``accelerate launch`` / torchrun; (0, 1) otherwise.
    Read from the launcher's environment, so it works before any process group exists."""
    return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    return dist_rank()[0] == 0


def _accelerator(cpu: bool = False):
    if dist_rank()[1] <= 1:
        return None
    try:
        from accelerate import Accelerator
    except ImportError:
        raise GiftError("multi-process training needs `pip install accelerate`") from None
    return Accelerator(cpu=cpu)


def _ddp(acc, model):
    """DDP via accelerate. Its construction broadcasts parameters and buffers from rank 0 once, so every
    rank trains on identical frozen weights; after that the frozen buffers (dense base, codes, noise
    scales: the whole model) are not re-sent on every forward, as DDP's default would do."""
    run_model = acc.prepare_model(model)
    if hasattr(run_model, "broadcast_buffers"):  # older torch: an attribute; newer: forward_sync_buffers
        run_model.broadcast_buffers = False
    return run_model


@torch.no_grad()
def val_loss(model, val: torch.Tensor, labels: torch.Tensor | None, batch_size: int, device) -> float:
    was = model.training
    model.eval()
    tot, cnt = 0.0, 0
    for i in range(0, val.shape[0], batch_size):
        ids = val[i:i + batch_size].to(device)
        lab = ids if labels is None else labels[i:i + batch_size].to(device)
        with _autocast(device):
            out = model(input_ids=ids, labels=lab, use_cache=False)
        n = int((lab[:, 1:] != -100).sum())
        tot += float(out.loss) * n
        cnt += n
    model.train(was)
    return tot / max(cnt, 1)


def _autocast(device):
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train(model, windows: torch.Tensor, settings: TrainSettings, work_dir=None, resume: bool = False,
          labels: torch.Tensor | None = None, val: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
          recipe_fingerprint: str = "", device=None, log=None) -> TrainReport:
    """Train the parameters of ``model`` that require grad on ``windows`` [N, T] (token ids)."""
    s = settings
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise GiftError("no training windows: the training text is empty or shorter than one sequence")
    if s.steps < 1:
        raise GiftError(f"steps must be >= 1, got {s.steps}")
    if s.batch_size < 1 or s.grad_accum < 1:
        raise GiftError("batch size and grad accumulation must be >= 1")
    device = torch.device(device or next(model.parameters()).device)
    names = trainable(model)
    if not names:
        raise GiftError("nothing to train: no parameter requires grad")
    rep = TrainReport(trainable_params=sum(p.numel() for _, p in names))
    acc = _accelerator(cpu=device.type == "cpu")  # --device cpu trains on CPU (gloo) even beside GPUs
    world, rank = (acc.num_processes, acc.process_index) if acc else (1, 0)
    main = rank == 0
    if acc and device.type == acc.device.type:
        device = acc.device  # this rank's own GPU (cuda:LOCAL_RANK), not cuda:0 for every rank
    opt = torch.optim.AdamW([p for _, p in names], lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.999))
    run_model = _ddp(acc, model.to(device)) if acc else model
    work_dir = Path(work_dir) if work_dir else None

    start, best = 0, None
    if resume and work_dir is not None:
        meta = read_state(work_dir)
        if meta is not None:
            if meta.get("fingerprint") != recipe_fingerprint:
                raise GiftError(f"cannot resume from {work_dir}: it was written for a different model or recipe "
                                f"(fingerprint {meta.get('fingerprint')} != {recipe_fingerprint}); delete it or change --output")
            t = load_file(str(work_dir / STATE_TENSORS))
            with torch.no_grad():
                for n, p in names:
                    if f"param.{n}" not in t:
                        raise GiftError(f"cannot resume from {work_dir}: tensor {n} is missing")
                    p.copy_(t[f"param.{n}"].to(p.device, p.dtype))
            _load_opt(opt, names, t)
            if any(k.startswith("best.") for k in t):
                best = {n: t[f"best.{n}"] for n, _ in names}
            start = int(meta["step"])
            rep.losses = list(meta.get("losses", []))
            rep.val_losses = [tuple(x) for x in meta.get("val_losses", [])]
            rep.best_step, rep.best_val = meta.get("best_step"), meta.get("best_val")
            rep.resumed_from = start

    def save(step):
        if work_dir is None or not main:
            return
        tensors = {f"param.{n}": p for n, p in names}
        tensors.update(_opt_tensors(opt, names))
        if best is not None:
            tensors.update({f"best.{n}": v for n, v in best.items()})
        _atomic_save(tensors, {"step": step, "fingerprint": recipe_fingerprint, "losses": rep.losses,
                               "val_losses": rep.val_losses, "best_step": rep.best_step, "best_val": rep.best_val,
                               "settings": asdict(s)}, work_dir)

    sched = make_scheduler(opt, s, start)
    n = windows.shape[0]
    tokens_per_step = s.batch_size * s.grad_accum * world * windows.shape[1]
    bad_evals = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_model.train()
    times = []
    bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc="train", unit="step",
               disable=not (s.progress and main))
    for step in bar:
        t0 = time.time()
        torch.manual_seed((s.seed * 1_000_003 + step) * 1_009 + rank)  # noise seeds: a function of (seed, step, rank)
        loss_sum = 0.0
        for micro in range(s.grad_accum):
            rows = batch_rows(step, micro, n, s, rank, world)
            ids = windows[rows].to(device)
            lab = ids if labels is None else labels[rows].to(device)
            ctx = acc.no_sync(run_model) if (acc and micro < s.grad_accum - 1) else _null()
            with ctx:
                with _autocast(device):
                    out = run_model(input_ids=ids, labels=lab, use_cache=False)
                loss = out.loss / s.grad_accum
                if not torch.isfinite(loss):
                    raise GiftError(f"training diverged at step {step} (loss is {float(loss)}); lower the lr")
                loss.backward()
            loss_sum += float(loss.detach())
        if s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in names], s.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rep.losses.append(loss_sum)
        dt = time.time() - t0
        times.append(dt)
        done = step + 1
        if s.progress:
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_step / dt:.0f}")
        if val is not None and s.eval_every and (done % s.eval_every == 0 or done == s.steps):
            vl = val_loss(run_model, val, val_labels, s.batch_size, device)
            rep.val_losses.append((done, vl))
            if log:
                log(f"step {done}: train loss {loss_sum:.4f}, held-out loss {vl:.4f}")
            if rep.best_val is None or vl < rep.best_val:
                rep.best_val, rep.best_step, bad_evals = vl, done, 0
                best = {n_: p.detach().cpu().clone() for n_, p in names}
            else:
                bad_evals += 1
            run_model.train()
        if work_dir is not None and ((s.save_every and done % s.save_every == 0) or done == s.steps):
            save(done)
        if s.patience and bad_evals >= s.patience:
            rep.stopped_early = True
            if log:
                log(f"early stop at step {done}: no held-out improvement in {s.patience} evaluations")
            break
    rep.steps_done = (rep.resumed_from or 0) + len(times)
    if best is not None:  # best-by-held-out-loss
        with torch.no_grad():
            for n_, p in names:
                p.copy_(best[n_].to(p.device, p.dtype))
    model.eval()
    if times:
        rep.step_seconds = sorted(times)[len(times) // 2]
        rep.tokens_per_second = tokens_per_step / rep.step_seconds
    if device.type == "cuda":
        rep.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        rep.peak_memory_mb = _rss_peak_mb()
    return rep


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _rss_peak_mb() -> float:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:  # pragma: no cover
        return 0.0
