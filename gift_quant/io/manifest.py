"""Checkpoint manifest: sha256 and size per file, name/dtype/shape per tensor. Written last, so a
folder with a valid manifest is a complete checkpoint; ``gift-quant verify`` re-checks it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gift_quant.config import FORMAT
from gift_quant.errors import GiftError

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    """Hex digest of a file, read in 1 MiB chunks (checkpoints are larger than memory should hold twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensors(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return {k: {"dtype": str(f.get_slice(k).get_dtype()), "shape": list(f.get_slice(k).get_shape())}
                for k in f.keys()}


def write_manifest(folder) -> Path:
    folder = Path(folder)
    files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    tensors = {p.name: _tensors(p) for p in sorted(folder.glob("*.safetensors"))}
    out = folder / MANIFEST
    out.write_text(json.dumps({"format": FORMAT, "files": files, "tensors": tensors}, indent=1))
    return out


def verify(folder) -> int:
    """Number of files checked; raises GiftError naming the first file that does not match."""
    folder = Path(folder)
    m = folder / MANIFEST
    if not m.is_file():
        raise GiftError(f"{folder} has no {MANIFEST}: not a complete gift-quant checkpoint")
    try:
        files = json.loads(m.read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= v.keys()
                                                  for v in files.values()):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise GiftError(f"{m}: unreadable manifest (not the JSON gift-quant writes)") from None
    for name, info in files.items():
        p = folder / name
        if not p.is_file():
            raise GiftError(f"{name}: listed in the manifest but missing")
        if p.stat().st_size != info["bytes"]:
            raise GiftError(f"{name}: size {p.stat().st_size} != {info['bytes']} in the manifest (truncated?)")
        if sha256(p) != info["sha256"]:
            raise GiftError(f"{name}: sha256 does not match the manifest (corrupted or modified)")
    return len(files)
