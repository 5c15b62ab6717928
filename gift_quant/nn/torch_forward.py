"""The PyTorch path: any device and dtype, autograd to ``salient_weight`` and x, never a dense weight grad."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .env import torch_cache_env
from .layout_cache import dequantized_base, prepared


def torch_cache_enabled() -> bool:
    """``GIFT_QUANT_TORCH_CACHE=1``: the PyTorch path keeps each layer's dequantized base (dense memory,
    dense speed); off by default, so a compressed model stays compressed in memory."""
    raw = torch_cache_env()
    return raw is not None and os.environ.get("GIFT_QUANT_TORCH_CACHE", "0").strip() not in ("", "0", "false", "no")


def torch_forward(x: torch.Tensor, layer) -> torch.Tensor:
    """The PyTorch path (any device, autograd to ``salient_weight`` and x, never a dense weight grad)."""
    if torch_cache_enabled():
        wt = prepared(layer, "torch", x.dtype)
    else:
        wt = dequantized_base(layer, x.dtype)
    y = x @ wt
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    if layer.salient_idx.numel():
        y = y + F.linear(x[..., layer.salient_idx.long()], layer.salient_weight.to(x.dtype))
    return y
