"""Optimum-style API, mirroring ``optimum.gptq.GPTQQuantizer``:

    quantizer = GiftQuantizer(bits=4, dataset="bundled", n_salient=128)
    model = quantizer.quantize_model(model, tokenizer)
    quantizer.save(model, "out")
    model = load_quantized_model(empty_or_any_model, "out")
"""
from __future__ import annotations

from pathlib import Path

from .api import quantize_
from .config import GiftConfig
from .errors import GiftError


class GiftQuantizer:
    def __init__(self, bits: int = 4, dataset=None, group_size: int = 128, n_salient: int | None = 128,
                 salient_ratio: float | None = 1 / 32, metric: str = "gift", recipe: str = "none",
                 desc_act: bool = True, sym: bool = False, **kwargs):
        if recipe != "none":
            from .cli import RECIPES_NOT_YET
            if recipe in RECIPES_NOT_YET:
                raise GiftError(f"recipe {recipe!r} is not available through GiftQuantizer yet; use the CLI")
        self.dataset = dataset
        self.config = GiftConfig(bits=bits, group_size=group_size, n_salient=n_salient, salient_ratio=salient_ratio,
                                 metric=metric, recipe=recipe, desc_act=desc_act, sym=sym,
                                 dataset=dataset if isinstance(dataset, str) else None, **kwargs)
        self.report = None

    def quantize_model(self, model, tokenizer=None, device=None, progress: bool = True):
        """Compress ``model`` in place (and return it). ``dataset`` may be a list of strings, a list of
        token-id tensors (then ``tokenizer`` may be None), a ``datasets.Dataset`` or a name."""
        self.report = quantize_(model, self.config, tokenizer, self.dataset, device=device, progress=progress)
        return model

    def save(self, model, save_dir, tokenizer=None, max_shard_size: str = "10GB"):
        save_dir = Path(save_dir)
        model.save_pretrained(save_dir, max_shard_size=max_shard_size, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_dir)
        if self.report is not None:
            from .export import save_saliency
            save_saliency(self.report, save_dir / "saliency.safetensors")


def load_quantized_model(model, save_dir, device_map=None, dtype=None):
    """Load a gift checkpoint. ``model`` (any instance or None) is accepted for Optimum compatibility;
    the architecture comes from ``save_dir``'s config."""
    from .hf import load_checkpoint
    loaded, _ = load_checkpoint(save_dir, dtype=dtype, device=device_map)
    return loaded
