"""Dispatch for the mixed-precision linear.

On CUDA with fp16/bf16 activations the fused kernel runs (``csrc/mixed_linear.cu``, built on first use,
self-checked once per bit width and dtype against a float64 reference). Everywhere else, or with
``GIFT_QUANT_KERNEL=off``, or when the build fails (one warning), the plain PyTorch path runs.
Training with a trainable ``salient_weight`` always takes the PyTorch path, so gradients reach only the
FP16 columns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import build

_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CACHE_ATTR = "_gift_cuda_prepared"


def mixed_linear_reference(x: torch.Tensor, layer) -> torch.Tensor:
    """Dequantize the base, write the salient columns in, one matmul. Exact in the layer's math."""
    w = layer.dequantize_base(x.dtype)
    if layer.n_salient:
        w[:, layer.salient_idx.long()] = layer.salient_weight.to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w, bias)


def _key(layer, dtype):
    return (layer.qweight.device, dtype, layer.qweight._version, layer.scales._version, layer.g_idx._version,
            layer.qzeros._version, layer.salient_idx._version)


def cuda_args(layer, dtype: torch.dtype):
    """(prepared layout, salient weight, salient idx, bias) for the kernel, or None for the PyTorch path."""
    cached = layer.__dict__.get(_CACHE_ATTR)
    if torch.compiler.is_compiling():  # no side effects while tracing: use what eager prepared
        return cached[1] if cached is not None and cached[0][1] == dtype else None
    if build.extension() is None:
        return None
    from .ops import self_check
    if not self_check(layer.bits, dtype, layer.qweight.device):
        return None
    key = _key(layer, dtype)
    if cached is None or cached[0] != key:
        from .prepare import prepare
        cached = (key, prepare(layer, dtype))
        layer.__dict__[_CACHE_ATTR] = cached
    return cached[1]


def prepare_model(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Build the kernel layout of every MixedPrecisionLinear now (before torch.compile). Returns the
    number of layers that will use the CUDA kernel."""
    from ..nn.mixed_linear import MixedPrecisionLinear
    n = 0
    for m in model.modules():
        if isinstance(m, MixedPrecisionLinear) and m.qweight.is_cuda:
            if cuda_args(m, dtype or m.scales.dtype) is not None:
                n += 1
    return n


def mixed_linear(x: torch.Tensor, layer) -> torch.Tensor:
    if layer.salient_weight.requires_grad and torch.is_grad_enabled():
        # gradient flows to salient_weight only through x[..., idx]; never a dense weight grad
        w = layer.dequantize_base(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        y = F.linear(x, w, bias)
        if layer.n_salient:
            y = y + F.linear(x[..., layer.salient_idx.long()], layer.salient_weight.to(x.dtype))
        return y
    if (x.is_cuda and x.dtype in _CUDA_DTYPES and not build.disabled_by_env()
            and not (x.requires_grad and torch.is_grad_enabled())):
        p = cuda_args(layer, x.dtype)
        if p is not None:
            return ops.run_op(x, layer, p)
    return mixed_linear_reference(x, layer)


from . import ops  # noqa: E402,F401  (registers torch.ops.gift_quant.mixed_linear)
