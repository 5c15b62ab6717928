"""Calibration samples from any dataset form the API accepts.

``dataset`` accepts what ``optimum.gptq.GPTQQuantizer`` accepts, and a bit more:
- a name (``"bundled"``, a local file/folder, a hub dataset) or None (the config's dataset, else bundled);
- a list of strings (documents; joined into fixed-length windows);
- a ``datasets.Dataset`` (its ``text`` column);
- token ids without a tokenizer: a 2-D tensor, a list of 1-D tensors / int lists, or a list of dicts with
  ``input_ids`` (Optimum style).
"""
from __future__ import annotations

import warnings

import torch

from gift_quant.config import GiftConfig
from gift_quant.errors import GiftError


def _as_ids(item) -> torch.Tensor | None:
    if isinstance(item, dict) and "input_ids" in item:
        item = item["input_ids"]
    if torch.is_tensor(item):
        return item.long().flatten()
    if isinstance(item, (list, tuple)) and item and all(isinstance(v, int) and not isinstance(v, bool) for v in item):
        return torch.tensor(item, dtype=torch.long)
    return None


def _token_samples(dataset, config: GiftConfig) -> torch.Tensor | None:
    """Token-id inputs -> [n, L]; None when ``dataset`` is not token ids."""
    if torch.is_tensor(dataset):
        if dataset.dim() == 1:
            dataset = dataset[None]
        if dataset.dim() != 2 or dataset.is_floating_point():
            raise GiftError(f"dataset: a token-id tensor must be 2-D integer [n, seq], got {tuple(dataset.shape)} "
                            f"{dataset.dtype}")
        return dataset.long()[:, : config.seq_len]
    if not isinstance(dataset, (list, tuple)) or not dataset:
        return None
    ids = [_as_ids(x) for x in dataset]
    if any(i is None for i in ids):
        if all(i is None for i in ids):
            return None
        raise GiftError("dataset: mixes token ids with other items; give all strings or all token ids")
    lengths = {i.numel() for i in ids}
    if 0 in lengths:
        raise GiftError("dataset: contains an empty token sequence")
    L = min(min(lengths), config.seq_len)
    if len(lengths) > 1:
        warnings.warn(f"calibration sequences have different lengths; all are cut to the shortest ({L} tokens)")
    return torch.stack([i[:L] for i in ids])


def _text_samples(texts: list[str], tokenizer, config: GiftConfig) -> torch.Tensor:
    """Windows from a user-given list of texts: fewer than asked is a warning, not an error (named
    sources go through :func:`gift_quant.io.data.calibration_windows`, where it is an error)."""
    from gift_quant.io.data import calibration_samples, tokenize_stream, windows
    stream = tokenize_stream(texts, tokenizer)
    w = windows(stream, config.seq_len)
    if w.shape[0] >= config.calib_samples:
        return calibration_samples(texts, tokenizer, config.calib_samples, config.seq_len, config.seed)
    # a short user-given list: use what there is rather than fail (Optimum accepts a handful of strings)
    if w.shape[0] == 0:
        if stream.numel() < 2:
            raise GiftError("dataset: the calibration text tokenizes to fewer than 2 tokens")
        w = stream[None]
    warnings.warn(f"calibration text gives only {w.shape[0]} window(s) of {w.shape[1]} tokens "
                  f"(calib_samples={config.calib_samples}, seq_len={config.seq_len}); using them all")
    return w


def calibration_tensor(dataset, tokenizer, config: GiftConfig, model=None, progress: bool = True) -> torch.Tensor:
    """Any accepted ``dataset`` form -> token windows [n, L]; ``model`` writes the ``generated`` text."""
    toks = _token_samples(dataset, config)
    if toks is not None:
        return toks
    if tokenizer is None:
        raise GiftError("dataset: a tokenizer is needed to turn text into calibration samples "
                        "(or pass token-id tensors)")
    if isinstance(dataset, (list, tuple)):
        if not all(isinstance(t, str) for t in dataset):
            raise GiftError("dataset: a list must hold strings, token-id tensors or dicts with input_ids")
        return _text_samples(list(dataset), tokenizer, config)
    if dataset is None or isinstance(dataset, str):
        from gift_quant.io.data import calibration_windows
        return calibration_windows(dataset, tokenizer, config.calib_samples, config.seq_len, config.seed, model=model,
                                   progress=progress)
    if hasattr(dataset, "column_names"):  # a datasets.Dataset
        from gift_quant.io.data import _texts_from_records
        if "input_ids" in dataset.column_names and "text" not in dataset.column_names:
            return calibration_tensor(list(dataset["input_ids"]), None, config)
        return _text_samples(_texts_from_records(dataset, None), tokenizer, config)
    raise GiftError(f"dataset: unsupported type {type(dataset).__name__} (use a name, a list of strings, "
                    "token-id tensors or a datasets.Dataset)")
