"""``torch.ops.gift_quant.mixed_linear``: the CUDA kernel as a torch.library custom op.

A custom op with a fake (meta) implementation lets ``torch.compile`` trace through it and capture it
in CUDA graphs (``mode="reduce-overhead"``). On tensors the extension cannot take (CPU, no build) the
op runs :func:`prepared_forward`, the same math in PyTorch (the dispatcher only routes CUDA fp16/bf16
inputs here, after the build and a self-check succeeded).
"""
from typing import Optional

import torch
from torch import Tensor

from . import build
from .layout import PreparedLinear, prepared_forward


def _forward(x: Tensor, qweight: Tensor, perm: Tensor, gidx: Tensor, scales: Tensor, zeros: Tensor,
             salient_weight: Tensor, salient_idx: Tensor, bias: Optional[Tensor], bits: int,
             in_features: int, out_features: int, gemv_max_tokens: int, chunk_uniform: bool) -> Tensor:
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features).contiguous()
    ext = build.extension() if x.is_cuda else None
    if ext is None:
        p = PreparedLinear(qweight, perm, gidx, scales, zeros, bits, False)
        y = prepared_forward(x2d, p, salient_weight, salient_idx, bias)
    elif x2d.shape[0] <= gemv_max_tokens and out_features % 4 == 0:
        y = ext.gemv(x2d, qweight, perm, gidx, scales, zeros, salient_weight, salient_idx, bias, bits,
                     out_features, int(chunk_uniform))
    else:
        wt = ext.dequant_t(qweight, perm, gidx, scales, zeros, salient_weight, salient_idx, bits, in_features,
                           out_features)
        y = torch.addmm(bias, x2d, wt) if bias is not None else x2d @ wt
    return y.reshape(*lead, out_features)


@torch.library.custom_op("gift_quant::mixed_linear", mutates_args=())
def mixed_linear_op(x: Tensor, qweight: Tensor, perm: Tensor, gidx: Tensor, scales: Tensor, zeros: Tensor,
                    salient_weight: Tensor, salient_idx: Tensor, bias: Optional[Tensor], bits: int,
                    in_features: int, out_features: int, gemv_max_tokens: int, chunk_uniform: bool) -> Tensor:
    return _forward(x, qweight, perm, gidx, scales, zeros, salient_weight, salient_idx, bias, bits, in_features,
                    out_features, gemv_max_tokens, chunk_uniform)


@mixed_linear_op.register_fake
def _(x, qweight, perm, gidx, scales, zeros, salient_weight, salient_idx, bias, bits, in_features,
      out_features, gemv_max_tokens, chunk_uniform):
    return x.new_empty((*x.shape[:-1], out_features))


def run_op(x: Tensor, layer, p: PreparedLinear, gemv_max_tokens: int) -> Tensor:
    """The op on a layer's prepared layout; FP16 columns and bias in the activation dtype."""
    sw = layer.salient_weight.detach().to(x.dtype).contiguous()
    b = None if layer.bias is None else layer.bias.to(x.dtype).contiguous()
    # eager calls the body directly: the custom-op dispatch is for tracing, and costs more than a decode kernel
    op = torch.ops.gift_quant.mixed_linear if torch.compiler.is_compiling() else _forward
    return op(x, p.qweight, p.perm, p.gidx, p.scales, p.zeros, sw, layer.salient_idx.to(torch.int32).contiguous(),
              b, layer.bits, layer.in_features, layer.out_features, gemv_max_tokens, p.chunk_uniform)
