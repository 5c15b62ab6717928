"""Uniform min-max quantizer (GPTQ convention): per row or per group, sym/asym, optional MSE clip search.

Codes are integers in [0, 2^bits - 1]; dequantization is ``scale * (code - zero)``. Scales are rounded
to fp16 when fitted, so what the solver sees is exactly what the checkpoint stores.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def _minmax_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool):
    maxq = max_code(bits)
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    # fp16 storage: round now (and keep it strictly positive) so solver and checkpoint agree
    scale = scale.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny).to(xmin.dtype)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (same float dtype as w) for w with per-row ``scale``/``zero`` broadcast on dim 1."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, bits), scale, zero)


def fit_params(w: torch.Tensor, bits: int, sym: bool, mse: bool = False, grid: int = 50,
               max_shrink: float = 0.8, norm: float = 2.4):
    """Per-row (scale, zero), each [rows, 1], from the columns of ``w`` [rows, cols].

    With ``mse`` the range is shrunk on a grid and the per-row shrink minimising ||w - Q(w)||_norm is
    kept (the clip search of the reference GPTQ code).
    """
    xmin = w.amin(dim=1, keepdim=True)
    xmax = w.amax(dim=1, keepdim=True)
    scale, zero = _minmax_params(xmin, xmax, bits, sym)
    if not mse:
        return scale, zero
    best = (fake_quant(w, scale, zero, bits) - w).abs().pow(norm).sum(1, keepdim=True)
    for i in range(1, int(max_shrink * grid) + 1):
        p = 1.0 - i / grid
        s1, z1 = _minmax_params(p * xmin, p * xmax, bits, sym)
        err = (fake_quant(w, s1, z1, bits) - w).abs().pow(norm).sum(1, keepdim=True)
        better = err < best
        if better.any():
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale, zero


def group_ids(in_features: int, group_size: int) -> torch.Tensor:
    """Static group of each input column: ``j // group_size`` (all 0 for per-row, group_size <= 0)."""
    if group_size <= 0:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // group_size


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size <= 0 else -(-in_features // group_size)


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool = False,
        columns: torch.Tensor | None = None):
    """Round-to-nearest with static groups. Returns (codes, scales [G,out], zeros [G,out], g_idx).

    ``columns`` (bool [in]) restricts which columns the params are fitted on (the non-salient ones);
    all columns are still coded.
    """
    out_f, in_f = w.shape
    gid = group_ids(in_f, group_size)
    G = n_groups(in_f, group_size)
    scales = torch.ones(G, out_f, dtype=w.dtype)
    zeros = torch.full((G, out_f), float((max_code(bits) + 1) // 2), dtype=w.dtype)
    codes = torch.empty_like(w)
    for g in range(G):
        cols = gid == g
        fit_cols = cols if columns is None else cols & columns
        if fit_cols.any():
            s, z = fit_params(w[:, fit_cols], bits, sym, mse)
            scales[g], zeros[g] = s[:, 0], z[:, 0]
        codes[:, cols] = quantize(w[:, cols], scales[g][:, None], zeros[g][:, None], bits)
    return codes, scales, zeros, gid
