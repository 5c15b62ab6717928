"""Load-time layout for the CUDA kernel, built once per layer, device and dtype; never saved.

The kernel walks packed rows in order and reloads a group's scale only when the group changes, so it
wants ``g_idx`` non-decreasing and the salient rows out of the base:

- without act-order ``g_idx`` is already non-decreasing and the salient slots hold the zero-point
  (they dequantize to 0): the saved ``qweight`` is used as is, and the salient rows are only masked
  out of ``perm`` (no copy of the packed weights);
- otherwise (act-order, or a foreign checkpoint whose salient slots are not the zero-point) the
  non-salient rows are sorted by group and repacked, which costs one extra copy of the packed base.

:func:`prepared_forward` runs the same layout in plain PyTorch; the tests check it against the layer's
reference on CPU, and the CUDA kernels against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.packing import pack, unpack, unpack_qweight, unpack_qzeros


@dataclass
class PreparedLinear:
    qweight: torch.Tensor  # int32 [chunks*bits, N]
    perm: torch.Tensor     # int32 [chunks*32]: original input index, -1 for salient and padding rows
    gidx: torch.Tensor     # int32 [chunks*32]: group of each packed row
    scales: torch.Tensor   # [G, N] in the activation dtype
    zeros: torch.Tensor    # uint8 [G, N]
    bits: int
    repacked: bool
    chunk_uniform: bool = False  # every 32-row chunk lies in one group: the kernel checks groups per chunk


def _aligned(t: torch.Tensor, nbytes: int = 16) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % nbytes == 0 else t.clone()


def _pad(v: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    return torch.cat([v, torch.full((n - v.numel(),), fill, dtype=v.dtype, device=v.device)])


@torch.no_grad()
def prepare(layer, dtype: torch.dtype) -> PreparedLinear:
    K, N, bits = layer.in_features, layer.out_features, layer.bits
    dev = layer.qweight.device
    g = layer.g_idx.long()
    sal = layer.salient_idx.long()
    zeros = unpack_qzeros(layer.qzeros, bits, N)  # [G, N] int32
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > 255):
        raise ValueError("zero-points outside 0..255")
    codes = unpack_qweight(layer.qweight, bits, K)  # [K, N]
    is_sal = torch.zeros(K, dtype=torch.bool, device=dev)
    is_sal[sal] = True
    monotone = K < 2 or bool((g[1:] >= g[:-1]).all())
    sal_is_zero_point = sal.numel() == 0 or torch.equal(codes[sal], zeros[g[sal]])
    if monotone and sal_is_zero_point:
        rows_total = layer.qweight.shape[0] // bits * 32
        idx = torch.arange(K, device=dev)
        perm = _pad(torch.where(is_sal, torch.full_like(idx, -1), idx), rows_total, -1)
        gidx = _pad(g, rows_total, int(g[-1]) if K else 0)
        qweight, repacked = layer.qweight, False
    else:
        rows = (~is_sal).nonzero().squeeze(1)
        rows = rows[torch.sort(g[rows], stable=True).indices]
        chunks = -(-rows.numel() // 32)
        body = torch.zeros(chunks * 32, N, dtype=torch.int32, device=dev)
        body[:rows.numel()] = codes[rows]
        qweight = pack(body, bits)
        perm = _pad(rows, chunks * 32, -1)
        gidx = _pad(g[rows], chunks * 32, int(g[rows[-1]]) if rows.numel() else 0)
        repacked = True
    gidx = gidx.to(torch.int32).contiguous()
    chunked = gidx.view(-1, 32)
    uniform = bool((chunked == chunked[:, :1]).all()) if gidx.numel() else True
    return PreparedLinear(qweight=_aligned(qweight), perm=perm.to(torch.int32).contiguous(), gidx=gidx,
                          scales=_aligned(layer.scales.to(dtype)), zeros=_aligned(zeros.to(torch.uint8)),
                          bits=bits, repacked=repacked, chunk_uniform=uniform)


def prepared_forward(x: torch.Tensor, p: PreparedLinear, salient_weight: torch.Tensor,
                     salient_idx: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's math in PyTorch, in x's dtype (use float64 for a reference)."""
    dt = x.dtype
    codes = unpack(p.qweight, p.bits, p.perm.numel()).to(dt)  # [R, N]
    g = p.gidx.long()
    wt = (codes - p.zeros[g].to(dt)) * p.scales[g].to(dt)
    valid = p.perm >= 0
    xg = torch.where(valid, x[..., p.perm.long().clamp(min=0)], torch.zeros((), dtype=dt, device=x.device))
    y = xg @ wt
    if salient_idx.numel():
        y = y + x[..., salient_idx.long()] @ salient_weight.to(dt).t()
    if bias is not None:
        y = y + bias.to(dt)
    return y
