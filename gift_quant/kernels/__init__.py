"""Dispatch for the mixed-precision linear. The CUDA kernel is a separate issue; this is the
plain-PyTorch path that runs everywhere (CPU in fp32/bf16/fp16, and CUDA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mixed_linear_reference(x: torch.Tensor, layer) -> torch.Tensor:
    """Dequantize the base, write the salient columns in, one matmul. Exact in the layer's math."""
    w = layer.dequantize_base(x.dtype)
    if layer.n_salient:
        w[:, layer.salient_idx.long()] = layer.salient_weight.to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w, bias)


def mixed_linear(x: torch.Tensor, layer) -> torch.Tensor:
    if layer.salient_weight.requires_grad and torch.is_grad_enabled():
        # gradient flows to salient_weight only through x[..., idx]; never a dense weight grad
        w = layer.dequantize_base(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        y = F.linear(x, w, bias)
        if layer.n_salient:
            y = y + F.linear(x[..., layer.salient_idx.long()], layer.salient_weight.to(x.dtype))
        return y
    return mixed_linear_reference(x, layer)
