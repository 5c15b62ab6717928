"""One obvious entry point: ``quantize_(model, config, tokenizer, dataset)`` (in place, like torchao)."""
from __future__ import annotations

import torch

from gift_quant.compress.calibration import calibration_tensor
from gift_quant.compress.pipeline import compress_model
from gift_quant.config import GiftConfig


def quantize_(model, config: GiftConfig, tokenizer=None, dataset=None, device=None, progress: bool = True):
    """Compress ``model`` in place; returns the :class:`~gift_quant.compress.report.CompressReport`.
    ``dataset``: see :mod:`gift_quant.compress.calibration` (default: the config's, else bundled)."""
    torch.manual_seed(config.seed)
    samples = calibration_tensor(dataset if dataset is not None else config.dataset, tokenizer, config, model=model,
                                 progress=progress)
    return compress_model(model, samples, config, device=device, progress=progress)
