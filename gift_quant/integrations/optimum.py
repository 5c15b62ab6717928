"""Optimum-style API, mirroring ``optimum.gptq.GPTQQuantizer`` / ``optimum.gptq.load_quantized_model``:

    from gift_quant import GiftQuantizer, load_quantized_model
    quantizer = GiftQuantizer(bits=4, dataset="bundled", n_salient=128)
    model = quantizer.quantize_model(model, tokenizer)
    quantizer.save(model, "out", tokenizer)
    model = load_quantized_model(None, "out", device_map="auto")

``dataset`` may be a name, a list of strings, token-id tensors (``tokenizer`` may then be None), a list of
``{"input_ids": ...}`` dicts or a ``datasets.Dataset`` (see :mod:`gift_quant.compress.calibration`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from gift_quant.compress.api import quantize_
from gift_quant.config import QUANT_METHOD, GiftConfig
from gift_quant.errors import GiftError
from gift_quant.io.atomic import write_json


class GiftQuantizer:
    """``bits``, ``dataset`` and every keyword are :class:`GiftConfig` fields, with its defaults
    (``group_size``, ``n_salient``, ``salient_ratio``, ``metric``, ``desc_act``, ``sym``, ``calib_samples``,
    ``seq_len``, ...)."""

    def __init__(self, bits: int = GiftConfig.bits, dataset=None, **kwargs):
        recipe = kwargs.get("recipe", GiftConfig.recipe)
        if recipe != "none":  # training recipes need training data and steps: gift_quant.train.run_recipe
            raise GiftError(f"GiftQuantizer.recipe: {recipe!r} is not available through GiftQuantizer "
                            "(supported: none); train with the CLI (gift-quant compress --recipe)")
        self.dataset = dataset
        self.config = GiftConfig(bits=bits, dataset=dataset if isinstance(dataset, str) else None, **kwargs)
        self.report = None

    def to_dict(self) -> dict:
        return self.config.to_dict()

    def quantize_model(self, model, tokenizer=None, device=None, progress: bool = True):
        """Compress ``model`` in place (and return it): every decoder Linear becomes a
        :class:`~gift_quant.MixedPrecisionLinear`, and ``model.config.quantization_config`` a
        :class:`GiftConfig`, so ``save_pretrained`` / ``from_pretrained`` work afterwards."""
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.report = quantize_(model, self.config, tokenizer, self.dataset, device=device, progress=progress)
        # make the model look like one transformers loaded pre-quantized (Trainer / PEFT checks read these)
        from gift_quant.integrations.transformers import GiftHfQuantizer
        model.is_quantized = True
        model.quantization_method = self.config.quant_method
        model.hf_quantizer = GiftHfQuantizer(self.config, pre_quantized=True)
        model.config._is_quantized = True
        return model

    def save(self, model, save_dir, tokenizer=None, max_shard_size: str = "10GB"):
        """``save_pretrained`` (safetensors) plus ``saliency.safetensors`` and ``gift_report.json``."""
        save_dir = Path(save_dir)
        if save_dir.exists() and not save_dir.is_dir():
            raise GiftError(f"save_dir: {save_dir} exists and is not a folder")
        if getattr(getattr(model.config, "quantization_config", None), "quant_method", None) != QUANT_METHOD:
            raise GiftError("save: the model is not gift-quantized (run quantize_model first)")
        model.save_pretrained(save_dir, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_dir)
        if self.report is not None:
            from gift_quant.io.export import save_saliency
            save_saliency(self.report, save_dir / "saliency.safetensors")
            from gift_quant.compress.report import summary
            write_json(save_dir / "gift_report.json", summary(self.config, self.report), indent=2)


def load_quantized_model(model, save_dir, device_map=None, dtype=None, max_memory=None, **kwargs):
    """Load a gift checkpoint (Optimum's ``load_quantized_model`` signature).

    ``model`` may be None, an (empty or full) instance of the architecture, or its class: the weights
    and the architecture come from ``save_dir``; an instance whose ``model_type`` differs is an error.
    ``device_map`` is passed to ``from_pretrained`` (``"auto"``, ``"cpu"``, a dict, ...).
    """
    from transformers import AutoModelForCausalLM

    from gift_quant.io.checkpoint import is_gift_checkpoint
    p = Path(save_dir)
    if not (p / "config.json").is_file():
        raise GiftError(f"save_dir: {save_dir} is not a checkpoint folder (no config.json)")
    if not is_gift_checkpoint(p):
        raise GiftError(f"save_dir: {save_dir} is not a gift-quant checkpoint "
                        f"(quantization_config.quant_method != {QUANT_METHOD!r})")
    saved_type = json.loads((p / "config.json").read_text()).get("model_type")
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "model_type", saved_type) != saved_type:
        raise GiftError(f"model: a {cfg.model_type!r} model cannot load the {saved_type!r} checkpoint in {save_dir}")
    cls = model if isinstance(model, type) else AutoModelForCausalLM
    try:
        out = cls.from_pretrained(p, device_map=device_map, dtype=dtype or torch.float32, max_memory=max_memory,
                                  **kwargs)
    except GiftError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise GiftError(f"could not load {save_dir}: {str(e).splitlines()[0]}") from None
    return out.eval()
