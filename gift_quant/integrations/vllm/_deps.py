"""Every gift_quant import of the vLLM plugin, in one place (repoint here when modules move).

``mixed_linear_forward(x, layer)`` takes any object with the checkpoint attributes (qweight, qzeros,
scales, g_idx, salient_idx, salient_weight, bias, bits, group_size, in_features, out_features). Until
the project's dispatch (``gift_quant.nn.dispatch``) exists, a plain-PyTorch version of the same math
stands in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...config import QUANT_METHOD, GiftConfig  # noqa: F401
from ...errors import GiftError  # noqa: F401
from ...hf import _skip as skip_module  # noqa: F401  (the project's one modules_not_converted rule)
from ...packing import pack_qweight, pack_qzeros, packed_len, unpack_qweight, unpack_qzeros  # noqa: F401
from ...quant import SUPPORTED_BITS, n_groups  # noqa: F401

try:
    from ...nn.dispatch import mixed_linear_forward  # the project's op: CUDA/Triton kernel or PyTorch
except ImportError:
    def mixed_linear_forward(x: torch.Tensor, layer) -> torch.Tensor:
        """Dequantize the base in x's dtype, write the FP16 columns in, one matmul."""
        g = layer.g_idx.long()
        codes = unpack_qweight(layer.qweight, layer.bits, layer.in_features).to(x.dtype)  # [in, out]
        z = unpack_qzeros(layer.qzeros, layer.bits, layer.out_features)[g].to(x.dtype)  # [in, out]
        w = (codes - z) * layer.scales[g].to(x.dtype)
        if layer.salient_idx.numel():
            w[layer.salient_idx.long()] = layer.salient_weight.to(x.dtype).t()
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, w.t(), bias)
