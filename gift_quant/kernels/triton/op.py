"""``torch.ops.gift_quant.mixed_linear_triton``: the Triton kernels as a torch.library custom op.

A custom op with a fake implementation lets ``torch.compile(fullgraph=True)`` trace it and
``mode="reduce-overhead"`` capture it in CUDA graphs. The kernels compile on their first eager call per
specialization; ``gift_quant.nn.dispatch.prepare_model`` makes those calls before any capture.
Decode (tokens <= ``gemv_max_tokens``) runs the split-K kernel; longer inputs run ``PREFILL_PATH``:
``dequant`` (W^T written once, then the library GEMM) or ``gemm`` (the ``tl.dot`` kernel).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .layout import TritonLayout

# token counts up to this take the split-K decode kernel (each weight tile applied to every token of the
# call), more the prefill path; a tuned table (gift_quant.kernels.tuned) may lower it per shape
GEMV_MAX_TOKENS = int(os.environ.get("GIFT_QUANT_GEMV_MAX_TOKENS", "16"))
PREFILL_PATHS = ("dequant", "gemm", "int4pack")
PREFILL_PATH = os.environ.get("GIFT_QUANT_TRITON_PREFILL", "dequant")


def eager_forward(x: Tensor, L: TritonLayout, gemv_max_tokens: int, prefill: str) -> Tensor:
    """The op's body: the GEMV for up to ``gemv_max_tokens`` tokens, else the ``prefill`` path."""
    from . import kernel
    x2d = x.reshape(-1, L.in_features)
    path = "gemv" if x2d.shape[0] <= gemv_max_tokens else prefill
    if path == "int4pack":  # aten's 4-bit kernel, packed by prepare_model on the layout (bf16 only)
        P = L.__dict__.get("_int4")
        if P is not None and x.dtype == torch.bfloat16:
            from .. import torch_int4
            return torch_int4.forward(x2d, P).reshape(*x.shape[:-1], L.out_features)
        path = "dequant"  # not packed (the custom op rebuilds its layout per call) or not bf16
    return kernel.mixed_linear(x2d, L, path).reshape(*x.shape[:-1], L.out_features)


@torch.library.custom_op("gift_quant::mixed_linear_triton", mutates_args=())
def mixed_linear_triton(x: Tensor, qweight: Tensor, perm: Tensor, gchunk: Tensor, scales: Tensor, zeros: Tensor,
                        sal_w: Tensor, sal_idx: Tensor, bias: Optional[Tensor], bits: int, in_features: int,
                        out_features: int, identity_rows: bool, gemv_max_tokens: int, prefill: str,
                        perm_pos: Tensor, tile: int, group_rows: int) -> Tensor:
    L = TritonLayout(qweight, perm, gchunk, scales, zeros, sal_w, sal_idx, bias, bits, in_features, out_features,
                     identity_rows, perm_pos, tile, group_rows)
    return eager_forward(x, L, gemv_max_tokens, prefill)


@mixed_linear_triton.register_fake
def _(x, qweight, perm, gchunk, scales, zeros, sal_w, sal_idx, bias, bits, in_features, out_features,
      identity_rows, gemv_max_tokens, prefill, perm_pos, tile, group_rows):
    return x.new_empty((*x.shape[:-1], out_features))


def run(x: Tensor, L: TritonLayout, gemv_max_tokens: int = GEMV_MAX_TOKENS, prefill: str | None = None) -> Tensor:
    """The op on a prepared layout. ``gemv_max_tokens`` 0 forces the prefill path, a large value the GEMV;
    ``prefill`` (default ``PREFILL_PATH``) is 'dequant', 'gemm' or 'int4pack' (eager and bf16 only, on a
    layout prepare_model packed for it; otherwise 'dequant')."""
    prefill = prefill or PREFILL_PATH
    if prefill not in PREFILL_PATHS:
        raise ValueError(f"GIFT_QUANT_TRITON_PREFILL must be one of {', '.join(PREFILL_PATHS)}, got {prefill!r}")
    if not torch.compiler.is_compiling():
        # eager: the op's body directly. The custom-op dispatch is what tracing needs, and in eager it
        # costs more than the decode kernel itself (tools/bench_dispatch_overhead.py)
        return eager_forward(x, L, gemv_max_tokens, prefill)
    return torch.ops.gift_quant.mixed_linear_triton(x, L.qweight, L.perm, L.gchunk, L.scales, L.zeros, L.sal_w,
                                                    L.sal_idx, L.bias, L.bits, L.in_features, L.out_features,
                                                    L.identity_rows, gemv_max_tokens, prefill, L.perm_pos,
                                                    L.tile, L.group_rows)
