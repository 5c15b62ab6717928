import math

import pytest
import torch

from gift_quant.errors import GiftError
from gift_quant.core.quantizer import rtn
from gift_quant.core.saliency import PRESETS, ActivationStats, Metric, resolve_metric, select_salient, sensitivity


def _hand_norm(values, p):
    if p == math.inf:
        return max(abs(v) for v in values)
    return sum(abs(v) ** p for v in values) ** (1 / p)


@pytest.mark.parametrize("tau", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("rho", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("weight", ["error", "raw", "none"])
def test_metric_against_hand_computation(tau, rho, gamma, weight):
    g = torch.Generator().manual_seed(int(tau if tau < 9 else 9) * 100 + int(rho if rho < 9 else 9) * 10 + int(gamma * 2))
    W = torch.randn(6, 9, generator=g, dtype=torch.float64)
    X = torch.randn(13, 9, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 9, dtype=torch.float64)
    st = ActivationStats(9, dtype=torch.float64)
    st.add(X[:7])
    st.add(X[7:])  # accumulation over batches
    m = Metric(tau=tau, rho=rho, gamma=gamma, weight=weight)
    got = sensitivity(W, st.norm(rho), m, bits=3, group_size=-1)
    codes, scales, zeros, gid = rtn(W.float(), 3, -1, False)
    Q = (scales[gid].t() * (codes - zeros[gid].t())).double()
    for j in range(9):
        col = {"error": (W - Q)[:, j], "raw": W[:, j], "none": None}[weight]
        d = 1.0 if col is None else _hand_norm(col.tolist(), tau)
        x = _hand_norm(X[:, j].tolist(), rho)
        assert got[j].item() == pytest.approx(d * x ** gamma, rel=1e-5)


def test_presets_and_overrides():
    assert resolve_metric("gift") == Metric(math.inf, math.inf, 1.0, "error")
    assert resolve_metric("owq").tau == 2.0 and resolve_metric("wanda").weight == "raw"
    assert resolve_metric("quik").weight == "none"
    assert resolve_metric("gift", tau="2", gamma=0.5) == Metric(2.0, math.inf, 0.5, "error")
    assert set(PRESETS) == {"gift", "owq", "wanda", "quik"}
    with pytest.raises(GiftError, match="unknown metric"):
        resolve_metric("magic")
    with pytest.raises(GiftError, match="gamma"):
        Metric(gamma=3.0)


def test_hessian_and_select():
    X = torch.randn(50, 4)
    st = ActivationStats(4)
    st.add(X)
    assert torch.allclose(st.hessian, 2 * X.T @ X / 50, atol=1e-5)
    assert select_salient(torch.tensor([0.1, 5.0, 0.3, 4.0]), 2).tolist() == [1, 3]
    assert select_salient(torch.tensor([1.0]), 0).numel() == 0
    with pytest.raises(GiftError, match="larger than"):
        select_salient(torch.ones(4), 5)
