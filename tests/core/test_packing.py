import pytest
import torch

from gift_quant.core.packing import pack, pack_qweight, pack_qzeros, packed_len, unpack, unpack_qweight, unpack_qzeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(32, 1), (64, 7), (100, 33), (1, 5), (577, 3)])
def test_round_trip(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[0])
    codes = torch.randint(0, 2**bits, shape, generator=g)
    p = pack(codes, bits)
    assert p.dtype == torch.int32 and p.shape == (packed_len(shape[0], bits), shape[1])
    assert torch.equal(unpack(p, bits, shape[0]), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qweight_qzeros_round_trip(bits):
    out_f, in_f = 45, 70
    codes = torch.randint(0, 2**bits, (out_f, in_f))
    zeros = torch.randint(0, 2**bits, (3, out_f))
    assert torch.equal(unpack_qweight(pack_qweight(codes, bits), bits, in_f).t(), codes.int())
    assert torch.equal(unpack_qzeros(pack_qzeros(zeros, bits), bits, out_f), zeros.int())


def test_gptq_bit_layout():
    # LSB first along K: 4-bit values 0..7 in one word read 0x76543210; 3-bit value 10 spans words 0/1
    assert pack(torch.arange(8).view(8, 1), 4)[0, 0].item() == 0x76543210
    c = torch.zeros(32, 1, dtype=torch.long)
    c[10] = 0b111  # bits 30..32: two bits in word 0, one in word 1
    p = pack(c, 3)
    assert (p[0, 0].item() & 0xFFFFFFFF) == 0b11 << 30 and p[1, 0].item() == 1


def test_rejects_bad_shape():
    with pytest.raises(ValueError):
        unpack(torch.zeros(5, 2, dtype=torch.int32), 4, 32)
