"""A 4-bit candidate from torch itself: ``aten._weight_int4pack_mm`` (tinygemm) on the equal-group layout.

The op computes x @ ((q - 8) * s + b)^T per group of 32-256 rows, with bf16 activations. A gift group
(q - z) * s is the same with b = s * (8 - z), up to the rounding of b to bf16 (a shift of at most about
s/64 shared by the group; the tests bound it). Act-order works through the K permutation of the layout
(x gathered by ``perm_pos``, free positions get x = 0; their code is the zero point, so their weight is
that small shift, times x = 0). The FP16 columns and the bias are added on top. CUDA uses the op's CUDA kernel (sm_80+); CPU
tensors use its ``_for_cpu`` twin, which is how the tests check it. Only for bf16 activations: an fp16
model would lose 2 mantissa bits in x.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .triton.layout import TritonLayout, unpack_chunks

GROUPS = (32, 64, 128, 256)


@dataclass
class Int4Pack:
    packed: torch.Tensor
    sz: torch.Tensor          # [G, Np, 2] bf16: scale, s * (8 - z)
    perm_pos: torch.Tensor | None  # None: identity order (x padded with zeros to R)
    rows: int                 # R, positions
    group_rows: int
    out_features: int
    sal_idx: torch.Tensor
    sal_w: torch.Tensor       # [kp, Np]
    bias: torch.Tensor | None


def unavailable(L: TritonLayout) -> str | None:
    if L.bits != 4:
        return "int4pack: 4 bits only"
    if L.group_rows not in GROUPS:
        return f"int4pack: group of {L.group_rows} positions, the op takes {GROUPS}"
    dev = L.qweight.device
    name = "_weight_int4pack_mm_for_cpu" if dev.type == "cpu" else "_weight_int4pack_mm"
    if not hasattr(torch.ops.aten, name):
        return f"int4pack: torch {torch.__version__} has no aten.{name}"
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 0):
        return "int4pack: needs sm_80 or newer"
    return None


def _inner_k_tiles(rows: int) -> int:
    for t in (8, 4, 2):
        if rows % (16 * t) == 0:
            return t
    raise ValueError(f"int4pack: {rows} positions is not a multiple of 32")


@torch.no_grad()
def build(L: TritonLayout) -> Int4Pack:
    why = unavailable(L)
    if why:
        raise ValueError(why)
    R, Np = L.chunks * 32, L.qweight.shape[1]
    T, W = L.tiles, L.tile
    codes = unpack_chunks(L.qweight, 4).view(T, W, 32, Np).transpose(1, 2).reshape(R, Np)  # position order
    w = codes.t().contiguous().to(torch.int32)                                               # [Np, R]
    if L.qweight.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack((w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8),
                                                            _inner_k_tiles(R))
    s = L.scales.float()
    sz = torch.stack([s, s * (8.0 - L.zeros.float())], -1).to(torch.bfloat16).contiguous()
    ident = L.identity_rows
    return Int4Pack(packed=packed, sz=sz, perm_pos=None if ident else L.perm_pos.long(), rows=R,
                    group_rows=L.group_rows, out_features=L.out_features, sal_idx=L.sal_idx.long(),
                    sal_w=L.sal_w.to(torch.bfloat16), bias=None if L.bias is None else L.bias.to(torch.bfloat16))


def forward(x2d: torch.Tensor, P: Int4Pack) -> torch.Tensor:
    """y [M, N] in x's dtype; x2d [M, K] (cast to bf16)."""
    xb = x2d.to(torch.bfloat16)
    if P.perm_pos is None:
        xg = F.pad(xb, (0, P.rows - xb.shape[1]))
    else:
        xg = xb[:, P.perm_pos.clamp(min=0)] * (P.perm_pos >= 0).to(xb.dtype)
    if xg.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xg.contiguous(), P.packed, P.group_rows, P.sz)
    else:
        y = torch.ops.aten._weight_int4pack_mm(xg.contiguous(), P.packed, P.group_rows, P.sz)
    if P.sal_w.shape[0]:
        y = y + xb[:, P.sal_idx] @ P.sal_w
    y = y[:, :P.out_features]
    if P.bias is not None:
        y = y + P.bias
    return y.to(x2d.dtype)
