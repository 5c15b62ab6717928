"""The PyTorch path's dequantization, in int32 shifts (the old path widened every word to int64 per call).

Runs on any device and dtype, with no host sync (safe inside CUDA-graph capture). Used as the fallback
backend and for training (autograd reaches the FP16 columns through x, never a dense weight grad).
"""
from __future__ import annotations

import sys

import torch

if sys.byteorder != "little":  # the uint8 view below reads int32 words as little-endian bytes
    raise ImportError("gift_quant.kernels.torch_path assumes a little-endian machine")


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """GPTQ packing int32 [ceil(n/32)*bits, m] -> uint8 codes [n, m].

    2/4/8 bits: the words are read as little-endian bytes and split into nibbles/crumbs in uint8 (a
    quarter of int32 traffic); 3 bits (codes span words): int32 shifts, one slice per code position.
    """
    rows, m = packed.shape
    chunks = rows // bits
    if bits == 3:
        w = packed.view(chunks, 3, m)
        parts = []
        for j in range(32):
            wi, s = divmod(3 * j, 32)
            v = w[:, wi] >> s
            if s + 3 > 32:  # spans two words: drop the sign bits of the arithmetic shift before the OR
                v = (v & ((1 << (32 - s)) - 1)) | (w[:, wi + 1] << (32 - s))
            parts.append((v & 7).to(torch.uint8))
        return torch.stack(parts, 1).view(chunks * 32, m)[:n]
    # byte b of word p holds codes p*(32/bits) + b*(8/bits) + i at bit i*bits of the byte
    by = packed.reshape(-1).view(torch.uint8).view(chunks, bits, m, 4)  # reshape: a size-1 dim may keep any stride
    per = 8 // bits
    if per == 1:
        codes = by.unsqueeze(-1)
    else:
        sh = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (by.unsqueeze(-1) >> sh) & ((1 << bits) - 1)                   # [chunks, bits, m, 4, per]
    return codes.permute(0, 1, 3, 4, 2).reshape(chunks * 32, m)[:n]


def dequantize_t(qweight, qzeros, scales, g_idx, bits: int, in_features: int, out_features: int,
                 dtype: torch.dtype, group_size: int = 0) -> torch.Tensor:
    """The low-bit base transposed, [in, out] in ``dtype``; salient slots hold the zero-point (so 0).

    With static groups (``g_idx == arange // group_size``, checked on CPU only: on CUDA it would sync)
    the zero/scale rows broadcast over each group instead of being gathered per row.
    """
    K, N = in_features, out_features
    codes = unpack_codes(qweight, bits, K)                                            # [K, N] uint8
    zeros = unpack_codes(qzeros.t().contiguous(), bits, N).t()                        # [G, N] uint8
    G = scales.shape[0]
    static = G == 1 or (group_size > 0 and not qweight.is_cuda and
                        torch.equal(g_idx.long(), torch.arange(K, device=g_idx.device) // group_size))
    if not static:
        g = g_idx.long()
        return (codes.to(dtype) - zeros.to(dtype)[g]).mul_(scales.to(dtype)[g])
    gs = K if G == 1 else group_size
    full = K // gs
    w = codes.to(dtype)
    z, s = zeros.to(dtype), scales.to(dtype)
    body = w[:full * gs].view(full, gs, N)
    body.sub_(z[:full, None]).mul_(s[:full, None])
    if full * gs < K:  # a last, shorter group
        w[full * gs:].sub_(z[full]).mul_(s[full])
    return w


def dequantize(qweight, qzeros, scales, g_idx, bits, group_size, in_features, out_features, dtype):
    """The low-bit base [out, in] in ``dtype`` (a transposed view of :func:`dequantize_t`)."""
    return dequantize_t(qweight, qzeros, scales, g_idx, bits, in_features, out_features, dtype, group_size).t()
