"""One obvious entry point: ``quantize_(model, config, tokenizer, dataset)`` (in place, like torchao).

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

from .config import GiftConfig
from .errors import GiftError


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


def _text_samples(texts: list[str], tokenizer, config: GiftConfig, lenient: bool) -> torch.Tensor:
    from .data import calibration_samples, tokenize_stream, windows
    if not lenient:
        return calibration_samples(texts, tokenizer, config.calib_samples, config.seq_len, config.seed)
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


def calibration_tensor(dataset, tokenizer, config: GiftConfig) -> torch.Tensor:
    """Any accepted ``dataset`` form -> token windows [n, L]."""
    toks = _token_samples(dataset, config)
    if toks is not None:
        return toks
    if tokenizer is None:
        raise GiftError("dataset: a tokenizer is needed to turn text into calibration samples "
                        "(or pass token-id tensors)")
    if isinstance(dataset, (list, tuple)):
        if not all(isinstance(t, str) for t in dataset):
            raise GiftError("dataset: a list must hold strings, token-id tensors or dicts with input_ids")
        return _text_samples(list(dataset), tokenizer, config, lenient=True)
    if dataset is None or isinstance(dataset, str):
        from .data import load_texts
        return _text_samples(load_texts(dataset), tokenizer, config, lenient=False)
    if hasattr(dataset, "column_names"):  # a datasets.Dataset
        from .data import _texts_from_records
        if "input_ids" in dataset.column_names and "text" not in dataset.column_names:
            return calibration_tensor(list(dataset["input_ids"]), None, config)
        return _text_samples(_texts_from_records(dataset, None), tokenizer, config, lenient=True)
    raise GiftError(f"dataset: unsupported type {type(dataset).__name__} (use a name, a list of strings, "
                    "token-id tensors or a datasets.Dataset)")


# kept for callers of the first draft
def _samples(dataset, tokenizer, config: GiftConfig) -> torch.Tensor:
    return calibration_tensor(dataset, tokenizer, config)


def quantize_(model, config: GiftConfig, tokenizer=None, dataset=None, device=None, progress: bool = True):
    """Compress ``model`` in place; returns the :class:`gift_quant.pipeline.CompressReport`."""
    from .pipeline import compress_model
    torch.manual_seed(config.seed)
    samples = calibration_tensor(dataset if dataset is not None else config.dataset, tokenizer, config)
    return compress_model(model, samples, config, device=device, progress=progress)


def _resolve_tokenizer(tok, model):
    """``GiftConfig.tokenizer`` may be a tokenizer object, a path / hub name, or None (the model's path)."""
    if tok is not None and not isinstance(tok, str):
        return tok
    from transformers import AutoTokenizer
    src = tok or getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not src:
        raise GiftError("GiftConfig.tokenizer: quantize-on-load needs a tokenizer (the model path has none); "
                        "pass GiftConfig(tokenizer=...)")
    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise GiftError(f"GiftConfig.tokenizer: could not load a tokenizer from {src!r} "
                        f"({str(e).splitlines()[0]}); pass GiftConfig(tokenizer=...)") from None


def quantize_loaded_model(model, config: GiftConfig):
    """Quantize-on-load hook for ``from_pretrained(..., quantization_config=GiftConfig(...))``.

    Runs after transformers loaded the float weights into ordinary Linears. Objects that cannot go
    into ``config.json`` (a tokenizer instance, an in-memory dataset) are dropped from the saved config.
    """
    tok_field = getattr(config, "tokenizer", None)
    dataset = config.dataset
    if _token_samples(dataset, config) is not None:
        tok = None
    else:
        tok = _resolve_tokenizer(tok_field, model)
    quantize_(model, config, tok, dataset, progress=getattr(config, "progress", False))
    if tok_field is not None and not isinstance(tok_field, str):
        config.tokenizer = None
    if dataset is not None and not isinstance(dataset, str):
        config.dataset = None
    return model
