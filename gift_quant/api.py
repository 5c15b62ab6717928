"""One obvious entry point: ``quantize_(model, config, tokenizer, dataset)`` (in place, like torchao)."""
from __future__ import annotations

import torch

from .config import GiftConfig
from .errors import GiftError


def _samples(dataset, tokenizer, config: GiftConfig) -> torch.Tensor:
    from .data import calibration_samples, load_texts
    if torch.is_tensor(dataset):
        return dataset.long()
    if isinstance(dataset, list) and dataset and all(torch.is_tensor(t) for t in dataset):
        return torch.stack([t.long().flatten()[: config.seq_len] for t in dataset])
    if tokenizer is None:
        raise GiftError("a tokenizer is needed to turn text into calibration samples")
    if isinstance(dataset, list):
        texts = dataset
    elif dataset is None or isinstance(dataset, str):
        texts = load_texts(dataset)
    else:  # a datasets.Dataset
        from .data import _texts_from_records
        texts = _texts_from_records(dataset, None)
    return calibration_samples(texts, tokenizer, config.calib_samples, config.seq_len, config.seed)


def quantize_(model, config: GiftConfig, tokenizer=None, dataset=None, device=None, progress: bool = True):
    """Compress ``model`` in place; returns the :class:`gift_quant.pipeline.CompressReport`."""
    from .pipeline import compress_model
    torch.manual_seed(config.seed)
    samples = _samples(dataset if dataset is not None else config.dataset, tokenizer, config)
    return compress_model(model, samples, config, device=device, progress=progress)


def quantize_loaded_model(model, config: GiftConfig):
    """Quantize-on-load hook for ``from_pretrained(..., quantization_config=GiftConfig(...))``."""
    from transformers import AutoTokenizer
    tok = None
    if not torch.is_tensor(config.dataset):
        tok = AutoTokenizer.from_pretrained(getattr(config, "tokenizer", None) or model.config._name_or_path)
    quantize_(model, config, tok, config.dataset)
