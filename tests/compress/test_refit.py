"""Refit of the FP16 columns towards the float model's outputs (gift_quant/compress/refit.py)."""
import copy

import pytest
import torch
from torch import nn

from gift_quant import GiftConfig
from gift_quant.compress.api import quantize_
from gift_quant.compress.refit import refit_layer
from gift_quant.nn import MixedPrecisionLinear

from tests.conftest import tiny_llama


class _One(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, h):
        return self.lin(h)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_is_the_float64_least_squares_solution(seed):
    """S^T = argmin ||X_fp W^T - X_q B^T - X_q[:, idx] S^T||, against torch.linalg.lstsq in float64."""
    g = torch.Generator().manual_seed(seed)
    K, N, k = 48, 20, 6
    packed = MixedPrecisionLinear.random(K, N, 2, 16, k, dtype=torch.float32, seed=seed)
    W = torch.randn(N, K, generator=g)
    fp = _One(nn.Linear(K, N, bias=False))
    fp.lin.weight.data.copy_(W)
    q = _One(nn.Linear(K, N, bias=False))
    q.lin.weight.data.copy_(packed.dequantize(torch.float32))
    xf = [torch.randn(3, 7, K, generator=g) for _ in range(4)]
    xq = [x + 0.3 * torch.randn(x.shape, generator=g) for x in xf]
    outs = refit_layer(q, fp, {"lin": q.lin}, {"lin": packed}, [(x, {}) for x in xq], [(x, {}) for x in xf], 1e-12)
    for o, x in zip(outs, xf, strict=True):  # the float layer's outputs: the next layer's float inputs
        torch.testing.assert_close(o, fp(x))
    Xf, Xq = torch.cat(xf).reshape(-1, K).double(), torch.cat(xq).reshape(-1, K).double()
    idx = packed.salient_idx.long()
    B = packed.dequantize_base(torch.float64)
    ref = torch.linalg.lstsq(Xq[:, idx], Xf @ W.double().t() - Xq @ B.t()).solution.t()
    torch.testing.assert_close(packed.salient_weight.double(), ref, rtol=1e-4, atol=1e-5)
    # the Linear the next stage sees carries the refit columns
    torch.testing.assert_close(q.lin.weight.data, packed.dequantize(torch.float32))


def test_refit_brings_a_tiny_llama_closer_to_float(calib):
    """On the calibration text, the refit model's logits are closer to the float model's."""
    ref = tiny_llama()
    with torch.no_grad():
        target = ref(calib).logits
    err = {}
    for refit in (0.0, 1.0):
        m = copy.deepcopy(ref)
        quantize_(m, GiftConfig(bits=2, group_size=32, n_salient=8, salient_refit=refit), dataset=calib,
                  progress=False)
        assert m.config.quantization_config.salient_refit == refit
        with torch.no_grad():
            err[refit] = (m(calib).logits - target).pow(2).mean().item()
    assert err[1.0] < 0.95 * err[0.0], err  # measured 0.88


def test_refit_towards_the_quantized_inputs_is_gptqs_own_solution(calib):
    """alpha -> 0 targets X_q W^T: GPTQ already left the FP16 columns at that optimum (they are quantized last
    and take the whole compensation). On the first stage (q/k/v see the same inputs either way) the refit
    moves them by rounding only; later stages see inputs after quantization, so they move more."""
    cols = {}
    for refit in (0.0, 1e-9):
        m = tiny_llama()
        quantize_(m, GiftConfig(bits=2, group_size=32, n_salient=8, salient_refit=refit), dataset=calib,
                  progress=False)
        cols[refit] = m.model.layers[0].self_attn.q_proj.salient_weight.float()
    rel = ((cols[1e-9] - cols[0.0]).norm() / cols[0.0].norm()).item()
    assert rel < 0.01, rel  # measured 0.003 (fp16 storage); a ridge towards 0 instead gave 0.01
