"""Calibration samples from any dataset form the API accepts: :func:`calibration_tensor` is the one entry point.

``dataset`` accepts what ``optimum.gptq.GPTQQuantizer`` accepts, and a bit more:
- a name (``"bundled"``, a local file/folder, a hub dataset) or None (the config's dataset, else bundled);
- a list of strings (documents; joined into fixed-length windows);
- a ``datasets.Dataset`` (its ``text`` column);
- token ids without a tokenizer: a 2-D tensor, a list of 1-D tensors / int lists, or a list of dicts with
  ``input_ids`` (Optimum style).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from gift_quant.config import GiftConfig
from gift_quant.errors import GiftError
from gift_quant.io.data import calibration_samples, load_texts, texts_from_records, tokenize_stream, windows


def _as_ids(item) -> torch.Tensor | None:
    if isinstance(item, dict) and "input_ids" in item:
        item = item["input_ids"]
    if torch.is_tensor(item):
        return item.long().flatten()
    if isinstance(item, (list, tuple)) and item and all(isinstance(v, int) and not isinstance(v, bool) for v in item):
        return torch.tensor(item, dtype=torch.long)
    return None


def token_samples(dataset, config: GiftConfig) -> torch.Tensor | None:
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
    """Windows from a user-given list of texts: fewer than asked is a warning, not an error (for named
    sources, :func:`_named_samples`, it is an error)."""
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


def _parts(source) -> list:
    """``a+b`` -> [a, b] unless a file of that name exists; None -> ['bundled']."""
    if source in (None, "", "default"):
        return ["bundled"]
    if isinstance(source, str) and "+" in source and not Path(os.path.expanduser(source)).exists():
        parts = [p.strip() for p in source.split("+")]
        if not all(parts):
            raise GiftError(f"calibration text {source!r}: an empty name around '+'")
        return parts
    return [source]


def _named_samples(source, tokenizer, n_samples: int, seq_len: int, seed: int, model, progress: bool) -> torch.Tensor:
    """``n_samples`` windows [n, seq_len] from a named source; ``a+b`` takes them evenly from each part (the
    first parts get the remainder); ``generated`` has ``model`` write the text."""
    parts = _parts(source)
    out = []
    for i, part in enumerate(parts):
        n = n_samples // len(parts) + (i < n_samples % len(parts))
        if n == 0:
            continue
        if part == "generated":
            if model is None:
                raise GiftError("calibration text 'generated' needs the model that writes it")
            from gift_quant.io.generated import generated_texts
            # ~15% margin: the text is re-tokenized after decoding, and every document adds an EOS
            texts = generated_texts(model, tokenizer, int(n * seq_len * 1.15) + seq_len, seed=seed, progress=progress)
        else:
            texts = load_texts(part)
        out.append(calibration_samples(texts, tokenizer, n, seq_len, seed, source=part if len(parts) > 1 else None))
    return torch.cat(out)


def calibration_tensor(dataset, tokenizer, config: GiftConfig, model=None, progress: bool = True) -> torch.Tensor:
    """Any accepted ``dataset`` form -> token windows [n, L]; ``model`` writes the ``generated`` text."""
    toks = token_samples(dataset, config)
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
        return _named_samples(dataset, tokenizer, config.calib_samples, config.seq_len, config.seed, model, progress)
    if hasattr(dataset, "column_names"):  # a datasets.Dataset
        if "input_ids" in dataset.column_names and "text" not in dataset.column_names:
            return calibration_tensor(list(dataset["input_ids"]), None, config)
        return _text_samples(texts_from_records(dataset, None), tokenizer, config)
    raise GiftError(f"dataset: unsupported type {type(dataset).__name__} (use a name, a list of strings, "
                    "token-id tensors or a datasets.Dataset)")
