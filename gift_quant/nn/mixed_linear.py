"""Inference Linear: a packed low-bit base plus FP16 salient input columns.

    y = x @ dequant(qweight)^T + x[:, salient_idx] @ salient_weight^T (+ bias)

The salient slots of the base hold the zero-point, so they dequantize to exactly 0 and the base alone
is a valid GPTQ v2 tensor set. Buffer names equal the checkpoint keys (README, checkpoint format).
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.packing import pack_qweight, pack_qzeros, packed_len, unpack_qweight, unpack_qzeros
from ..core.quantizer import n_groups
from .route import mixed_linear_forward


class MixedPrecisionLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, n_salient: int,
                 bias: bool = False, dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.n_salient = bits, group_size, n_salient
        G = n_groups(in_features, group_size)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(packed_len(in_features, bits), out_features,
                                                    dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(G, packed_len(out_features, bits), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=dtype, **kw))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        self.register_buffer("salient_idx", torch.zeros(n_salient, dtype=torch.int32, **kw))
        # a Parameter so training recipes and Trainer can update it; frozen by default
        self.salient_weight = nn.Parameter(torch.zeros(out_features, n_salient, dtype=dtype, **kw),
                                           requires_grad=False)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw))
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, qw, bias: torch.Tensor | None = None, group_size: int = -1,
                       dtype: torch.dtype = torch.float16) -> "MixedPrecisionLinear":
        """Pack a :class:`gift_quant.core.gptq.QuantizedWeight`."""
        out_f, in_f = qw.codes.shape
        m = cls(in_f, out_f, qw.bits, group_size, qw.salient_idx.numel(), bias is not None, dtype)
        m.qweight.copy_(pack_qweight(qw.codes.round().to(torch.int32).cpu(), qw.bits))
        m.qzeros.copy_(pack_qzeros(qw.zeros.round().to(torch.int32).cpu(), qw.bits))
        m.scales.copy_(qw.scales.to(dtype))
        m.g_idx.copy_(qw.g_idx.to(torch.int32))
        m.salient_idx.copy_(qw.salient_idx.to(torch.int32))
        m.salient_weight.data.copy_(qw.salient_weight.to(dtype))
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype))
        return m

    @classmethod
    @torch.no_grad()
    def random(cls, in_features: int, out_features: int, bits: int, group_size: int = 128, n_salient: int = 0,
               bias: bool = False, act_order: bool = False, dtype: torch.dtype = torch.float16,
               seed: int = 0, salient_idx=None) -> "MixedPrecisionLinear":
        """A valid layer with random codes, scales, zeros and FP16 columns (kernel tests, speed benchmarks
        of model shapes; never for accuracy claims). ``salient_idx`` places the FP16 columns (default:
        ``n_salient`` random ones)."""
        gen = torch.Generator().manual_seed(seed)
        K, N = in_features, out_features
        G = n_groups(K, group_size)
        gs = group_size if group_size > 0 else K
        order = torch.randperm(K, generator=gen) if act_order else torch.arange(K)
        g_idx = torch.empty(K, dtype=torch.long)
        g_idx[order] = torch.arange(K) // gs
        codes = torch.randint(0, 2 ** bits, (N, K), generator=gen)
        zeros = torch.randint(0, 2 ** bits, (G, N), generator=gen)
        scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.002)
        if salient_idx is None:
            sal = torch.randperm(K, generator=gen)[:n_salient].sort().values
        else:
            sal = torch.tensor(sorted(salient_idx), dtype=torch.long)
            n_salient = sal.numel()
        codes[:, sal] = zeros[g_idx[sal]].t()
        m = cls(K, N, bits, group_size, n_salient, bias, dtype)
        m.qweight.copy_(pack_qweight(codes.to(torch.int32), bits))
        m.qzeros.copy_(pack_qzeros(zeros.to(torch.int32), bits))
        m.scales.copy_(scales.to(dtype))
        m.g_idx.copy_(g_idx.to(torch.int32))
        m.salient_idx.copy_(sal.to(torch.int32))
        m.salient_weight.data.copy_((torch.randn(N, n_salient, generator=gen) * 0.05).to(dtype))
        if bias:
            m.bias.copy_((torch.randn(N, generator=gen) * 0.1).to(dtype))
        return m

    def codes(self) -> torch.Tensor:
        """Integer codes [out, in]."""
        return unpack_qweight(self.qweight, self.bits, self.in_features).t()

    def zeros(self) -> torch.Tensor:
        """Integer zero-points [G, out]."""
        return unpack_qzeros(self.qzeros, self.bits, self.out_features)

    def dequantize_base(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The low-bit base [out, in]; salient slots are 0."""
        g = self.g_idx.long()
        codes = self.codes().to(dtype)
        z = self.zeros()[g].t().to(dtype)
        s = self.scales[g].t().to(dtype)
        return s * (codes - z)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full effective weight [out, in] (base with the salient columns written in)."""
        w = self.dequantize_base(dtype)
        if self.n_salient:
            w[:, self.salient_idx.long()] = self.salient_weight.to(dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixed_linear_forward(x, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, n_salient={self.n_salient}, bias={self.bias is not None}")
