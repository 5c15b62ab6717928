"""Which backend runs a call ('triton', 'cuda' or 'torch'), memoized, and running it.

The self-check (a float64 comparison on small random layers, :mod:`gift_quant.nn.self_check`) registers
itself here on import, so this module never imports the layer class.
"""
from __future__ import annotations

import warnings

import torch

from ..kernels.triton import op as triton_op
from ..kernels.triton.op import (
    GEMV_MAX_TOKENS,  # GIFT_QUANT_GEMV_MAX_TOKENS (tests patch it here)
)
from .env import CUDA_GEMV_MAX_TOKENS, interp_env, interpreting, kernel_env, requested_backend
from .layout_cache import prepared
from .torch_forward import torch_forward

_warned: set = set()
_resolved: dict = {}  # (backend arg, env, device, dtype, bits) -> backend that runs (successes only)
_self_check = {"fn": None, "forget": None}


def register_self_check(fn, forget):
    """``fn(backend, bits, dtype, device)`` runs the check; ``forget()`` drops its memoized results."""
    _self_check.update(fn=fn, forget=forget)


def self_check(backend: str, bits: int, dtype: torch.dtype, device: torch.device) -> float | None:
    """The registered self-check's result (relative error if the backend failed, else None)."""
    fn = _self_check["fn"]
    if fn is None:
        raise RuntimeError("gift-quant: no self-check registered (import gift_quant.nn)")
    return fn(backend, bits, dtype, device)


def triton_unavailable(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take x, or None."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"triton is not importable ({type(e).__name__}: {e})"
    if x.device.type != "cuda" and not interpreting():
        return f"input on {x.device.type}: the Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"
    ok = (torch.float16, torch.bfloat16, torch.float32)
    if interpreting() and x.device.type == "cpu":
        ok = (torch.float16, torch.float32)  # the interpreter has no bf16
    if x.dtype not in ok:
        return f"activation dtype {x.dtype} is not supported by the Triton kernels"
    return None


def cuda_unavailable(x: torch.Tensor) -> str | None:
    from ..kernels.cuda import build
    if not x.is_cuda:
        return f"input on {x.device.type}: the C++ kernel needs CUDA"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"activation dtype {x.dtype} is not supported by the C++ kernel (fp16/bf16)"
    if build.extension(warn=False) is None:
        return f"the C++ kernel is unavailable ({build.unavailable_reason()})"
    return None


def run(backend: str, x: torch.Tensor, layer, gemv_max_tokens: int | None = None,
         prefill: str | None = None) -> torch.Tensor:
    gmt = GEMV_MAX_TOKENS if gemv_max_tokens is None else gemv_max_tokens
    if backend == "triton":
        return triton_op.run(x, prepared(layer, "triton", x.dtype), gmt, prefill)
    if backend == "cuda":
        from ..kernels.cuda import op as cuda_op
        return cuda_op.run_op(x, layer, prepared(layer, "cuda", x.dtype),
                          CUDA_GEMV_MAX_TOKENS if gemv_max_tokens is None else gemv_max_tokens)
    return torch_forward(x, layer)


def warn_once(reason: str):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"gift-quant: GIFT_QUANT_KERNEL=auto: {reason}; using the PyTorch path (correct, "
                      "slower)", stacklevel=4)


def resolve(x: torch.Tensor, layer, backend: str | None = None) -> str:
    """The backend that will run x through layer: 'triton', 'cuda' or 'torch' (raises for a named backend
    that cannot run)."""
    memo = (backend, kernel_env(), interp_env(), x.device, x.dtype, layer.bits)
    hit = _resolved.get(memo)
    if hit is not None:
        return hit
    name = _resolve(x, layer, backend)
    if not torch.compiler.is_compiling():
        _resolved[memo] = name
    return name


def _resolve(x: torch.Tensor, layer, backend: str | None) -> str:
    name = backend or requested_backend()
    if name == "torch":
        return "torch"
    if name == "auto":
        if not _wants_kernel(x):
            return "torch"  # CPU: the PyTorch path is the intended one, no warning
        reason = triton_unavailable(x)
        if reason is None and not torch.compiler.is_compiling():
            err = self_check("triton", layer.bits, x.dtype, x.device)
            if err is not None:
                reason = f"the Triton kernel failed its self-check (bits={layer.bits}, {x.dtype}, rel. error {err:.1e})"
        if reason is not None:
            warn_once(reason)
            return "torch"
        return "triton"
    reason = triton_unavailable(x) if name == "triton" else cuda_unavailable(x)
    if reason is None and name == "cuda" and not torch.compiler.is_compiling():
        err = self_check("cuda", layer.bits, x.dtype, x.device)
        if err is not None:
            reason = f"the C++ kernel failed its self-check (bits={layer.bits}, {x.dtype}, rel. error {err:.1e})"
    if reason is not None:
        raise RuntimeError(f"gift-quant: GIFT_QUANT_KERNEL={name}: {reason}")
    return name


def _wants_kernel(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def reset():
    """Forget self-check results, warnings and memoized choices (tests)."""
    if _self_check["forget"] is not None:
        _self_check["forget"]()
    _warned.clear()
    _resolved.clear()
