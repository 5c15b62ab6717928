"""GPTQ (Frantar et al. 2023) that keeps a set of salient input columns in full precision.

Read against Algorithm 1 of the paper, with two changes (as in OWQ and QUIK):
- the salient columns are permuted last and never quantized, but they still receive the lazy
  error-compensation updates of every quantized column before them;
- quantizer scales are fitted on non-salient columns only.

Groups are contiguous runs in the processing order: with act-order (``desc_act``) every
``group_size`` columns of the descending-H-diagonal order form a group; without it, static groups
``j // group_size`` over the original index (salient members excluded). Blocks follow group
boundaries, so a group's scales are fitted on weights that already hold all earlier updates.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from gift_quant.errors import GiftError
from gift_quant.core.quantizer import dequantize, fit_params, max_code, n_groups, quantize


@dataclass
class QuantizedWeight:
    """What the solver hands to packing: codes in original column order plus the FP columns."""

    codes: torch.Tensor          # [out, in] integer-valued; salient slots hold the zero-point
    scales: torch.Tensor         # [G, out]
    zeros: torch.Tensor          # [G, out] integer-valued
    g_idx: torch.Tensor          # [in] long
    salient_idx: torch.Tensor    # [k] long, sorted
    salient_weight: torch.Tensor  # [out, k] error-compensated full-precision columns
    bits: int

    def dequantize(self, with_salient: bool = True) -> torch.Tensor:
        s = self.scales[self.g_idx].t()
        z = self.zeros[self.g_idx].t()
        w = dequantize(self.codes, s, z)
        if with_salient and self.salient_idx.numel():
            w[:, self.salient_idx] = self.salient_weight.to(w.dtype)
        return w


def inverse_cholesky(H: torch.Tensor, damp: float, name: str = "") -> torch.Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1, raising damping until H is positive definite."""
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt, d in enumerate([damp, damp * 10, damp * 100, 1.0, 10.0]):
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                if attempt:
                    warnings.warn(f"{name or 'layer'}: Hessian not positive definite, damping raised to {d:g}")
                return U
    raise GiftError(f"{name or 'layer'}: Hessian is not positive definite even with heavy damping "
                    "(calibration activations may be degenerate)")


