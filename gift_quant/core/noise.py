"""Quantization noise injection (QNI) for GIFT-SW training.

For row i of a weight, with target (noise) bits b:

    alpha_i = clip-searched max |w_ij| over the NON-salient columns j (symmetric MSE clip search,
              the same search the quantizer uses, per row)
    Delta_i = alpha_i / (2^(b-1) - 1)          the step of a symmetric b-bit grid on [-alpha_i, alpha_i]
    sigma_i = Delta_i / 2

Kinds:
- ``gaussian`` (default, the paper's): N(0, sigma_i^2), i.e. std Delta_i / 2.
- ``uniform``: U[-Delta_i/2, Delta_i/2], the distribution of a rounding error on that grid
  (std Delta_i / sqrt(12), smaller than the Gaussian's). Chosen over "uniform with the same std"
  because it is what rounding actually does; the Gaussian is the paper's deliberate over-estimate.
- ``none``: no noise (the ablation).

Noise is drawn from an explicit seed so the backward pass regenerates exactly the forward's
perturbed weight instead of storing a second weight-sized tensor.
"""
from __future__ import annotations

import torch

from gift_quant.errors import GiftError

NOISE_KINDS = ("gaussian", "uniform", "none")


def check_kind(kind: str) -> str:
    if kind not in NOISE_KINDS:
        raise GiftError(f"noise must be one of {', '.join(NOISE_KINDS)}, got {kind!r}")
    return kind


@torch.no_grad()
def row_step(W: torch.Tensor, bits: int, salient_idx: torch.Tensor | None = None, mse: bool = True,
             grid: int = 20, max_shrink: float = 0.8, sample_cols: int = 256) -> torch.Tensor:
    """Delta_i [out] from the non-salient columns of ``W`` [out, in].

    alpha_i starts at max |w_ij|; with ``mse`` it is shrunk on a ``grid`` (steps of 1/grid down to
    1 - max_shrink) to the value minimising the squared error of symmetric b-bit rounding. The error
    is measured on a fixed subset of ``sample_cols`` columns (all when fewer) to keep this cheap on
    large layers; the maximum is always taken over all non-salient columns. Without ``mse`` (used for
    ``post``, whose base is already clip-searched codes) alpha_i is the plain row max.
    """
    if bits < 2:
        raise GiftError(f"noise bits must be >= 2, got {bits}")
    W = W.detach().float()
    if salient_idx is not None and salient_idx.numel():
        mask = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
        mask[salient_idx.long().to(W.device)] = False
        W = W[:, mask]
    if W.shape[1] == 0:
        return torch.zeros(W.shape[0], device=W.device)
    levels = 2 ** (bits - 1) - 1
    amax = W.abs().amax(dim=1)
    alpha = amax.clone()
    if mse:
        if W.shape[1] > sample_cols:
            g = torch.Generator().manual_seed(0)
            cols = torch.randperm(W.shape[1], generator=g)[:sample_cols].to(W.device)
            Ws = W[:, cols]
        else:
            Ws = W
        best = None
        for i in range(int(max_shrink * grid) + 1):
            a = amax * (1 - i / grid)
            step = (a / levels).clamp_min(1e-12)[:, None]
            err = (torch.clamp(torch.round(Ws / step), -levels - 1, levels) * step - Ws).square().sum(1)
            if best is None:
                best = err
                continue
            better = err < best
            best = torch.where(better, err, best)
            alpha = torch.where(better, a, alpha)
    return alpha / levels


def sample(shape, delta: torch.Tensor, kind: str, seed: int, device, dtype) -> torch.Tensor:
    """Noise [out, in] for per-row steps ``delta`` [out], reproducible from ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    if kind == "gaussian":
        n = torch.randn(shape, generator=g, device=device, dtype=dtype)
        return n.mul_((delta / 2).to(dtype)[:, None])
    if kind == "uniform":
        n = torch.rand(shape, generator=g, device=device, dtype=dtype).sub_(0.5)
        return n.mul_(delta.to(dtype)[:, None])
    raise GiftError(f"no noise to sample for kind {kind!r}")


def expected_std(delta: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gaussian":
        return delta / 2
    if kind == "uniform":
        return delta / 12 ** 0.5
    return torch.zeros_like(delta)
