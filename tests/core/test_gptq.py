import math

import pytest
import torch

from gift_quant.errors import GiftError
from gift_quant.core.gptq import gptq_quantize, layer_error, processing_order, rtn_quantize
from gift_quant.core.quantizer import dequantize, fit_params, quantize


def _problem(seed, out_f=24, in_f=70, n=400):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g, dtype=torch.float64) / math.sqrt(in_f)
    X = torch.randn(n, in_f, generator=g, dtype=torch.float64) @ (torch.eye(in_f, dtype=torch.float64) + 2 * mix)
    X = X * torch.rand(in_f, generator=g, dtype=torch.float64).mul(3).add(0.2)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * 0.1
    H = 2 * X.T @ X / n
    return W, H


def reference_gptq(W, H, bits, group_size, sym, desc_act, salient, damp=0.01, mse=True):
    """Textbook float64 GPTQ/OBQ: explicit inverse, eager updates, one column at a time."""
    W = W.clone()
    H = H.clone()
    out_f, in_f = W.shape
    perm = processing_order(H, salient, desc_act)
    n_q = in_f - salient.numel()
    W = W[:, perm]
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(out_f, in_f, dtype=W.dtype)
    if group_size > 0:
        gid = torch.arange(n_q) // group_size if desc_act else perm[:n_q] // group_size
    else:
        gid = torch.zeros(n_q, dtype=torch.long)
    s = z = None
    for p in range(n_q):
        if p == 0 or gid[p] != gid[p - 1]:
            cols = (gid == gid[p]).nonzero().flatten() if group_size > 0 else torch.arange(n_q)
            s, z = fit_params(W[:, cols], bits, sym, mse)
        q = quantize(W[:, p:p + 1], s, z, bits)
        codes[:, p] = q[:, 0]
        err = (W[:, p] - dequantize(q, s, z)[:, 0]) / Hinv[p, p]
        W[:, p + 1:] -= err[:, None] * Hinv[p, p + 1:][None, :]
        Hinv = Hinv - Hinv[:, p:p + 1] @ Hinv[p:p + 1, :] / Hinv[p, p]
    out_codes = torch.empty_like(codes)
    out_codes[:, perm] = codes
    return out_codes[:, perm[:n_q]], W[:, n_q:]


@pytest.mark.parametrize("bits,group_size,sym,desc_act,k", [
    (2, -1, False, False, 0), (3, 16, False, True, 5), (4, 16, True, False, 7), (4, -1, False, True, 3),
    (8, 32, False, True, 4), (2, 16, False, False, 9)])
def test_matches_float64_reference(bits, group_size, sym, desc_act, k):
    W, H = _problem(bits * 10 + k)
    sal = torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(k))[:k]
    qw = gptq_quantize(W, H, bits, group_size, sym, desc_act, sal, block_size=8)
    ref_codes, ref_sal = reference_gptq(W, H, bits, group_size, sym, desc_act, sal)
    perm = processing_order(H, sal, desc_act)
    n_q = W.shape[1] - k
    assert torch.equal(qw.codes[:, perm[:n_q]], ref_codes)
    assert torch.allclose(qw.salient_weight, ref_sal, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_error_not_above_rtn(bits, group_size):
    W, H = _problem(100 + bits)
    W, H = W.float(), H.float()
    sal = torch.topk(torch.diag(H), 4).indices
    g = gptq_quantize(W, H, bits, group_size, False, True, sal)
    r = rtn_quantize(W, bits, group_size, False, sal)
    assert layer_error(W, g.dequantize(), H) <= layer_error(W, r.dequantize(), H)


def test_salient_columns_compensated_and_zero_in_base():
    W, H = _problem(7)
    W, H = W.float(), H.float()
    sal = torch.tensor([3, 40, 41])
    qw = gptq_quantize(W, H, 3, 16, False, True, sal)
    base = qw.dequantize(with_salient=False)
    assert torch.all(base[:, sal] == 0)
    # error compensation moved the FP columns away from the original weights ...
    assert not torch.allclose(qw.salient_weight, W[:, sal])
    # ... and that made the layer better than keeping the original FP columns
    plain = qw.dequantize()
    plain[:, sal] = W[:, sal]
    assert layer_error(W, qw.dequantize(), H) < layer_error(W, plain, H)
    # keeping salient columns beats none at all
    assert layer_error(W, qw.dequantize(), H) < layer_error(W, gptq_quantize(W, H, 3, 16).dequantize(), H)


def test_scales_fitted_on_non_salient_only():
    W, H = _problem(8)
    W, H = W.float(), H.float()
    W[:, 5] = 100.0  # a huge salient column must not widen the quantization grid
    qw = gptq_quantize(W, H, 4, -1, False, False, torch.tensor([5]))
    assert qw.scales.max() < 1.0


def test_dead_columns_and_nan():
    W, H = _problem(9)
    W, H = W.float(), H.float()
    H[:, 2] = 0
    H[2, :] = 0
    qw = gptq_quantize(W, H, 4, -1)
    assert torch.all(qw.dequantize()[:, 2] == 0)
    W[0, 0] = float("nan")
    with pytest.raises(GiftError, match="NaN"):
        gptq_quantize(W, H, 4, -1, name="layers.0.q")


def test_non_pd_hessian_escalates_damping_with_warning():
    W, H = _problem(11)
    W, H = W.float(), H.float()
    n = H.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0)))
    eig = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.5
    eig[:3] = -0.3  # indefinite: 1% damping is not enough
    H = (Q * eig) @ Q.T
    with pytest.warns(UserWarning, match="layers.3.mlp.up_proj"):
        qw = gptq_quantize(W, H, 4, -1, name="layers.3.mlp.up_proj")
    assert torch.isfinite(qw.dequantize()).all()


def test_nan_activations_named(tiny_model, calib):
    from gift_quant.config import GiftConfig
    from gift_quant.compress.pipeline import compress_model
    tiny_model.model.layers[1].input_layernorm.weight.data[3] = float("inf")
    with pytest.raises(GiftError, match=r"model\.layers\.1\.self_attn\.q_proj.*NaN or Inf"):
        compress_model(tiny_model, calib, GiftConfig(bits=4, group_size=32), progress=False)
