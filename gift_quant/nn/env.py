"""``GIFT_QUANT_KERNEL`` and the other environment switches of the forward route, read cheaply per call."""
from __future__ import annotations

import os

BACKENDS = ("auto", "triton", "cuda", "torch")
CUDA_GEMV_MAX_TOKENS = 4  # the opt-in C++ kernel's GEMV runs one program per token: prefill path above 4
_ALIASES = {"off": "torch", "0": "torch", "false": "torch", "no": "torch", "": "auto", "pytorch": "torch"}

def _env_reader(name: str):
    """A per-call read of one environment variable, as raw as possible: ``os.environ.get`` costs ~2 us
    (it encodes the key and decodes the value), a tenth of a decode call's host time. The raw value
    (bytes on POSIX) serves as a cache key; :func:`os.environ.get` decodes it when needed."""
    data, enc = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and enc is not None:
        key = enc(name)
        return lambda: data.get(key)
    return lambda: os.environ.get(name)


kernel_env, interp_env, torch_cache_env = (_env_reader(n) for n in
                                              ("GIFT_QUANT_KERNEL", "TRITON_INTERPRET", "GIFT_QUANT_TORCH_CACHE"))


def requested_backend() -> str:
    raw = os.environ.get("GIFT_QUANT_KERNEL", "auto").strip().lower()
    name = _ALIASES.get(raw, raw)
    if name not in BACKENDS:
        raise ValueError(f"GIFT_QUANT_KERNEL={raw!r}: expected one of {', '.join(BACKENDS)}")
    return name


def interpreting() -> bool:
    raw = interp_env()
    return raw is not None and raw.strip() not in (b"", b"0", "", "0")
