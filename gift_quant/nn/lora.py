"""PEFT LoRA on top of :class:`MixedPrecisionLinear` (peft >= 0.15, its custom-module API).

    from peft import LoraConfig, get_peft_model
    from gift_quant.nn.lora import register_peft
    cfg = register_peft(LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model = get_peft_model(gift_model, cfg)

peft does not serialize custom-module registrations in ``adapter_config.json``; reload an adapter with
:func:`load_adapter` (or register the ``LoraConfig`` yourself before ``PeftModel.from_pretrained``).
``merge_and_unload`` is refused: folding a float delta into a packed low-bit base would requantize it.
"""
from __future__ import annotations

import torch
from torch import nn

from gift_quant.errors import GiftError
from gift_quant.nn.mixed_linear import MixedPrecisionLinear

try:
    from peft.tuners.lora.layer import LoraLayer
except ImportError as e:  # pragma: no cover - peft is an optional extra
    raise ImportError("LoRA on gift models needs peft: pip install 'gift-quant[train]'") from e


class LoraMixedPrecisionLinear(nn.Module, LoraLayer):
    """``y = MixedPrecisionLinear(x) + scaling * B(A(dropout(x)))``; only the LoRA factors train."""

    def __init__(self, base_layer: MixedPrecisionLinear, adapter_name: str, config=None, r: int = 0,
                 lora_alpha: int = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)  # reads base_layer.in_features / out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            xin = self._cast_input_dtype(x, A.weight.dtype)
            result = result + (B(A(self.lora_dropout[name](xin))) * self.scaling[name]).to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, *args, **kwargs):
        raise GiftError("merging LoRA into a gift model would requantize its packed base; keep the adapter "
                        "separate, or merge into the float model before compressing")

    def unmerge(self, *args, **kwargs):
        return

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_peft(lora_config):
    """Register :class:`LoraMixedPrecisionLinear` for :class:`MixedPrecisionLinear` on ``lora_config``
    (a ``peft.LoraConfig``) and return it."""
    if not hasattr(lora_config, "_register_custom_module"):
        raise GiftError("lora_config: needs a peft.LoraConfig from peft >= 0.15 (no _register_custom_module)")
    lora_config._register_custom_module({MixedPrecisionLinear: LoraMixedPrecisionLinear})
    return lora_config


def load_adapter(model, adapter_dir, **kwargs):
    """``PeftModel.from_pretrained`` for a gift base, re-registering the custom LoRA layer first."""
    from peft import LoraConfig, PeftModel
    cfg = register_peft(LoraConfig.from_pretrained(adapter_dir))
    return PeftModel.from_pretrained(model, adapter_dir, config=cfg, **kwargs)


__all__ = ["LoraMixedPrecisionLinear", "register_peft", "load_adapter"]
