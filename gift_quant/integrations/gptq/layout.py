"""GPTQ tensor layout: the int32 bit-stream words and the v1/v2 zero-point storage.

Checked against GPTQModel 7.7's ``pack_original`` / ``dequantize_weight`` (tests/integrations/
test_gptq_interop.py): codes are one LSB-first bitstream of b-bit fields over int32 words, along the
input dim for ``qweight`` [ceil(in*b/32), out] and along the output dim for ``qzeros`` [G, ceil(out*b/32)];
3-bit fields straddle words. gift pads each dim to whole 32-value chunks ([ceil(n/32)*b] words), which
is the same bitstream with extra zero words when n % 32 != 0, so both directions only trim or pad words.
"""
from __future__ import annotations

import torch

from gift_quant.core.packing import pack, packed_len, unpack


def gptq_words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def bitstream_unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 words [w, m] (LSB-first bitstream along dim 0, any padding) -> codes int32 [n, m]."""
    need = packed_len(n, bits)
    w = packed.shape[0]
    if w < gptq_words(n, bits):
        raise ValueError(f"{w} packed words hold fewer than {n} {bits}-bit values")
    if w < need:
        packed = torch.cat([packed, packed.new_zeros(need - w, packed.shape[1])])
    return unpack(packed[:need], bits, n)


def to_gift_words(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """GPTQ-padded words [ceil(n*b/32), m] -> gift-padded words [ceil(n/32)*b, m] (same bitstream)."""
    need = packed_len(n, bits)
    if packed.shape[0] >= need:
        return packed[:need].contiguous()
    return torch.cat([packed, packed.new_zeros(need - packed.shape[0], packed.shape[1])]).contiguous()


def to_gptq_words(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """gift-padded words -> GPTQ-padded words (drop the all-padding tail words)."""
    return packed[:gptq_words(n, bits)].contiguous()


def v1_to_v2_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """GPTQ v1 qzeros (z - 1) -> v2 (z), decoded exactly as GPTQModel 7.7 does (gptq-padded words)."""
    if bits == 3:
        z = bitstream_unpack(qzeros.t().contiguous(), 3, out_features)
        z = (z + 1) & 7
        return to_gptq_words(pack(z, 3), 3, out_features).t().contiguous()
    per_word = 32 // bits
    const = sum(1 << (bits * j) for j in range(per_word))
    w = (qzeros.to(torch.int64) & 0xFFFFFFFF) + const
    w = w & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def v2_to_v1_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of the v1 decoding above (what GPTQModel 7.7 writes for checkpoint_format 'gptq')."""
    if bits == 3:
        z = bitstream_unpack(qzeros.t().contiguous(), 3, out_features)
        z = (z - 1) & 7
        return to_gptq_words(pack(z, 3), 3, out_features).t().contiguous()
    per_word = 32 // bits
    const = sum(1 << (bits * j) for j in range(per_word))
    w = ((qzeros.to(torch.int64) & 0xFFFFFFFF) - const) & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
