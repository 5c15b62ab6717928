"""``prepare_model``: build every layer's kernel layout, compile its kernels for every token bucket, and
freeze its backend, layout and tuned token policy before torch.compile or CUDA-graph capture."""
from __future__ import annotations

import os

import torch

from ..kernels.tuned import TOKEN_BUCKETS
from . import backends
from .env import interpreting
from .layout_cache import prepared
from .mixed_linear import MixedPrecisionLinear
from .route import FROZEN_ATTR, Frozen


def prepare_model(model: torch.nn.Module, dtype: torch.dtype | None = None,
                  warmup_tokens: tuple[int, ...] = TOKEN_BUCKETS) -> int:
    """Build every MixedPrecisionLinear's kernel layout and compile/run its kernels once per token bucket,
    so that torch.compile and CUDA-graph capture never build or compile anything. Each such layer's backend,
    layout and token policy (the GPU's tuned table, :mod:`gift_quant.kernels.tuned`) are then frozen: an
    eager call skips the backend choice and the layout-cache key; replacing or writing a weight tensor, or
    changing GIFT_QUANT_KERNEL, falls back to the full route. Returns the number of layers on a kernel
    backend."""
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, MixedPrecisionLinear) or not (m.qweight.is_cuda or interpreting()):
                continue
            dt = dtype or m.scales.dtype
            probe = torch.zeros(1, m.in_features, device=m.qweight.device, dtype=dt)
            backend = backends.resolve(probe, m)
            if backend == "torch":
                continue
            n += 1
            gmt = prefill = None
            if backend == "triton":
                gmt, prefill = token_policy(m)
                if prefill == "int4pack":
                    _pack_int4(m, dt)
            for t in warmup_tokens:
                backends.run(backend, torch.randn(t, m.in_features, device=m.qweight.device).to(dt), m, gmt, prefill)
            if backend == "triton":
                m.__dict__[FROZEN_ATTR] = Frozen(m, backend, dt, prepared(m, backend, dt), gmt, prefill)
    return n


def token_policy(layer) -> tuple[int, str]:
    """(gemv_max_tokens, prefill path) for a layer: the GPU's tuned table (gift_quant.kernels.tuned), unless
    GIFT_QUANT_GEMV_MAX_TOKENS / GIFT_QUANT_TRITON_PREFILL are set, which win."""
    from ..kernels import tuned
    from ..kernels.triton import op as triton_op
    gmt, prefill = tuned.choice(layer.qweight.device, layer.bits, layer.in_features, layer.out_features)
    if os.environ.get("GIFT_QUANT_GEMV_MAX_TOKENS"):
        gmt = backends.GEMV_MAX_TOKENS
    if os.environ.get("GIFT_QUANT_TRITON_PREFILL"):
        prefill = triton_op.PREFILL_PATH
    return gmt, prefill


def unfreeze(model: torch.nn.Module):
    """Drop what prepare_model froze (the next calls choose and look up again)."""
    for m in model.modules():
        m.__dict__.pop(FROZEN_ATTR, None)


def _pack_int4(layer, dtype: torch.dtype):
    """Pack the layer's layout for aten._weight_int4pack_mm where the table chose it and it can run."""
    from ..kernels import torch_int4
    L = prepared(layer, "triton", dtype)
    if dtype == torch.bfloat16 and torch_int4.unavailable(L) is None and "_int4" not in L.__dict__:
        L.__dict__["_int4"] = torch_int4.build(L)
