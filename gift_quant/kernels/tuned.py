"""Tuned kernel choices as data: one JSON table per GPU (name and compute capability), shipped in
``gift_quant/kernels/tuned_tables/`` and written by ``tools/bench_kernel.py --tuned-out`` (the device
check). :func:`choice` is read once per layer by ``prepare_model``, never inside graph capture; a GPU
without a table, or a shape/bit width the table lacks, gets the defaults below. Only a table that a
device run measured is committed (``<device-name>-sm<major><minor>.json``, see :func:`table_name`).

Table format::

    {"device": "NVIDIA H200", "capability": [9, 0], "measured": "2026-12-05 ...", "command": "...",
     "entries": [{"bits": 4, "K": 4096, "N": 11008, "tokens": 1, "path": "gemv", "us": 9.1,
                  "us_fp16": 25.0}, ...]}

``path`` is 'gemv' (the split-K decode kernels), 'gemm' (the tl.dot prefill kernel), 'dequant' (W^T
once, then the library GEMM) or 'int4pack' (aten._weight_int4pack_mm, 4 bits, bf16 tables only).
"""
from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

TABLES = Path(__file__).with_name("tuned_tables")
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 64)  # the token counts a table measures and prepare_model warms up
DEFAULT_GEMV_MAX_TOKENS = 16   # the split-K kernels up to 16 tokens, then dequant + library GEMM
DEFAULT_PREFILL = "dequant"
PATHS = ("gemv", "gemm", "dequant", "int4pack")


def table_name(device_name: str, capability: tuple[int, int]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return f"{slug}-sm{capability[0]}{capability[1]}.json"


@cache
def load(device_name: str, capability: tuple[int, int]) -> dict | None:
    """The shipped table for this GPU, or None (an unreadable table is ignored, never fatal)."""
    p = TABLES / table_name(device_name, capability)
    try:
        t = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return t if isinstance(t, dict) and isinstance(t.get("entries"), list) else None


def policy(table: dict | None, bits: int, K: int, N: int) -> tuple[int, str]:
    """(gemv_max_tokens, prefill path) for one layer: the split-K kernels up to the largest measured token
    bucket where they were the fastest candidate (and every smaller bucket too), the prefill path the
    table found fastest at the largest bucket; the defaults where the table has no row for this layer."""
    if not table:
        return DEFAULT_GEMV_MAX_TOKENS, DEFAULT_PREFILL
    rows = [e for e in table["entries"] if e.get("bits") == bits and e.get("K") == K and e.get("N") == N
            and e.get("path") in PATHS]
    if not rows:  # nearest shape with the same bit width (by weight size), else defaults
        same = [e for e in table["entries"] if e.get("bits") == bits and e.get("path") in PATHS]
        if not same:
            return DEFAULT_GEMV_MAX_TOKENS, DEFAULT_PREFILL
        size = min({(e["K"], e["N"]) for e in same}, key=lambda kn: abs(kn[0] * kn[1] - K * N))
        rows = [e for e in same if (e["K"], e["N"]) == size]
    best = {e["tokens"]: e["path"] for e in rows}
    gmt = 0
    for b in sorted(best):
        if best[b] != "gemv":
            break
        gmt = b
    prefill = [best[b] for b in sorted(best) if best[b] != "gemv"]
    return gmt, prefill[-1] if prefill else DEFAULT_PREFILL


def choice(device, bits: int, K: int, N: int) -> tuple[int, str]:
    """The per-layer policy on ``device`` (a torch.device): from its GPU's table, else the defaults."""
    import torch
    if device.type != "cuda":
        return DEFAULT_GEMV_MAX_TOKENS, DEFAULT_PREFILL
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return policy(load(torch.cuda.get_device_name(idx), tuple(torch.cuda.get_device_capability(idx))), bits, K, N)


def write(path: Path, device_name: str, capability: tuple[int, int], rows: list[dict], command: str,
          measured: str) -> Path:
    """Write a table from benchmark rows (each with bits, K, N, tokens and us_<path> timings): per row the
    fastest path, with its time and fp16's. Atomic (a temporary file, then a rename)."""
    entries = []
    for r in rows:
        times = {p: r[f"us_triton_{p}"] for p in PATHS if r.get(f"us_triton_{p}") is not None}
        if not times:
            continue
        p = min(times, key=times.get)
        entries.append({"bits": r["bits"], "K": r["K"], "N": r["N"], "tokens": r["batch"], "path": p,
                        "us": round(times[p], 2), "us_fp16": round(r["us_fp16"], 2),
                        "us_all": {k: round(v, 2) for k, v in times.items()}})
    t = {"device": device_name, "capability": list(capability), "measured": measured, "command": command,
         "entries": entries}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(t, indent=1) + "\n")
    tmp.replace(path)
    return path
