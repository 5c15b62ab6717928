"""Vectorized b-bit packing in the GPTQ int32 layout.

Codes are packed along dim 0 in chunks of 32 values: a chunk of 32 b-bit codes fills exactly b int32
words, LSB first, so 3-bit codes span word boundaries. A dim of size n packs into ceil(n/32)*b words
(the tail chunk is zero-padded). ``qweight`` packs along the input dim ([in, out] -> [words, out]);
``qzeros`` packs along the output dim (the same routine on the transpose).
"""
from __future__ import annotations

import torch

from gift_quant.core.quantizer import SUPPORTED_BITS


def packed_len(n: int, bits: int) -> int:
    return -(-n // 32) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [n, m] (values in [0, 2^bits)) into int32 [ceil(n/32)*bits, m]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    n, m = codes.shape
    chunks = -(-n // 32)
    c = torch.zeros(chunks * 32, m, dtype=torch.int64, device=codes.device)
    c[:n] = codes.to(torch.int64) & ((1 << bits) - 1)
    c = c.view(chunks, 32, m)
    words = torch.zeros(chunks, bits, m, dtype=torch.int64, device=codes.device)
    for j in range(32):
        bit = j * bits
        w, s = divmod(bit, 32)
        words[:, w] |= (c[:, j] << s) & 0xFFFFFFFF
        if s + bits > 32:  # spills into the next word (3-bit)
            words[:, w + 1] |= c[:, j] >> (32 - s)
    words = words.view(chunks * bits, m)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 [ceil(n/32)*bits, m] -> int32 codes [n, m]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    rows, m = packed.shape
    chunks = -(-n // 32)
    if rows != chunks * bits:
        raise ValueError(f"packed tensor has {rows} rows, expected {chunks * bits} for n={n}, bits={bits}")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(chunks, bits, m)
    mask = (1 << bits) - 1
    out = torch.empty(chunks, 32, m, dtype=torch.int64, device=packed.device)
    for j in range(32):
        bit = j * bits
        w, s = divmod(bit, 32)
        v = words[:, w] >> s
        if s + bits > 32:
            v = v | (words[:, w + 1] << (32 - s))
        out[:, j] = v & mask
    return out.view(chunks * 32, m)[:n].to(torch.int32)


def pack_qweight(codes_out_in: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [out, in] -> qweight int32 [ceil(in/32)*bits, out]."""
    return pack(codes_out_in.t(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight -> codes int32 [in, out]."""
    return unpack(qweight, bits, in_features)


def pack_qzeros(zeros_g_out: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero-points [G, out] -> qzeros int32 [G, ceil(out/32)*bits] (stored as-is, GPTQ v2)."""
    return pack(zeros_g_out.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return unpack(qzeros.t().contiguous(), bits, out_features).t().contiguous()
