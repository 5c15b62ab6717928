"""Where derived text (stdlib docstrings, generated calibration text) is cached."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``GIFT_QUANT_CACHE``, default ~/.cache/gift_quant."""
    return Path(os.environ.get("GIFT_QUANT_CACHE", Path.home() / ".cache" / "gift_quant"))
