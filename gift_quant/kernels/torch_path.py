"""The PyTorch path's dequantization, in int32 shifts (the old path widened every word to int64 per call).

Runs on any device and dtype, with no host sync (safe inside CUDA-graph capture). Used as the fallback
backend and for training (autograd reaches the FP16 columns through x, never a dense weight grad).
"""
from __future__ import annotations

import torch

_SHIFTS: dict = {}


def _shifts(bits: int, device) -> torch.Tensor:
    key = (bits, str(device))
    t = _SHIFTS.get(key)
    if t is None:
        t = torch.arange(0, 32, bits, dtype=torch.int32, device=device).view(1, 1, -1, 1)
        _SHIFTS[key] = t
    return t


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """GPTQ packing int32 [ceil(n/32)*bits, m] -> int32 codes [n, m] (values < 2**bits)."""
    rows, m = packed.shape
    chunks = rows // bits
    mask = (1 << bits) - 1
    w = packed.view(chunks, bits, m)
    if bits != 3:
        # arithmetic shift, then mask: the sign bits never reach the kept bits
        return ((w.unsqueeze(2) >> _shifts(bits, packed.device)) & mask).reshape(chunks * 32, m)[:n]
    parts = []
    for j in range(32):
        wi, s = divmod(3 * j, 32)
        v = w[:, wi] >> s
        if s + 3 > 32:  # spans two words: drop the sign bits of the arithmetic shift before the OR
            v = (v & ((1 << (32 - s)) - 1)) | (w[:, wi + 1] << (32 - s))
        parts.append(v & mask)
    return torch.stack(parts, 1).view(chunks * 32, m)[:n]


def dequantize_t(qweight, qzeros, scales, g_idx, bits: int, in_features: int, out_features: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The low-bit base transposed, [in, out] in ``dtype``; salient slots hold the zero-point (so 0)."""
    codes = unpack_codes(qweight, bits, in_features)                                  # [K, N] int32
    zeros = unpack_codes(qzeros.t().contiguous(), bits, out_features).t()                          # [G, N] int32
    g = g_idx.long()
    z = zeros.to(dtype)[g]
    s = scales.to(dtype)[g]
    return (codes.to(dtype) - z).mul_(s)


def dequantize(qweight, qzeros, scales, g_idx, bits, group_size, in_features, out_features, dtype):
    """The low-bit base [out, in] in ``dtype`` (a transposed view of :func:`dequantize_t`)."""
    return dequantize_t(qweight, qzeros, scales, g_idx, bits, in_features, out_features, dtype).t()
