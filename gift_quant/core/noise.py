"""Quantization noise injection (QNI) for GIFT-SW training.

The noise simulates the quantizer that will actually run, per quantization group: with Delta_g the
step of group g (its scale: one code apart), column j of group g(j) of row i gets noise of std
sigma = Delta_{i,g(j)} / 2.

- ``pre`` (FP base, GPTQ later): Delta comes from the project's own quantizer
  (:func:`gift_quant.core.quantizer.fit_params`) at the run's bits, group size, sym/asym and MSE clip search,
  fitted on the non-salient columns of each static group (j // group_size) of the weight being trained.
- ``post`` (frozen GPTQ codes): Delta is the stored fp16 scale of each group, as packed.

Why Delta/2 and not a row maximum over 2^(b-1)-1: the row maximum of asymmetric group codes is 1.2-2x
the real step at 2 bits and the noise then drowns the signal.

Kinds:
- ``gaussian`` (the paper's): N(0, (Delta/2)^2).
- ``uniform``: U[-Delta/2, Delta/2], the distribution of a rounding error (std Delta/sqrt(12)).
- ``none``: no noise.

Noise is drawn from an explicit seed so the backward pass regenerates exactly the forward's perturbed
weight instead of storing a second weight-sized tensor.
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
def group_step(W: torch.Tensor, bits: int, group_size: int, sym: bool, salient_idx: torch.Tensor | None = None,
               mse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(Delta [out, G], g_idx [in]): the quantizer's step per static group of ``W`` [out, in].

    Each group's scale is fitted by :func:`gift_quant.core.quantizer.fit_params` on its non-salient columns
    (the same fit GPTQ and RTN use); a group made only of salient columns keeps step 0 (no noise).
    """
    from gift_quant.core.quantizer import SUPPORTED_BITS, fit_params, group_ids, n_groups
    if bits not in SUPPORTED_BITS:
        raise GiftError(f"noise bits must be one of {SUPPORTED_BITS}, got {bits}")
    W = W.detach().float()
    out_f, in_f = W.shape
    gid = group_ids(in_f, group_size).to(W.device)
    keep = torch.ones(in_f, dtype=torch.bool, device=W.device)
    if salient_idx is not None and salient_idx.numel():
        keep[salient_idx.long().to(W.device)] = False
    G = n_groups(in_f, group_size)
    gs = in_f if group_size <= 0 else group_size
    # all groups in one fit: rows x groups become rows. A zero entry never changes the fit (the range
    # always includes 0, and 0 is coded exactly), so salient columns and the last group's padding are 0.
    Wp = torch.zeros(out_f, G * gs, device=W.device)
    Wp[:, :in_f] = W * keep
    s, _ = fit_params(Wp.view(out_f * G, gs), bits, sym, mse)
    delta = s.view(out_f, G)
    has_cols = torch.zeros(G, dtype=torch.bool, device=W.device).index_fill_(0, gid[keep], True)
    return delta * has_cols, gid


def stored_step(scales: torch.Tensor, g_idx: torch.Tensor, bits: int, noise_bits: int | None = None):
    """(Delta [out, G], g_idx [in]) of packed codes: the stored scales [G, out] themselves.

    With ``noise_bits`` != ``bits`` the same group range is split into 2^noise_bits - 1 steps instead.
    """
    from gift_quant.core.quantizer import max_code
    delta = scales.detach().float().t().contiguous()
    if noise_bits and noise_bits != bits:
        delta = delta * (max_code(bits) / max_code(noise_bits))
    return delta, g_idx.detach().long()


def sample(shape, delta: torch.Tensor, g_idx: torch.Tensor, kind: str, seed: int, device, dtype) -> torch.Tensor:
    """Noise [out, in] for group steps ``delta`` [out, G] and column groups ``g_idx`` [in], from ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    step = delta.to(device=device, dtype=dtype)[:, g_idx.to(device)]
    if kind == "gaussian":
        return torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(step.mul_(0.5))
    if kind == "uniform":
        return torch.rand(shape, generator=g, device=device, dtype=dtype).sub_(0.5).mul_(step)
    raise GiftError(f"no noise to sample for kind {kind!r}")


def expected_std(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """Std of the noise for steps ``delta`` (any shape)."""
    if kind == "gaussian":
        return delta / 2
    if kind == "uniform":
        return delta / 12 ** 0.5
    return torch.zeros_like(delta)