def processing_order(H: torch.Tensor, salient_idx: torch.Tensor, desc_act: bool) -> torch.Tensor:
    n = H.shape[0]
    mask = torch.ones(n, dtype=torch.bool)
    mask[salient_idx] = False
    ns = torch.nonzero(mask).flatten()
    if desc_act:
        ns = ns[torch.argsort(torch.diag(H)[ns], descending=True, stable=True)]
    return torch.cat([ns, salient_idx.sort().values])


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False,
                  desc_act: bool = True, salient_idx: torch.Tensor | None = None, damp: float = 0.01,
                  block_size: int = 128, mse: bool = True, name: str = "") -> QuantizedWeight:
    """Quantize ``W`` [out, in] given the layer Hessian ``H`` [in, in] (2/n X^T X). Computes in W's dtype."""
    dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
    W = W.detach().to(dtype).clone()
    H = H.detach().to(dtype=dtype, device=W.device).clone()
    out_f, in_f = W.shape
    if salient_idx is None:
        salient_idx = torch.zeros(0, dtype=torch.long)
    salient_idx = salient_idx.to(torch.long).cpu().sort().values
    if not torch.isfinite(W).all():
        raise GiftError(f"{name or 'layer'}: weight contains NaN or Inf")
    if not torch.isfinite(H).all():
        raise GiftError(f"{name or 'layer'}: calibration activations contain NaN or Inf")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = processing_order(H.cpu(), salient_idx, desc_act).to(W.device)
    n_q = in_f - salient_idx.numel()
    if group_size > 0 and desc_act:
        gid_perm = torch.arange(n_q, device=W.device) // group_size
    elif group_size > 0:
        gid_perm = perm[:n_q] // group_size
    else:
        gid_perm = torch.zeros(n_q, dtype=torch.long, device=W.device)
    G = n_groups(in_f, group_size)

    W = W[:, perm]
    H = H[perm][:, perm]
    U = inverse_cholesky(H, damp, name)

    maxq = max_code(bits)
    scales = torch.ones(G, out_f, dtype=dtype, device=W.device)
    zeros = torch.full((G, out_f), float((maxq + 1) // 2), dtype=dtype, device=W.device)
    codes_perm = torch.empty(out_f, in_f, dtype=dtype, device=W.device)

    # block boundaries: group changes, and at most max(block_size, group_size) columns
    bounds = [0]
    gid_list = gid_perm.tolist()
    limit = max(block_size, group_size)
    for i in range(1, n_q):
        if gid_list[i] != gid_list[i - 1] or i - bounds[-1] >= limit:
            bounds.append(i)
    bounds.append(n_q)
    if n_q == 0:
        bounds = [0, 0]

    if group_size <= 0 and n_q > 0:
        s, z = fit_params(W[:, :n_q], bits, sym, mse)
        scales[0], zeros[0] = s[:, 0], z[:, 0]
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        if i1 == i2:
            continue
        g = gid_list[i1]
        if group_size > 0 and (i1 == 0 or gid_list[i1 - 1] != g):
            s, z = fit_params(W[:, i1:i1 + _run_len(gid_list, i1)], bits, sym, mse)
            scales[g], zeros[g] = s[:, 0], z[:, 0]
        s, z = scales[g][:, None], zeros[g][:, None]
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i:i + 1]
            q = quantize(w, s, z, bits)
            codes_perm[:, i1 + i] = q[:, 0]
            err = (w - dequantize(q, s, z)) / U1[i, i]
            W1[:, i:] -= err @ U1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    g_idx = torch.zeros(in_f, dtype=torch.long, device=W.device)
    g_idx[perm[:n_q]] = gid_perm
    if group_size > 0 and not desc_act:
        g_idx[salient_idx.to(W.device)] = salient_idx.to(W.device) // group_size
    codes = torch.empty_like(codes_perm)
    codes[:, perm] = codes_perm
    sal = salient_idx.to(W.device)
    codes[:, sal] = zeros[g_idx[sal]].t()
    salient_weight = W[:, n_q:].clone()  # already in sorted-salient order (perm tail)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, salient_idx=sal,
                           salient_weight=salient_weight, bits=bits)


def _run_len(gid_list, i1):
    g, j = gid_list[i1], i1
    while j < len(gid_list) and gid_list[j] == g:
        j += 1
    return j - i1


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False,
                 salient_idx: torch.Tensor | None = None, mse: bool = True, name: str = "") -> QuantizedWeight:
    """Round-to-nearest baseline with the same format (static groups, scales on non-salient columns)."""
    from gift_quant.core.quantizer import rtn
    W = W.detach().float()
    if not torch.isfinite(W).all():
        raise GiftError(f"{name or 'layer'}: weight contains NaN or Inf")
    in_f = W.shape[1]
    if salient_idx is None:
        salient_idx = torch.zeros(0, dtype=torch.long)
    sal = salient_idx.to(torch.long).sort().values
    mask = torch.ones(in_f, dtype=torch.bool)
    mask[sal] = False
    codes, scales, zeros, g_idx = rtn(W, bits, group_size, sym, mse, columns=mask)
    codes[:, sal] = zeros[g_idx[sal]].t()
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, salient_idx=sal,
                           salient_weight=W[:, sal].clone(), bits=bits)


def layer_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Proxy output error tr((W - W_hat) H (W - W_hat)^T), the quantity GPTQ minimises."""
    D = (W - W_hat).to(H.dtype)
    return float(torch.sum((D @ H) * D))


__all__ = ["QuantizedWeight", "gptq_quantize", "rtn_quantize", "layer_error", "inverse_cholesky",
           "processing_order"]
