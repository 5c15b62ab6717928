"""Training checkpoints (safetensors only, no pickle): trainable tensors, AdamW moments, the best-so-far
tensors and a JSON with step, losses and a fingerprint of model + recipe. Resuming is bit-identical
because data order and noise seeds are functions of (seed, step)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from gift_quant.errors import GiftError
from gift_quant.io.atomic import save_tensors, write_json
from gift_quant.io.model_io import architecture_json

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"


def fingerprint(model, recipe: dict) -> str:
    """Hash of the model architecture, a sample of its input embedding (frozen in every recipe, unlike the
    Linears that ``pre`` trains before its compressed stage is fingerprinted) and the recipe."""
    h = hashlib.sha256(architecture_json(model).encode())
    h.update(json.dumps(recipe, sort_keys=True, default=str).encode())
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        h.update(emb.detach().float()[:8].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _opt_tensors(opt, names) -> dict:
    out = {}
    for n, p in names:  # state is keyed by the parameter itself, whatever its param group
        st = opt.state.get(p, {})
        for k, v in st.items():
            out[f"opt.{n}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_opt(opt, names, tensors):
    for n, p in names:
        st = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{n}.") and
              k[len(f"opt.{n}."):].count(".") == 0}
        if st:
            opt.state[p] = {k: (v.to(p.device) if k != "step" else v.to(torch.float32)) for k, v in st.items()}


def read_state(work_dir) -> dict | None:
    f = Path(work_dir) / STATE_JSON
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        raise GiftError(f"training checkpoint {f} is unreadable; delete {work_dir} to start over") from None


def save_state(work_dir: Path, step: int, names, opt, best, rep, fp: str, settings):
    tensors = {f"param.{n}": p for n, p in names}
    tensors.update(_opt_tensors(opt, names))
    if best is not None:
        tensors.update({f"best.{n}": v for n, v in best.items()})
    save_tensors(Path(work_dir) / STATE_TENSORS, tensors)  # tensors first: the JSON names their step
    write_json(Path(work_dir) / STATE_JSON, {"step": step, "fingerprint": fp, "losses": rep.losses,
                                             "val_losses": rep.val_losses, "best_step": rep.best_step,
                                             "best_val": rep.best_val, "settings": asdict(settings)}, indent=1)


@torch.no_grad()
def load_state(work_dir: Path, fp: str, names, opt, rep):
    """Restore parameters, optimizer and report from ``work_dir``; returns (start step, best tensors)."""
    meta = read_state(work_dir)
    if meta is None:
        return 0, None
    if meta.get("fingerprint") != fp:
        raise GiftError(f"cannot resume from {work_dir}: it was written for a different model or recipe "
                        f"(fingerprint {meta.get('fingerprint')} != {fp}); delete it or change --output")
    from safetensors.torch import load_file
    t = load_file(str(Path(work_dir) / STATE_TENSORS))
    for n, p in names:
        if f"param.{n}" not in t:
            raise GiftError(f"cannot resume from {work_dir}: tensor {n} is missing")
        p.copy_(t[f"param.{n}"].to(p.device, p.dtype))
    _load_opt(opt, names, t)
    best = {n: t[f"best.{n}"] for n, _ in names} if any(k.startswith("best.") for k in t) else None
    start = int(meta["step"])
    rep.losses = list(meta.get("losses", []))
    rep.val_losses = [tuple(x) for x in meta.get("val_losses", [])]
    rep.best_step, rep.best_val = meta.get("best_step"), meta.get("best_val")
    rep.resumed_from = start
    return start, best
