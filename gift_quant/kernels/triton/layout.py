"""Load-time layout for the Triton kernels (tensors only; built once per layer, device and dtype; never saved).

The saved GPTQ tensors are rewritten into a form the kernels read with plain coalesced loads:

- rows (input features) are sorted by group (act-order) and every group is padded to a multiple of 32
  rows, so each 32-row *chunk* lies in one group: one scale/zero load per chunk and column;
- the salient rows stay in the base but their codes are set to the zero-point, so they dequantize to
  exactly 0 (also for foreign checkpoints whose salient slots hold something else);
- each chunk is ``bits`` int32 words per column. For 2/4/8 bits word ``p`` holds codes
  ``p*(32/bits) + j`` at shift ``bits*j`` (the GPTQ word order); 3-bit chunks are stored as two 2-bit
  planes (codes 0-15, 16-31) and one 1-bit plane (the high bits of all 32), so no code spans two words;
- columns are padded to a multiple of 16 (16-byte vector loads); ``salient_weight`` is stored
  transposed ``[k, N]`` (coalesced along N) and k is padded to a multiple of 32.

:func:`layout_reference` is the same math in plain PyTorch; the tests check it in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.packing import unpack, unpack_qweight

N_ALIGN = 16
K_SAL_ALIGN = 32


@dataclass
class TritonLayout:
    qweight: torch.Tensor   # int32 [C*bits, Np], chunks in slot order
    perm: torch.Tensor      # int32 [C*32]: input feature of each slot (chunk-major), -1 for padding
    gchunk: torch.Tensor    # int32 [C]: group of each chunk (chunk*32 // group_rows)
    scales: torch.Tensor    # [G, Np] activation dtype
    zeros: torch.Tensor     # uint8 [G, Np]
    sal_w: torch.Tensor     # [kp, Np] activation dtype (rows past k are 0)
    sal_idx: torch.Tensor   # int32 [kp] (padding points at feature 0 with weight 0)
    bias: torch.Tensor | None  # [N] activation dtype
    bits: int
    in_features: int
    out_features: int
    identity_rows: bool     # position p is input feature p (positions past K are padding): no gather
    perm_pos: torch.Tensor | None = None  # int32 [C*32]: input feature of each position, -1 for padding
    tile: int = 1           # chunks per tile (the row interleave of the packing)
    group_rows: int = 32    # positions per group, a multiple of 32*tile: group = position // group_rows

    @property
    def chunks(self) -> int:
        return self.gchunk.numel()

    @property
    def tiles(self) -> int:
        return self.chunks // self.tile

    def nbytes(self) -> int:
        """Bytes one forward reads from the layout at batch 1 (packed base, scales, zeros, FP16 columns)."""
        n = self.qweight.numel() * 4 + self.scales.numel() * self.scales.element_size() + self.zeros.numel()
        k = int((self.sal_w.abs().sum(1) > 0).sum()) if self.sal_w.numel() else 0
        return n + k * self.sal_w.shape[1] * self.sal_w.element_size() + k * 4


def pack_chunks(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes int [C*32, N] (values < 2**bits) -> int32 [C*bits, N] in the kernel's word order."""
    R, N = codes.shape
    C = R // 32
    c = codes.to(torch.int64).view(C, 32, N)
    if bits == 3:
        lo, hi = c & 3, c >> 2
        words = torch.zeros(C, 3, N, dtype=torch.int64, device=codes.device)
        for j in range(16):
            words[:, 0] |= lo[:, j] << (2 * j)
            words[:, 1] |= lo[:, 16 + j] << (2 * j)
        for s in range(32):
            words[:, 2] |= hi[:, s] << s
    else:
        ppw = 32 // bits
        words = torch.zeros(C, bits, N, dtype=torch.int64, device=codes.device)
        for p in range(bits):
            for j in range(ppw):
                words[:, p] |= c[:, p * ppw + j] << (bits * j)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.view(C * bits, N).to(torch.int32)


