"""Salient-column selection with the generalized sensitivity metric of GIFT-SW.

    s_j = ||D_j||_tau * ||X_j||_rho ** gamma

D_j is column j of the quantization error W - Q(W) at the target bits (``weight="error"``), of the raw
weight (``weight="raw"``), or a constant (``weight="none"``: activation norm only); X_j is column j of
the calibration inputs. Norms are taken over output rows (D) and over tokens (X).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gift_quant.errors import GiftError
from gift_quant.core.quantizer import rtn

NORMS = {"1": 1.0, "2": 2.0, "inf": math.inf}
GAMMAS = (0.5, 1.0, 2.0)
WEIGHT_MODES = ("error", "raw", "none")


@dataclass(frozen=True)
class Metric:
    tau: float = math.inf
    rho: float = math.inf
    gamma: float = 1.0
    weight: str = "error"

    def __post_init__(self):
        if self.tau not in NORMS.values():
            raise GiftError(f"metric tau must be one of 1, 2, inf, got {self.tau}")
        if self.rho not in NORMS.values():
            raise GiftError(f"metric rho must be one of 1, 2, inf, got {self.rho}")
        if self.gamma not in GAMMAS:
            raise GiftError(f"metric gamma must be one of 0.5, 1, 2, got {self.gamma}")
        if self.weight not in WEIGHT_MODES:
            raise GiftError(f"metric weight must be one of {WEIGHT_MODES}, got {self.weight!r}")


PRESETS = {
    # GIFT-SW paper default: max-norm of the quantization error times max-abs activation
    "gift": Metric(tau=math.inf, rho=math.inf, gamma=1.0, weight="error"),
    # OWQ/OBD: lambda_j ||dW_j||^2 with lambda_j = H_jj ~ ||X_j||_2^2; same ranking as this l2 form
    "owq": Metric(tau=2.0, rho=2.0, gamma=1.0, weight="error"),
    # Wanda: sum_i |W_ij| * ||X_j||_2
    "wanda": Metric(tau=1.0, rho=2.0, gamma=1.0, weight="raw"),
    # QUIK / SmoothQuant-style outlier features: activation norm only
    "quik": Metric(tau=2.0, rho=2.0, gamma=1.0, weight="none"),
}


def parse_norm(v) -> float:
    s = str(v).strip().lower()
    if s in ("inf", "infinity", "max"):
        return math.inf
    try:
        f = float(s)
    except ValueError:
        raise GiftError(f"norm must be 1, 2 or inf, got {v!r}") from None
    if f not in (1.0, 2.0):
        raise GiftError(f"norm must be 1, 2 or inf, got {v!r}")
    return f


def resolve_metric(name: str = "gift", tau=None, rho=None, gamma=None, weight=None) -> Metric:
    if name not in PRESETS:
        raise GiftError(f"unknown metric {name!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[name]
    return Metric(tau=base.tau if tau is None else parse_norm(tau),
                  rho=base.rho if rho is None else parse_norm(rho),
                  gamma=base.gamma if gamma is None else float(gamma),
                  weight=base.weight if weight is None else weight)


class ActivationStats:
    """Running per-column input statistics of one Linear: the Hessian 2/n X^T X and ||X_j||_1/2/inf."""

    def __init__(self, in_features: int, device="cpu", dtype=torch.float32):
        self.n = 0
        self.xtx = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.abs_sum = torch.zeros(in_features, device=device, dtype=dtype)
        self.abs_max = torch.zeros(in_features, device=device, dtype=dtype)

    def add(self, x: torch.Tensor):
        x = x.detach().reshape(-1, x.shape[-1]).to(self.xtx.dtype)
        self.n += x.shape[0]
        self.xtx.addmm_(x.t(), x)
        a = x.abs()
        self.abs_sum += a.sum(0)
        self.abs_max = torch.maximum(self.abs_max, a.amax(0))

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.n, 1))

    def norm(self, rho: float) -> torch.Tensor:
        if rho == 1.0:
            return self.abs_sum
        if rho == 2.0:
            return torch.sqrt(torch.diag(self.xtx).clamp_min(0))
        return self.abs_max


def column_norm(D: torch.Tensor, tau: float) -> torch.Tensor:
    """||D_j||_tau over rows for every column j of D [out, in]."""
    if tau == math.inf:
        return D.abs().amax(0)
    return torch.linalg.vector_norm(D, ord=tau, dim=0)


def weight_term(W: torch.Tensor, metric: Metric, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    if metric.weight == "none":
        return torch.ones(W.shape[1], dtype=W.dtype)
    if metric.weight == "raw":
        return column_norm(W, metric.tau)
    codes, scales, zeros, gid = rtn(W, bits, group_size, sym)
    Q = scales[gid].t() * (codes - zeros[gid].t())
    return column_norm(W - Q, metric.tau)


def sensitivity(W: torch.Tensor, act_norm: torch.Tensor, metric: Metric, bits: int,
                group_size: int = -1, sym: bool = False) -> torch.Tensor:
    """s_j for every input column of W [out, in]."""
    W = W.detach().float().cpu()
    return weight_term(W, metric, bits, group_size, sym) * act_norm.float().cpu().pow(metric.gamma)


def select_salient(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (sorted) of the k highest scores."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    if k > scores.numel():
        raise GiftError(f"salient count {k} is larger than the layer's {scores.numel()} input columns")
    return torch.topk(scores, k).indices.sort().values
