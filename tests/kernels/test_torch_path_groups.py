"""PyTorch path: a layer with a single scale group (in_features <= group_size) dequantizes correctly."""
import pytest
import torch

from gift_quant.nn import MixedPrecisionLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_f,out_f,gs", [(32, 64, 32), (16, 24, 128), (48, 40, -1)])
def test_single_group_layer_matches_float64(monkeypatch, bits, in_f, out_f, gs):
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "torch")
    layer = MixedPrecisionLinear.random(in_f, out_f, bits, gs, 3, seed=bits + in_f)
    x = torch.randn(4, in_f, dtype=torch.float64)
    ref = x @ layer.dequantize(torch.float64).t()  # the unpack-by-shifts reference of packing.py
    torch.testing.assert_close(layer.double()(x), ref, rtol=1e-10, atol=1e-10)
