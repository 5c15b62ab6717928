"""LoRA on MixedPrecisionLinear through peft: y = base(x) + scaling * B(A(x)), only the factors train,
merging refuses (it would requantize the packed base)."""
import warnings

import pytest
import torch

from gift_quant import GiftError
from gift_quant.nn import MixedPrecisionLinear

peft = pytest.importorskip("peft")
from gift_quant.nn.lora import LoraMixedPrecisionLinear, register_peft


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = MixedPrecisionLinear.random(64, 24, 3, 32, 4, bias=True, dtype=torch.float32, seed=2)

    def forward(self, x):
        return self.q(x)


def _wrapped(r=4, alpha=8):
    net = Net()
    cfg = register_peft(peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q"], lora_dropout=0.0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Unsupported layer type.*")
        pm = peft.get_peft_model(net, cfg)
    return pm, pm.base_model.model.q


def test_output_is_base_plus_scaled_low_rank_update():
    pm, lora = _wrapped()
    assert isinstance(lora, LoraMixedPrecisionLinear)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = lora.base_layer(x)
        assert torch.equal(pm(x), base)  # B starts at zero
        lora.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(1))
        A, B = lora.lora_A["default"].weight.double(), lora.lora_B["default"].weight.double()
        ref = base.double() + (x.double() @ A.t() @ B.t()) * (8 / 4)
        assert torch.allclose(pm(x).double(), ref, atol=1e-5)
        assert torch.allclose(lora.get_delta_weight("default").double(), B @ A * 2, atol=1e-6)
        with pm.disable_adapter():
            assert torch.equal(pm(x), base)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_merge_refuses():
    _, lora = _wrapped()
    with pytest.raises(GiftError, match="merging LoRA"):
        lora.merge()


def test_register_peft_rejects_other_configs():
    with pytest.raises(GiftError, match="peft.LoraConfig"):
        register_peft(object())