def unpack_chunks(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_chunks` (tests and the reference)."""
    CB, N = words.shape
    C = CB // bits
    w = (words.to(torch.int64) & 0xFFFFFFFF).view(C, bits, N)
    out = torch.empty(C, 32, N, dtype=torch.int64, device=words.device)
    if bits == 3:
        for s in range(32):
            out[:, s] = ((w[:, s // 16] >> (2 * (s % 16))) & 3) | (((w[:, 2] >> s) & 1) << 2)
    else:
        ppw = 32 // bits
        for s in range(32):
            out[:, s] = (w[:, s // ppw] >> (bits * (s % ppw))) & ((1 << bits) - 1)
    return out.view(C * 32, N)


def _pad_cols(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[-1] == n:
        return t.contiguous()
    out = torch.zeros(*t.shape[:-1], n, dtype=t.dtype, device=t.device)
    out[..., :t.shape[-1]] = t
    return out


MAX_TILE = 8


def _tile_for(group_rows: int) -> int:
    """Chunks per tile: the largest power of two <= MAX_TILE whose 32*tile rows divide a group."""
    t = MAX_TILE
    while (group_rows // 32) % t:
        t //= 2
    return t


@torch.no_grad()
def build_layout(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 salient_idx: torch.Tensor, salient_weight: torch.Tensor, bias: torch.Tensor | None,
                 bits: int, in_features: int, out_features: int, dtype: torch.dtype,
                 group_size: int = 0) -> TritonLayout:
    """The kernel layout from a layer's saved tensors (GPTQ v2 packing, ``salient_weight`` [N, k]).

    Every group gets the same number of positions, ``group_rows`` (the group size when each group's
    non-salient rows fit in it), so the kernels find a row's group as position // group_rows. A group
    whose rows all fit keeps them in their original order (salient ones included: their code is the
    zero-point), which keeps a checkpoint without act-order in identity order; an over-full group (the
    salient rows of an act-order checkpoint all carry g_idx 0) drops its salient rows. Free positions
    hold the group's zero-point and x is masked there.
    """
    K, N = in_features, out_features
    dev = qweight.device
    Np = -(-N // N_ALIGN) * N_ALIGN
    G = scales.shape[0]
    g = g_idx.long()
    if K and (int(g.min()) < 0 or int(g.max()) >= G):
        raise ValueError(f"g_idx out of range [0, {G})")
    codes = unpack_qweight(qweight, bits, K).to(torch.int32)                 # [K, N]
    zeros = unpack(qzeros.t().contiguous(), bits, N).t().contiguous()        # [G, N]
    sal = salient_idx.long()
    is_sal = torch.zeros(K, dtype=torch.bool, device=dev)
    if sal.numel():
        codes[sal] = zeros[g[sal]]  # salient slots dequantize to exactly 0
        is_sal[sal] = True
    counts = torch.bincount(g, minlength=G) if K else torch.zeros(G, dtype=torch.long, device=dev)
    counts_ns = torch.bincount(g[~is_sal], minlength=G) if K else counts
    need = max(1, int(counts_ns.max()) if G else 1)
    if G == 1:
        S = -(-max(K, 1) // (32 * MAX_TILE)) * 32 * MAX_TILE   # one group: pad to whole tiles
    elif group_size > 0 and group_size % 32 == 0 and need <= group_size:
        S = group_size
    else:
        S = -(-need // 32) * 32
    placed = ~is_sal | (counts <= S)[g]
    rows = placed.nonzero().squeeze(1)
    gp = g[rows]
    order = torch.sort(gp, stable=True).indices
    rows, gp = rows[order], gp[order]
    n_in = torch.bincount(gp, minlength=G)
    first = torch.cumsum(n_in, 0) - n_in
    pos = gp * S + torch.arange(rows.numel(), device=dev) - first[gp]
    R = G * S
    perm_pos = torch.full((R,), -1, dtype=torch.long, device=dev)
    perm_pos[pos] = rows
    body = zeros.to(torch.int32).repeat_interleave(S, dim=0)                 # free positions: zero-point
    body[pos] = codes[rows]
    identity = bool(torch.equal(perm_pos[:K], torch.arange(K, device=dev))) and bool((perm_pos[K:] < 0).all())
    tile = _tile_for(S)
    T, C = R // (32 * tile), R // 32
    body = body.view(T, 32, tile, N).transpose(1, 2).reshape(R, N)           # slot (t, c, s) = position t*32*tile + s*tile + c
    perm = perm_pos.view(T, 32, tile).transpose(1, 2).reshape(R)
    gchunk = torch.arange(C, device=dev) * 32 // S
    k = sal.numel()
    kp = -(-k // K_SAL_ALIGN) * K_SAL_ALIGN
    sal_w = torch.zeros(kp, Np, dtype=dtype, device=dev)
    sal_i = torch.zeros(kp, dtype=torch.int32, device=dev)
    if k:
        sal_w[:k, :N] = salient_weight.detach().t().to(dtype)
        sal_i[:k] = sal.to(torch.int32)
    return TritonLayout(
        qweight=_pad_cols(pack_chunks(body, bits), Np), perm=perm.to(torch.int32).contiguous(),
        gchunk=gchunk.to(torch.int32).contiguous(), scales=_pad_cols(scales.to(dtype), Np),
        zeros=_pad_cols(zeros.to(torch.uint8), Np), sal_w=sal_w, sal_idx=sal_i,
        bias=None if bias is None else bias.detach().to(dtype).contiguous(), bits=bits,
        in_features=K, out_features=N, identity_rows=identity, perm_pos=perm_pos.to(torch.int32).contiguous(),
        tile=tile, group_rows=S)


def layout_reference(x: torch.Tensor, L: TritonLayout) -> torch.Tensor:
    """The layout's math in plain PyTorch, in x's dtype (float64 for a reference). x: [..., K]."""
    dt = x.dtype
    N = L.out_features
    codes = unpack_chunks(L.qweight, L.bits)[:, :N].to(dt)                   # [R, N]
    g = L.gchunk.long().repeat_interleave(32)
    w = (codes - L.zeros[g, :N].to(dt)) * L.scales[g, :N].to(dt)
    valid = L.perm >= 0
    xg = torch.where(valid, x[..., L.perm.long().clamp(min=0)], torch.zeros((), dtype=dt, device=x.device))
    y = xg @ w + x[..., L.sal_idx.long()] @ L.sal_w[:, :N].to(dt)
    if L.bias is not None:
        y = y + L.bias.to(dt)
    return y
