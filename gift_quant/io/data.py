"""Text sources and fixed-length token windows for calibration, training and evaluation.

Built-in text ships with CPython, so everything works offline:
- ``bundled`` (calibration/training): ``pydoc_data.topics`` minus a fixed held-out fifth of its topics;
- ``topics-heldout``: that held-out fifth (same domain, never used for calibration or training);
- ``idle`` (default evaluation): the IDLE manual and IDLE's NEWS file, another domain, never used for
  calibration or training;
- ``licenses`` (second evaluation domain, legal English rather than Python documentation): CPython's
  LICENSE.txt, then the top-level license files of the installed distributions gift-quant requires
  (sorted, duplicates dropped). Never used for calibration or training; it follows the installed
  versions, so compare its perplexities only within one environment.
- ``generated`` (calibration only): text the model being compressed writes itself, on general topics
  (:mod:`gift_quant.io.generated`); it needs the model, so the calibration entry point
  (:func:`gift_quant.compress.calibration.calibration_tensor`) reads it.
``a+b`` (calibration) draws the windows evenly from each named source, e.g. ``bundled+generated``.
Anything else is a local .txt / .jsonl / .json / .parquet file or folder read through ``datasets``, or a
hub dataset name where a hub is reachable.
"""
from __future__ import annotations

import html.parser
import os
import zlib
from pathlib import Path
from collections.abc import Callable

import torch

from gift_quant.errors import GiftError
from gift_quant.io.atomic import write_json
from gift_quant.io.cache import cache_dir

EVAL_DOMAINS = ("idle", "licenses")   # held-out evaluation domains the defaults never train or calibrate on
_LICENSED_DISTS = ("accelerate", "datasets", "gguf", "numpy", "pyyaml", "safetensors", "tokenizers", "torch",
                   "tqdm", "transformers")
