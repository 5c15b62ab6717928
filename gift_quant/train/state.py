"""Training checkpoints (safetensors only, no pickle): trainable tensors, AdamW moments, the best-so-far
tensors and a JSON with step, losses and a fingerprint of model + recipe. Resuming is bit-identical
because data order and noise seeds are functions of (seed, step).

A checkpoint is one unit: both files go into a fresh folder, are fsynced, and the folder is renamed
into place (the previous one is moved aside first and removed only once the new one is in place). The
JSON also holds the step and sha256 of the tensors file, so a mismatched pair is refused, never resumed."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from gift_quant.errors import GiftError
from gift_quant.io.atomic import fsync_path
from gift_quant.io.manifest import sha256
from gift_quant.io.model_io import architecture_json

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
STATE_DIR = "train"            # the current checkpoint: STATE_JSON + STATE_TENSORS
OLD_DIR = "train.old"          # the previous one, while the next is renamed into place


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


def state_dir(work_dir) -> Path | None:
    """The folder of the newest complete checkpoint (``train``, or ``train.old`` if a kill fell between the
    two renames), else None."""
    for name in (STATE_DIR, OLD_DIR):
        d = Path(work_dir) / name
        if (d / STATE_JSON).is_file():
            return d
    return None


def read_state(work_dir) -> dict | None:
    d = state_dir(work_dir)
    if d is None:
        return None
    f = d / STATE_JSON
    try:
        return json.loads(f.read_text())
    except ValueError:
        raise GiftError(f"training checkpoint {f} is unreadable; delete {work_dir} to start over") from None


def save_state(work_dir: Path, step: int, names, opt, best, rep, fp: str, settings):
    from safetensors.torch import save_file
    work_dir = Path(work_dir)
    tensors = {f"param.{n}": p for n, p in names}
    tensors.update(_opt_tensors(opt, names))
    if best is not None:
        tensors.update({f"best.{n}": v for n, v in best.items()})
    for stale in work_dir.glob(f"{STATE_DIR}.tmp*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = work_dir / f"{STATE_DIR}.tmp{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_TENSORS),
                  metadata={"step": str(step)})
        fsync_path(tmp / STATE_TENSORS)
        meta = {"step": step, "fingerprint": fp, "tensors_sha256": sha256(tmp / STATE_TENSORS),
                "losses": rep.losses, "val_losses": rep.val_losses, "best_step": rep.best_step,
                "best_val": rep.best_val, "settings": asdict(settings)}
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        fsync_path(tmp / STATE_JSON)
        fsync_path(tmp)
        cur, old = work_dir / STATE_DIR, work_dir / OLD_DIR
        if (cur / STATE_JSON).is_file():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(cur, old)  # the previous checkpoint stays whole until the new one is in place
        elif cur.exists():
            shutil.rmtree(cur)
        os.replace(tmp, cur)
        fsync_path(work_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def load_state(work_dir: Path, fp: str, names, opt, rep):
    """Restore parameters, optimizer and report from ``work_dir``; returns (start step, best tensors)."""
    meta = read_state(work_dir)
    if meta is None:
        if (Path(work_dir) / STATE_JSON).is_file():  # the loose pair an older gift-quant wrote
            raise GiftError(f"cannot resume from {work_dir}: its training checkpoint was written by an older "
                            "gift-quant (no train/ folder); delete it to start over")
        return 0, None
    if meta.get("fingerprint") != fp:
        raise GiftError(f"cannot resume from {work_dir}: it was written for a different model or recipe "
                        f"(fingerprint {meta.get('fingerprint')} != {fp}); delete it or change --output")
    from safetensors.torch import load_file
    f = state_dir(work_dir) / STATE_TENSORS
    if not f.is_file() or sha256(f) != meta.get("tensors_sha256"):
        raise GiftError(f"cannot resume from {work_dir}: the training checkpoint of step {meta.get('step')} does "
                        f"not match its tensors file; delete it to start over")
    t = load_file(str(f))
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
