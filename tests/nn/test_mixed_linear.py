"""MixedPrecisionLinear against a float64 reference that reads the packed tensors bit by bit, independently
of :mod:`gift_quant.core.packing`: the forward (random layers and compressed ones, fp32/fp16/bf16),
``dequantize`` and ``from_quantized``."""
import pytest
import torch

from gift_quant.compress.pipeline import compress_model
from gift_quant.config import GiftConfig
from gift_quant.core.gptq import QuantizedWeight
from gift_quant.nn import MixedPrecisionLinear


def _bitstream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 words [w, m] read as one LSB-first bit stream per column -> codes [n, m] (int64)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(n, w.shape[1], dtype=torch.int64)
    for r in range(n):
        for b in range(bits):
            pos = r * bits + b
            out[r] |= ((w[pos // 32] >> (pos % 32)) & 1) << b
    return out


def reference_weight(m: MixedPrecisionLinear) -> torch.Tensor:
    """The effective weight [out, in] in float64: scale * (code - zero) per group, FP16 columns written in."""
    codes = _bitstream(m.qweight, m.bits, m.in_features).t()                  # [out, in]
    zeros = _bitstream(m.qzeros.t(), m.bits, m.out_features).t()             # [G, out]
    g = m.g_idx.long()
    w = m.scales.double()[g].t() * (codes.double() - zeros.double()[g].t())
    w[:, m.salient_idx.long()] = m.salient_weight.detach().double()
    return w


CASES = [(2, 32, 0, False, False), (3, 32, 5, True, True), (4, -1, 3, False, True), (8, 32, 4, True, False),
         (3, 64, 0, True, True)]


@pytest.mark.parametrize("bits,group_size,k,act_order,bias", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_float64_reference(bits, group_size, k, act_order, bias, dtype):
    m = MixedPrecisionLinear.random(96, 40, bits, group_size, k, bias=bias, act_order=act_order, dtype=dtype,
                                    seed=bits * 7 + k)
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(k)).to(dtype)
    W = reference_weight(m)
    ref = x.double() @ W.t() + (m.bias.double() if bias else 0)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (3, 5, 40) and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    assert torch.allclose(m.dequantize(torch.float64), W, rtol=0, atol=1e-12)


def _compressed(model, calib):
    compress_model(model, calib, GiftConfig(bits=3, group_size=32, n_salient=5, salient_ratio=None), progress=False)
    return model


def test_salient_slots_dequantize_to_zero(tiny_model, calib):
    m = _compressed(tiny_model, calib)
    for x in m.modules():
        if isinstance(x, MixedPrecisionLinear):
            assert torch.all(x.dequantize_base()[:, x.salient_idx.long()] == 0)


def test_forward_dtypes_on_cpu(tiny_model, calib):
    m = _compressed(tiny_model, calib)
    lin = m.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 64)
    ref = x.double() @ lin.dequantize(torch.float64).t()
    for dt, tol in [(torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)]:
        y = lin(x.to(dt)).double()
        assert (y - ref).abs().max() / ref.abs().max() < tol, dt


def test_from_quantized_packs_what_it_is_given():
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, bits, gs = 24, 64, 4, 32
    g_idx = torch.arange(in_f) // gs
    codes = torch.randint(0, 16, (out_f, in_f), generator=gen).float()
    zeros = torch.randint(0, 16, (2, out_f), generator=gen).float()
    scales = torch.rand(2, out_f, generator=gen) * 0.01 + 0.001
    sal = torch.tensor([3, 40])
    codes[:, sal] = zeros[g_idx[sal]].t()
    qw = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, salient_idx=sal,
                         salient_weight=torch.randn(out_f, 2, generator=gen), bits=bits)
    m = MixedPrecisionLinear.from_quantized(qw, bias=torch.ones(out_f), group_size=gs, dtype=torch.float32)
    W = scales[g_idx].t().double() * (codes.double() - zeros[g_idx].t().double())
    W[:, sal] = qw.salient_weight.double()
    assert torch.allclose(reference_weight(m), W, atol=1e-7)
    assert torch.equal(m.bias, torch.ones(out_f))
