"""Training loop for the GIFT-SW recipes (and the STE / LoRA baselines).

- Causal-LM loss on packed windows; for chat data the labels of non-assistant tokens are -100.
  ``loss: kd`` replaces the text's next token by the float teacher's next-token distribution (KL to the
  teacher on the same positions): the columns then recover the float model rather than fit the training
  text's domain. The held-out loss is the one that trains (KL to the teacher with kd).
- AdamW (paper defaults: lr 1e-4, weight decay 0), warmup over ``warmup_ratio`` of the steps, then
  linear decay to 0 (the method's schedule; ``cosine`` or ``constant`` on request), from transformers'
  ``get_scheduler``; gradient accumulation, bf16 autocast on CUDA, fp32 on CPU.
- Only parameters with ``requires_grad`` train; everything else is frozen.
- Checkpoints every ``save_every`` steps into ``work_dir`` (:mod:`gift_quant.train.state`).
- Held-out split: ``val`` windows (from the training corpus) are scored every ``eval_every`` steps;
  the best tensors are kept, and training stops early after ``patience`` evaluations without
  improvement.
- Multi-GPU: under ``accelerate launch`` the model is wrapped by accelerate (DDP); each rank takes its
  own slice of every global batch and its own noise seeds; rank 0 writes checkpoints.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gift_quant.errors import GiftError
from gift_quant.train.dist import accelerator, ddp
from gift_quant.train.settings import TrainReport, TrainSettings
from gift_quant.train.state import load_state, save_state


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


SCALE_LR_FACTOR = 10  # scale factors start at 1, FP16 columns near 0.05: Adam's per-step move is lr for both

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


def batch_rows(step: int, micro: int, n: int, s: TrainSettings, rank: int = 0, world: int = 1,
               seed: int = 0) -> torch.Tensor:
    """Row indices of this rank's micro-batch: epochs are seeded permutations of the n windows."""
    per_step = s.batch_size * s.grad_accum * world
    start = step * per_step + (micro * world + rank) * s.batch_size
    pos = torch.arange(start, start + s.batch_size)
    epochs = pos // n
    out = torch.empty_like(pos)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + e))
        sel = epochs == e
        out[sel] = perm[pos[sel] % n]
    return out


@torch.no_grad()
def val_loss(model, val: torch.Tensor, labels: torch.Tensor | None, batch_size: int, device, teacher=None) -> float:
    """Held-out loss per scored token: the objective that trains (cross-entropy, or KL to ``teacher``)."""
    was = model.training
    model.eval()
    tot, cnt = 0.0, 0
    for i in range(0, val.shape[0], batch_size):
        ids = val[i:i + batch_size].to(device)
        lab = ids if labels is None else labels[i:i + batch_size].to(device)
        n = int((lab[:, 1:] != -100).sum())
        tot += float(_loss(model, teacher, ids, lab, device)) * n
        cnt += n
    model.train(was)
    return tot / max(cnt, 1)


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the scored positions (those whose next label is not -100) of KL(teacher || student)."""
    mask = labels[:, 1:] != -100
    s = torch.log_softmax(logits[:, :-1][mask].float(), -1)
    t = torch.log_softmax(teacher_logits[:, :-1][mask].float(), -1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum") / max(int(mask.sum()), 1)


def _loss(run_model, teacher, ids, lab, device):
    with _autocast(device):
        if teacher is None:
            return run_model(input_ids=ids, labels=lab, use_cache=False).loss
        with torch.no_grad():
            t = teacher(input_ids=ids, use_cache=False).logits
        out = run_model(input_ids=ids, use_cache=False).logits
    return kd_loss(out, t, lab)


def _autocast(device):
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train(model, windows: torch.Tensor, settings: TrainSettings, work_dir=None, resume: bool = False,
          labels: torch.Tensor | None = None, val: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
          recipe_fingerprint: str = "", device=None, log=None, seed: int = 0, teacher=None) -> TrainReport:
    """Train the parameters of ``model`` that require grad on ``windows`` [N, T] (token ids); ``seed`` fixes
    the data order and the noise. ``teacher``: the float model, required by ``loss: kd``."""
    s = settings
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise GiftError("no training windows: the training text is empty or shorter than one sequence")
    if s.steps < 1:
        raise GiftError(f"steps must be >= 1, got {s.steps}")
    if s.batch_size < 1 or s.grad_accum < 1:
        raise GiftError("batch size and grad accumulation must be >= 1")
    device = torch.device(device or next(model.parameters()).device)
    if s.loss == "kd":
        if teacher is None:
            raise GiftError("loss kd needs the float model as teacher")
        # on CUDA it runs under bf16 autocast anyway: store it in bf16 (half the memory)
        teacher = teacher.to(device, torch.bfloat16 if device.type == "cuda" else None).eval()
    else:
        teacher = None  # ce never reads it: do not move it to the device
    names = trainable(model)
    if not names:
        raise GiftError("nothing to train: no parameter requires grad")
    rep = TrainReport(trainable_params=sum(p.numel() for _, p in names))
    acc = accelerator(cpu=device.type == "cpu")  # --device cpu trains on CPU (gloo) even beside GPUs
    world, rank = (acc.num_processes, acc.process_index) if acc else (1, 0)
    main = rank == 0
    if acc and device.type == acc.device.type:
        device = acc.device  # this rank's own GPU (cuda:LOCAL_RANK), not cuda:0 for every rank
    scale_params = [p for n_, p in names if n_.endswith("scale_mult")]  # relative factors: their own lr
    groups = [{"params": [p for n_, p in names if not n_.endswith("scale_mult")]}]
    if scale_params:
        # no weight decay: AdamW decays towards 0, and a factor's neutral value is 1
        groups.append({"params": scale_params, "lr": s.scale_lr or SCALE_LR_FACTOR * s.lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.999))
    run_model = ddp(acc, model.to(device)) if acc else model
    work_dir = Path(work_dir) if work_dir else None

    start, best = 0, None
    if resume and work_dir is not None:
        start, best = load_state(work_dir, recipe_fingerprint, names, opt, rep)
    # evaluations since the best one: patience counts on across a resume as without one
    bad_evals = sum(1 for st, _ in rep.val_losses if rep.best_step is not None and st > rep.best_step)

    def save(step):
        if work_dir is not None and main:
            save_state(work_dir, step, names, opt, best, rep, recipe_fingerprint, s)

    sched = make_scheduler(opt, s, start)
    n = windows.shape[0]
    tokens_per_step = s.batch_size * s.grad_accum * world * windows.shape[1]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_model.train()
    times = []
    bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc="train", unit="step",
               disable=not (s.progress and main))
    for step in bar:
        t0 = time.time()
        torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)  # noise seeds: a function of (seed, step, rank)
        loss_sum = 0.0
        for micro in range(s.grad_accum):
            rows = batch_rows(step, micro, n, s, rank, world, seed)
            ids = windows[rows].to(device)
            lab = ids if labels is None else labels[rows].to(device)
            ctx = acc.no_sync(run_model) if (acc and micro < s.grad_accum - 1) else contextlib.nullcontext()
            with ctx:
                loss = _loss(run_model, teacher, ids, lab, device) / s.grad_accum
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
            vl = val_loss(run_model, val, val_labels, s.batch_size, device, teacher)
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


def _rss_peak_mb() -> float:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:  # pragma: no cover
        return 0.0
