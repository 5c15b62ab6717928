"""Declarative recipes (YAML) and their orchestration.

A recipe is a flat YAML mapping of the fields in :data:`FIELDS` plus optional ``cpu:`` / ``gpu:``
mappings of overrides applied on that kind of machine (so one recipe has a CPU budget and a full GPU
budget). Built-ins live in ``gift_quant/recipes/*.yaml`` (shipped as package data; ``recipes/`` in the
repository points there): ``--recipe post`` loads ``post.yaml``, ``--recipe path.yaml`` a custom file.
CLI flags override YAML fields. Unknown keys or wrong types are a one-line :class:`GiftError`.

Methods (``recipe:`` field):
- ``none``: GPTQ + FP16 salient columns, no training.
- ``post``: select, GPTQ, then train the FP16 columns on the frozen codes (no noise by default, as the
  method's public code does; opt-in noise has sigma = half each group's stored scale), write them back.
- ``pre``: select on the FP model, train the FP16 columns with noise on the FP base (sigma = half the step
  the run's own quantizer fits per group), then GPTQ with the trained columns kept FP16 (they receive
  GPTQ's OWQ-style error compensation like any FP column).
- ``ste`` / ``lora``: baselines (:mod:`gift_quant.baselines`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from importlib import resources
from pathlib import Path

import torch

from .errors import GiftError

METHODS = ("none", "pre", "post", "ste", "lora")
_NONE = type(None)
# field: (accepted types, default)
FIELDS: dict[str, tuple[tuple, object]] = {
    "recipe": ((str,), "post"),
    "description": ((str,), ""),
    "bits": ((int,), 2),
    "group_size": ((int,), 128),
    "sym": ((bool,), False),
    "desc_act": ((bool,), True),
    "method": ((str,), "gptq"),
    "metric": ((str,), "gift"),
    "n_salient": ((int, _NONE), 128),
    "salient_ratio": ((float, int, _NONE), 1 / 32),
    "calib_dataset": ((str, _NONE), "bundled"),
    "calib_samples": ((int,), 32),
    "calib_seq_len": ((int,), 512),
    "train_dataset": ((str,), "train"),
    "seq_len": ((int,), 256),
    "batch_size": ((int,), 4),
    "grad_accum": ((int,), 1),
    "steps": ((int,), 60),
    "lr": ((float, int), 1e-4),
    "warmup_ratio": ((float, int), 0.03),
    "weight_decay": ((float, int), 0.0),
    "schedule": ((str,), "linear"),
    "max_grad_norm": ((float, int, _NONE), 1.0),
    "noise": ((str,), "gaussian"),
    "noise_bits": ((int, _NONE), None),
    "val_windows": ((int,), 4),
    "eval_every": ((int,), 0),
    "patience": ((int,), 0),
    "save_every": ((int,), 10),
    "max_train_tokens": ((int, _NONE), None),
    "lora_rank": ((int, _NONE), None),
    "seed": ((int,), 0),
}
OVERRIDE_SECTIONS = ("cpu", "gpu")


class Recipe:
    def __init__(self, **kw):
        for k, (_, default) in FIELDS.items():
            setattr(self, k, kw.get(k, default))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in FIELDS}

    def training_fields(self) -> dict:
        """What a training checkpoint must agree on to be resumed (everything but logging cadence)."""
        skip = ("description", "save_every")
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    def compression_fields(self) -> dict:
        """What the cached compressed stage must agree on."""
        keys = ("bits", "group_size", "sym", "desc_act", "method", "metric", "n_salient", "salient_ratio",
                "calib_dataset", "calib_samples", "calib_seq_len", "seed")
        return {k: getattr(self, k) for k in keys}

    def gift_config(self):
        from .config import GiftConfig
        return GiftConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=self.desc_act,
                          method=self.method, metric=self.metric, n_salient=self.n_salient,
                          salient_ratio=self.salient_ratio, recipe=self.recipe, dataset=self.calib_dataset,
                          calib_samples=self.calib_samples, seq_len=self.calib_seq_len, seed=self.seed)

    def train_settings(self, progress=True):
        from .train import TrainSettings
        return TrainSettings(steps=self.steps, lr=float(self.lr), warmup_ratio=float(self.warmup_ratio),
                             weight_decay=float(self.weight_decay), schedule=self.schedule,
                             batch_size=self.batch_size, grad_accum=self.grad_accum,
                             max_grad_norm=self.max_grad_norm, seed=self.seed, save_every=self.save_every,
                             eval_every=self.eval_every, patience=self.patience, progress=progress)


def _check(key: str, value, where: str):
    if key not in FIELDS:
        raise GiftError(f"{where}: unknown recipe key {key!r} (known: {', '.join(sorted(FIELDS))})")
    types = FIELDS[key][0]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = "/".join("null" if t is _NONE else t.__name__ for t in types)
        hint = ""
        if float in types and isinstance(value, str):
            try:
                float(value)
                hint = " (YAML reads a number like 1e-4 as text: write 1.0e-4)"
            except ValueError:
                pass
        raise GiftError(f"{where}: recipe key {key!r} must be {names}, got {value!r}{hint}")


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("gift_quant").joinpath("recipes").iterdir()
                  if p.name.endswith(".yaml"))


def _unique_key_loader():
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: left to PyYAML's own error
                continue
            if dup:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
        return loader.construct_mapping(node, deep)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _read_yaml(spec: str) -> tuple[dict, str]:
    import yaml
    path = Path(spec).expanduser()
    if spec.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise GiftError(f"recipe file not found: {spec}")
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise GiftError(f"{where}: not a UTF-8 text file") from None
        except OSError as e:
            raise GiftError(f"{where}: cannot read it ({e.strerror or e})") from None
    elif spec in METHODS or spec in builtin_names():
        res = resources.files("gift_quant").joinpath("recipes", f"{spec}.yaml")
        text, where = res.read_text(encoding="utf-8"), f"built-in recipe {spec!r}"
    else:
        raise GiftError(f"unknown recipe {spec!r}; choose one of {', '.join(builtin_names())} or give a .yaml file")
    try:
        data = yaml.load(text, Loader=_unique_key_loader())
    except yaml.YAMLError as e:
        raise GiftError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GiftError(f"{where}: a recipe must be a mapping of keys to values")
    return data, where


def load_recipe(spec: str = "post", overrides: dict | None = None, device: str | None = None) -> Recipe:
    """Read a built-in name or a YAML path, apply the ``cpu``/``gpu`` section, then ``overrides``."""
    data, where = _read_yaml(spec)
    if "recipe" not in data and spec in METHODS:
        data["recipe"] = spec
    kind = "gpu" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
    merged = {}
    for k, v in data.items():
        if k in OVERRIDE_SECTIONS:
            if not isinstance(v, dict):
                raise GiftError(f"{where}: recipe key {k!r} must be a mapping of overrides")
            for k2, v2 in v.items():
                _check(k2, v2, f"{where} ({k})")
            continue
        _check(k, v, where)
        merged[k] = v
    merged.update(data.get(kind) or {})
    for k, v in (overrides or {}).items():
        if v is not None or (k in FIELDS and _NONE in FIELDS[k][0]):  # None clears a nullable field
            _check(k, v, "command line")
            merged[k] = v
    r = Recipe(**merged)
    _validate(r, where)
    return r


def _validate(r: Recipe, where: str):
    from .noise import NOISE_KINDS
    if r.recipe not in METHODS:
        raise GiftError(f"{where}: recipe must be one of {', '.join(METHODS)}, got {r.recipe!r}")
    if r.noise not in NOISE_KINDS:
        raise GiftError(f"{where}: noise must be one of {', '.join(NOISE_KINDS)}, got {r.noise!r}")
    from .train import SCHEDULES
    if r.schedule not in SCHEDULES:
        raise GiftError(f"{where}: schedule must be one of {', '.join(SCHEDULES)}, got {r.schedule!r}")
    for k in ("steps", "batch_size", "grad_accum", "seq_len", "calib_samples", "calib_seq_len"):
        if getattr(r, k) < 1:
            raise GiftError(f"{where}: {k} must be >= 1, got {getattr(r, k)}")
    for k in ("val_windows", "eval_every", "patience", "save_every"):
        if getattr(r, k) < 0:
            raise GiftError(f"{where}: {k} must be >= 0, got {getattr(r, k)}")
    if not 0 < r.lr < math.inf:
        raise GiftError(f"{where}: lr must be a finite number > 0, got {r.lr}")
    if not 0 <= r.weight_decay < math.inf:
        raise GiftError(f"{where}: weight_decay must be a finite number >= 0, got {r.weight_decay}")
    if r.max_grad_norm is not None and not r.max_grad_norm >= 0:  # a negative norm would flip the gradients
        raise GiftError(f"{where}: max_grad_norm must be >= 0 or null, got {r.max_grad_norm}")
    from .quant import SUPPORTED_BITS
    if r.noise_bits is not None and r.noise_bits not in SUPPORTED_BITS:
        raise GiftError(f"{where}: noise_bits must be one of {', '.join(map(str, SUPPORTED_BITS))} or null, "
                        f"got {r.noise_bits}")
    if r.lora_rank is not None and r.lora_rank < 1:
        raise GiftError(f"{where}: lora_rank must be >= 1 or null, got {r.lora_rank}")
    if not 0 <= r.warmup_ratio < 1:
        raise GiftError(f"{where}: warmup_ratio must be in [0, 1), got {r.warmup_ratio}")
    r.gift_config()  # bits, group size, metric ... validated by GiftConfig


# ---- data ----------------------------------------------------------------------------------------
def training_data(r: Recipe, tokenizer):
    """(train ids [N, T], train labels or None, val ids, val labels or None)."""
    from .data import load_train_texts, tokenize_stream, windows
    from .chat import chat_windows, is_chat_source
    if is_chat_source(r.train_dataset):
        ids, labels = chat_windows(r.train_dataset, tokenizer, r.seq_len)
    else:
        texts = load_train_texts(r.train_dataset)
        if r.max_train_tokens:
            g = torch.Generator().manual_seed(r.seed)
            order = torch.randperm(len(texts), generator=g).tolist()
            picked, total = [], 0
            for i in order:
                picked.append(texts[i])
                total += len(texts[i]) // 3  # ~3+ chars per token: a cheap upper bound on tokens to tokenize
                if total >= r.max_train_tokens:
                    break
            texts = picked
        ids, labels = windows(tokenize_stream(texts, tokenizer), r.seq_len), None
    n_val = min(r.val_windows, max(0, ids.shape[0] - 1)) if r.eval_every else 0
    if ids.shape[0] - n_val < 1:
        raise GiftError(f"too little training text ({r.train_dataset}): fewer than one window of {r.seq_len} "
                        "tokens; give more text or lower --seq-len")
    g = torch.Generator().manual_seed(r.seed + 1)
    perm = torch.randperm(ids.shape[0], generator=g)
    vi, ti = perm[:n_val].sort().values, perm[n_val:].sort().values
    pick = (lambda t, i: None if t is None else t[i])
    return ids[ti], pick(labels, ti), (ids[vi] if n_val else None), (pick(labels, vi) if n_val else None)


# ---- orchestration -------------------------------------------------------------------------------
def _freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)


def _save_stage(model, cfg, report, work_dir: Path, fp: str):
    """Cache the compressed (pre-training) model so --resume skips calibration and GPTQ."""
    from safetensors.torch import save_file
    from .export import save_saliency
    from .nn import MixedPrecisionLinear
    work_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n, m in model.named_modules():
        if isinstance(m, MixedPrecisionLinear):
            for k, v in [*m.named_buffers(recurse=False), *m.named_parameters(recurse=False)]:
                if v is not None:
                    tensors[f"{n}.{k}"] = v.detach().contiguous().cpu()
    tmp = work_dir / ".compressed.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(work_dir / "compressed.safetensors")
    if report is not None:
        save_saliency(report, work_dir / "saliency.safetensors")
    (work_dir / "compressed.json").write_text(json.dumps({"fingerprint": fp, "config": cfg.to_dict(),
                                                          "bits_per_weight": report.bits_per_weight if report else None}))


def _load_stage(model, work_dir: Path, fp: str):
    from safetensors.torch import load_file
    from .config import GiftConfig
    from .hf import replace_linears
    meta_f = work_dir / "compressed.json"
    if not meta_f.is_file() or not (work_dir / "compressed.safetensors").is_file():
        return None
    meta = json.loads(meta_f.read_text())
    if meta.get("fingerprint") != fp:
        raise GiftError(f"cannot resume from {work_dir}: it was written for a different model or recipe; "
                        "delete it or change --output")
    cfg = GiftConfig.from_dict(meta["config"])
    replace_linears(model, cfg, dtype=torch.float16)
    missing = model.load_state_dict(load_file(str(work_dir / "compressed.safetensors")), strict=False)
    if any(k.rsplit(".", 1)[-1] in ("qweight", "scales", "salient_weight") for k in missing.missing_keys):
        raise GiftError(f"cannot resume from {work_dir}: compressed.safetensors is incomplete")
    model.config.quantization_config = cfg
    return cfg, meta.get("bits_per_weight")


def compress_stage(r: Recipe, model, tokenizer, samples, work_dir, resume, device, progress, salient=None):
    from .pipeline import compress_model
    from .train import fingerprint, is_main_process
    cfg = r.gift_config()
    fp = fingerprint(model, r.compression_fields())
    if resume and work_dir is not None:
        got = _load_stage(model, Path(work_dir), fp)
        if got is not None:
            return got[0], None, got[1]
    # multi-process: every rank compresses (deterministically); only rank 0 writes the shared state
    writer = work_dir is not None and is_main_process()
    state = dict(state_dir=Path(work_dir) / "compress", resume=resume) if writer else {}
    report = compress_model(model, samples, cfg, device=device, progress=progress, salient=salient, **state)
    if writer:
        _save_stage(model, cfg, report, Path(work_dir), fp)
    return cfg, report, report.bits_per_weight


@torch.no_grad()
def select_fp(model, samples, cfg, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Salient columns of every decoder Linear of the FP model (one forward with hooks)."""
    from .pipeline import decoder_layers, linears
    from .saliency import ActivationStats, select_salient, sensitivity
    layers, prefix = decoder_layers(model)
    metric = cfg.resolved_metric()
    stats, handles, lins = {}, [], {}
    dev = next(model.parameters()).device
    for li, layer in enumerate(layers):
        for n, lin in linears(layer, cfg.modules_not_converted).items():
            full = f"{prefix}.{li}.{n}"
            lins[full] = lin
            stats[full] = ActivationStats(lin.in_features, device=dev)  # on the model's device (CUDA too)

            def hook(_m, inp, _o, st=stats[full]):
                st.add(inp[0].float())
            handles.append(lin.register_forward_hook(hook))
    try:
        for i in range(0, samples.shape[0], batch_size):
            model(samples[i:i + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for full, lin in lins.items():
        k = cfg.salient_for(lin.in_features, full)
        scores = sensitivity(lin.weight.detach().float(), stats[full].norm(metric.rho), metric, cfg.bits,
                             cfg.group_size, cfg.sym)
        out[full] = select_salient(scores, k)
    return out


def run_recipe(r: Recipe, model, tokenizer, out_dir=None, work_dir=None, resume: bool = False,
               progress: bool = True, device=None, eval_windows=None, model_name: str = "model", log=None,
               eval_before_training: bool = False) -> dict:
    """Compress (and train) ``model`` per recipe ``r``; write a checkpoint into ``out_dir`` if given.

    ``work_dir`` holds resumable state (the compressed stage and training checkpoints); it is removed
    by the caller after a successful run. Returns a summary dict (also written as gift_report.json).
    """
    from .data import calibration_samples, load_texts
    from .evaluate import perplexity
    from .export import STORAGE_DTYPE, round_to_storage, save_checkpoint
    from .nn import GiftLinear, MixedPrecisionLinear
    from .nn.gift_linear import swap_modules
    from .train import dist_rank, fingerprint, train
    log = log or (lambda *a: None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = dist_rank()
    if world > 1 and device.type == "cuda" and device.index is None:  # each rank on its own GPU, not all on cuda:0
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.manual_seed(r.seed)
    t0 = time.time()
    fp = fingerprint(model, r.training_fields())
    work_dir = Path(work_dir) if work_dir else None
    cfg = r.gift_config()
    # fail fast on bad training data, before the long calibration
    train_ids = train_labels = val_ids = val_labels = None
    if r.recipe != "none":
        train_ids, train_labels, val_ids, val_labels = training_data(r, tokenizer)
        log(f"gift-quant: training text {r.train_dataset}: {train_ids.shape[0]} windows of {r.seq_len} tokens"
            + (f" (+{val_ids.shape[0]} held out)" if val_ids is not None else ""))
    samples = calibration_samples(load_texts(r.calib_dataset), tokenizer, r.calib_samples, r.calib_seq_len, r.seed)
    _freeze(model)
    summary = {"model": model_name, "recipe": r.recipe, "bits": r.bits, "group_size": r.group_size,
               "metric": r.metric, "calibration": f"{r.calib_dataset}: {r.calib_samples} x {r.calib_seq_len} tokens"}
    compress_report, train_report, extra = None, None, None
    if r.recipe in ("none", "post", "lora", "ste"):
        cfg, compress_report, bpw = compress_stage(r, model, tokenizer, samples, work_dir, resume, device, progress)
        summary["bits_per_weight"] = round(bpw, 4) if bpw else None
        summary["compress_seconds"] = round(time.time() - t0, 1)
        round_to_storage(model)  # train and evaluate exactly what the checkpoint stores
        if eval_before_training and eval_windows is not None and r.recipe != "none":
            summary["perplexity_before_training"] = round(perplexity(model, eval_windows, progress=progress), 3)
    if r.recipe == "post":
        model.to(device)
        gl = swap_modules(model, lambda n, m: GiftLinear.from_mixed(m, r.noise, r.noise_bits).to(device),
                          (MixedPrecisionLinear,))
        train_report = train(model, train_ids, r.train_settings(progress), work_dir, resume, train_labels,
                             val_ids, val_labels, fp, device, log)
        swap_modules(model, lambda n, m: m.to_mixed(), (GiftLinear,))
        model.to("cpu")
        del gl
    elif r.recipe == "pre":
        model.to(device)
        salient = select_fp(model, samples.to(device), cfg)
        idx_of = {}

        def to_gift(name, lin):
            if name not in salient:
                return lin
            idx_of[name] = salient[name]
            return GiftLinear.from_linear(lin, salient[name], r.bits, r.noise, r.noise_bits, cfg.group_size, cfg.sym,
                                          cfg.mse_clip).to(device)
        from .pipeline import decoder_layers
        layers, prefix = decoder_layers(model)
        swap_modules(layers, lambda n, m: to_gift(f"{prefix}.{n}", m), (torch.nn.Linear,))
        train_report = train(model, train_ids, r.train_settings(progress), work_dir, resume, train_labels,
                             val_ids, val_labels, fp, device, log)
        swap_modules(model, lambda n, m: m.to_linear(), (GiftLinear,))
        _freeze(model)
        model.to("cpu")
        t1 = time.time()
        cfg, compress_report, _ = compress_stage(r, model, tokenizer, samples, None, False, device, progress,
                                                 salient=salient)
        round_to_storage(model)
        summary["bits_per_weight"] = round(compress_report.bits_per_weight, 4)
        summary["compress_seconds"] = round(time.time() - t1, 1)
    elif r.recipe in ("ste", "lora"):
        from . import baselines
        model, train_report, extra = getattr(baselines, f"run_{r.recipe}")(
            r, model, train_ids, train_labels, val_ids, val_labels, work_dir, resume, fp, device, progress, log)
    if train_report is not None:
        tr = train_report
        summary.update({"train_dataset": r.train_dataset, "steps": tr.steps_done, "lr": r.lr,
                        "batch": f"{r.batch_size} x {r.grad_accum} x {r.seq_len} tokens", "noise": r.noise,
                        "trainable_params": tr.trainable_params, "train_step_seconds": round(tr.step_seconds, 3),
                        "train_tokens_per_second": round(tr.tokens_per_second, 1),
                        "train_peak_memory_mb": round(tr.peak_memory_mb, 1),
                        "final_train_loss": round(tr.losses[-1], 4) if tr.losses else None,
                        "best_step": tr.best_step, "best_heldout_loss": tr.best_val})
    model.eval()
    if eval_windows is not None:
        summary["perplexity"] = round(perplexity(model, eval_windows, progress=progress), 3)
    summary["total_seconds"] = round(time.time() - t0, 1)
    if out_dir is not None and rank == 0:  # multi-process: rank 0 alone writes the checkpoint
        out_dir = Path(out_dir)
        if r.recipe == "lora":
            from .baselines import save_lora
            save_lora(model, tokenizer, out_dir, compress_report, summary)
        else:
            save_checkpoint(model.to(STORAGE_DTYPE), tokenizer, out_dir, compress_report, summary)
            model.float()
        if compress_report is None and work_dir is not None and (work_dir / "saliency.safetensors").is_file():
            shutil.copy(work_dir / "saliency.safetensors", out_dir / "saliency.safetensors")
        (out_dir / "recipe.json").write_text(json.dumps(r.to_dict(), indent=1))
    summary["_model"] = model
    summary["_train_report"] = train_report
    return summary