# local data files by suffix -> the datasets builder that reads them (.txt/.md are read directly)
_FILE_KINDS = {".txt": None, ".md": None, ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _topics(heldout: bool) -> list[str]:
    from pydoc_data.topics import topics
    keys = sorted(topics)
    return [topics[k] for k in keys if (zlib.crc32(k.encode()) % 5 == 0) == heldout]


class _TextOnly(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def _idle_docs() -> list[str]:
    try:
        import idlelib
    except ImportError:  # some Python builds (slim images) leave idlelib out
        raise GiftError("the built-in evaluation text 'idle' needs the stdlib's idlelib, which this Python "
                        "lacks; pass --eval-dataset topics-heldout, licenses or a FILE") from None
    root = Path(idlelib.__file__).parent
    out = []
    help_html = root / "help.html"
    if help_html.exists():
        p = _TextOnly()
        p.feed(help_html.read_text(encoding="utf-8", errors="replace"))
        text = "".join(p.parts)
        out.append("\n".join(line.rstrip() for line in text.splitlines() if line.strip()))
    news = root / "NEWS.txt"
    if news.exists():
        out.append(news.read_text(encoding="utf-8", errors="replace"))
    if not out:
        raise GiftError("the built-in evaluation text (idlelib docs) is missing from this Python install; "
                        "pass --dataset FILE")
    return out


def _license_texts() -> list[str]:
    import hashlib
    import importlib.metadata as md
    import sysconfig
    out, seen = [], set()

    def add(text):
        text = text.strip()
        key = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
        if len(text) >= 200 and key not in seen:
            seen.add(key)
            out.append(text)
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if lic.is_file():
        add(lic.read_text(encoding="utf-8", errors="replace"))
    for name in _LICENSED_DISTS:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        files = sorted(str(f) for f in dist.files or [])
        for f in files:
            parts = f.split("/")
            if (len(parts) in (2, 3) and parts[0].endswith(".dist-info") and (len(parts) == 2 or parts[1] == "licenses")
                    and parts[-1].upper().startswith(("LICENSE", "COPYING", "NOTICE"))):
                add(dist.read_text("/".join(parts[1:])) or "")
    if not out:
        raise GiftError("the built-in evaluation text 'licenses' found no license files in this install; "
                        "pass --dataset FILE")
    return out


def texts_from_records(ds, text_field: str | None) -> list[str]:
    """The non-empty strings of a ``datasets.Dataset``'s text column (``text_field``, else text/content/document)."""
    cols = ds.column_names
    field = text_field or next((c for c in ("text", "content", "document") if c in cols), None)
    if field is None:
        raise GiftError(f"dataset has no text column (columns: {', '.join(cols)}); pass a text field")
    return [t for t in ds[field] if isinstance(t, str) and t]


def _not_a_text() -> list[str]:
    raise GiftError("'generated' is text the model being compressed writes itself: it serves calibration "
                    "(--dataset generated), not evaluation or training")


# built-in text sources by name; the loaders look the functions up when called, so a patched one is used
TEXT_SOURCES: dict[str, Callable[[], list[str]]] = {
    "bundled": lambda: _topics(heldout=False),
    "topics-heldout": lambda: _topics(heldout=True),
    "idle": lambda: _idle_docs(),
    "licenses": lambda: _license_texts(),
    "generated": _not_a_text,  # read by the calibration entry point, which has the model
}
BUILTIN = tuple(TEXT_SOURCES)


def load_texts(source: str | None = None, split: str = "train", text_field: str | None = None) -> list[str]:
    """List of documents from a built-in name, a local file/folder, or a hub dataset name."""
    loader = TEXT_SOURCES.get("bundled" if source in (None, "", "default") else source)
    if loader is not None:
        return loader()
    return _read_dataset(source, split, text_field)


def _read_dataset(source: str, split: str, text_field: str | None) -> list[str]:
    path = Path(os.path.expanduser(source))
    if path.suffix in _FILE_KINDS and not path.exists():
        raise GiftError(f"dataset file not found: {source}")
    if path.suffix in (".txt", ".md") and path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        if "\x00" in text or text.count("\ufffd") * 100 > len(text):  # binary data named .txt
            raise GiftError(f"{source} is not UTF-8 text: binary data, or another encoding (UTF-16, Latin-1: "
                            f"convert it with `iconv -t utf-8`)")
        return [text]
    try:
        import datasets
    except ImportError:
        raise GiftError(f"reading {source!r} needs the `datasets` package: pip install datasets") from None
    try:
        if path.is_file():
            kind = _FILE_KINDS.get(path.suffix)
            if kind is None:
                raise GiftError(f"unsupported data file type {path.suffix!r} ({path}); use .txt, .jsonl, .json or .parquet")
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split=split)
        elif source.count("/") <= 1 and not source.startswith((".", "/")):
            ds = datasets.load_dataset(source, split=split)
        else:
            raise GiftError(f"dataset not found: {source}")
    except GiftError:
        raise
    except Exception as e:  # hub unreachable, bad file, ...
        raise GiftError(f"could not load dataset {source!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return texts_from_records(ds, text_field)


def tokenize_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents tokenized and joined with EOS into one 1-D stream."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def calibration_samples(texts: list[str], tokenizer, n_samples: int, seq_len: int, seed: int = 0,
                        what: str = "calibration", source: str | None = None) -> torch.Tensor:
    """``n_samples`` random non-overlapping windows [n, seq_len] (seeded)."""
    w = windows(tokenize_stream(texts, tokenizer), seq_len)
    if w.shape[0] < n_samples:
        where = f" in {source!r}" if source else ""
        raise GiftError(f"too little {what} text{where}: {w.shape[0]} windows of {seq_len} tokens, need {n_samples} "
                        "(lower --calib-samples or --seq-len, or give more text)")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(w.shape[0], generator=g)[:n_samples].sort().values
    return w[idx]


def eval_windows(texts: list[str], tokenizer, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """The first ``max_windows`` consecutive windows (deterministic, comparable across runs)."""
    w = windows(tokenize_stream(texts, tokenizer), seq_len)
    if w.shape[0] == 0:
        raise GiftError(f"too little evaluation text: fewer than {seq_len} tokens")
    return w if max_windows is None else w[:max_windows]


# ---- training corpus (GIFT-SW training issue) ---------------------------------------------------
# Never used for training: idlelib (its docs/NEWS are the default evaluation text 'idle'), pydoc_data
# (its held-out topics are 'topics-heldout'), tests, and third-party site-packages.
_DOCSTRING_EXCLUDE = ("idlelib", "pydoc_data", "test", "tests", "site-packages", "dist-packages",
                      "lib2to3", "turtledemo", "__pycache__")


def _stdlib_root() -> Path:
    import sysconfig
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings of the CPython standard library (modules, classes, functions), extracted with ``ast``.

    One document per module (its docstrings joined in source order), sorted by path, so the result is
    deterministic for a given Python build. Several MB of English prose; idlelib, pydoc_data and tests
    are excluded (see ``_DOCSTRING_EXCLUDE``). Cached per Python version under ~/.cache/gift_quant.
    """
    import ast
    import json
    import sys
    cache = cache_dir() / f"stdlib-docstrings-{sys.version_info[0]}.{sys.version_info[1]}-{min_chars}.json"
    try:
        return json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    root = _stdlib_root()
    docs = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        if any(p in _DOCSTRING_EXCLUDE or p.startswith("test_") for p in rel):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, OSError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node, clean=True)
                if d and len(d) >= 40:
                    parts.append(d)
        text = "\n\n".join(parts)
        if len(text) >= min_chars:
            docs.append(text)
    if not docs:
        raise GiftError(f"no standard-library docstrings found under {root}; pass --train-dataset FILE")
    try:
        write_json(cache, docs)
    except OSError:
        pass
    return docs


TRAIN_TEXT_SOURCES: dict[str, Callable[[], list[str]]] = {
    "train": lambda: load_texts("bundled") + stdlib_docstrings(),
    "stdlib-docstrings": lambda: stdlib_docstrings(),
}
TRAIN_SOURCES = tuple(TRAIN_TEXT_SOURCES)


def load_train_texts(source: str | None = None, text_field: str | None = None) -> list[str]:
    """Training text: ``train`` (default) = the ``bundled`` topics split + stdlib docstrings;
    ``stdlib-docstrings`` alone; anything else as :func:`load_texts`."""
    loader = TRAIN_TEXT_SOURCES.get("train" if source in (None, "") else source)
    if loader is not None:
        return loader()
    return load_texts(source, text_field=text_field)
