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

from ..packing import unpack, unpack_qweight

N_ALIGN = 16
K_SAL_ALIGN = 32


@dataclass
class TritonLayout:
    qweight: torch.Tensor   # int32 [C*bits, Np]
    perm: torch.Tensor      # int32 [C*32]: input feature of each packed row, -1 for padding
    gchunk: torch.Tensor    # int32 [C]: group of each chunk
    scales: torch.Tensor    # [G, Np] activation dtype
    zeros: torch.Tensor     # uint8 [G, Np]
    sal_w: torch.Tensor     # [kp, Np] activation dtype (rows past k are 0)
    sal_idx: torch.Tensor   # int32 [kp] (padding points at feature 0 with weight 0)
    bias: torch.Tensor | None  # [N] activation dtype
    bits: int
    in_features: int
    out_features: int
    identity_rows: bool     # packed row r is input feature r (rows past K are padding): no gather needed

    @property
    def chunks(self) -> int:
        return self.gchunk.numel()

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


@torch.no_grad()
def build_layout(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 salient_idx: torch.Tensor, salient_weight: torch.Tensor, bias: torch.Tensor | None,
                 bits: int, in_features: int, out_features: int, dtype: torch.dtype) -> TritonLayout:
    """The kernel layout from a layer's saved tensors (GPTQ v2 packing, ``salient_weight`` [N, k])."""
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
    if sal.numel():
        codes[sal] = zeros[g[sal]]  # salient slots dequantize to exactly 0
    counts = torch.bincount(g, minlength=G) if K else torch.zeros(G, dtype=torch.long, device=dev)
    padded = (counts + 31) // 32 * 32
    monotone = K < 2 or bool((g[1:] >= g[:-1]).all())
    identity = monotone and bool((padded[:-1] == counts[:-1]).all()) if G > 1 else monotone
    if identity:
        C = max(1, -(-K // 32))
        rows = torch.arange(C * 32, device=dev)
        perm = torch.where(rows < K, rows, torch.full_like(rows, -1))
        body = torch.zeros(C * 32, N, dtype=torch.int32, device=dev)
        body[:K] = codes
        gpad = torch.cat([g, torch.full((C * 32 - K,), int(g[-1]) if K else 0, dtype=torch.long, device=dev)])
        gchunk = gpad.view(C, 32)[:, 0]
    else:
        order = torch.sort(g, stable=True).indices                            # rows grouped
        starts = torch.cumsum(padded, 0) - padded                             # padded start of each group
        first = torch.cumsum(counts, 0) - counts                              # unpadded start in `order`
        rank = torch.arange(K, device=dev) - first[g[order]]
        pos = starts[g[order]] + rank
        total = max(32, int(padded.sum()))
        C = total // 32
        perm = torch.full((total,), -1, dtype=torch.long, device=dev)
        perm[pos] = order
        body = torch.zeros(total, N, dtype=torch.int32, device=dev)
        body[pos] = codes[order]
        gchunk = torch.repeat_interleave(torch.arange(G, device=dev), padded // 32)
        if gchunk.numel() < C:
            gchunk = torch.cat([gchunk, gchunk.new_zeros(C - gchunk.numel())])
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
        in_features=K, out_features=N, identity_rows=identity)


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
