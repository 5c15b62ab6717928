"""CLI flags generated from the setting declarations (``GiftConfig``, ``TrainSettings``), and mapped back
onto recipe keys in one place. A flag left out is None, so the recipe's value stands."""
from __future__ import annotations

import torch

from gift_quant.errors import GiftError
from gift_quant.settings import specs


def _flagged(cls):
    return {n: f for n, f in specs(cls).items() if f.metadata["flag"]}


def add_setting_flags(group, cls) -> None:
    for name, f in _flagged(cls).items():
        m, flag = f.metadata, f.metadata["flag"]
        default = f.default
        if isinstance(default, float) and 0 < default < 1e-3:
            default = f"{default:g}"
        text = m["help"].replace("%", "%%")  # argparse formats help with %
        help = f"{text} (default: the recipe's)" if default is None else f"{text} (default {default}, or the recipe's)"
        if bool in m["types"] and not m["nullable"]:
            off = flag.startswith("--no-")
            group.add_argument(flag, dest=name, action="store_false" if off else "store_true", default=None,
                               help=f"turn off (on by default): {text}" if off else text)
            continue
        kind = next((t for t in m["types"] if t in (int, float)), None)
        group.add_argument(flag, dest=name, type=kind, default=None, help=help)


def positive(v: str) -> int:
    """argparse type: an int >= 1 (a count of windows, tokens or steps)."""
    return _int_at_least(v, 1)


def non_negative(v: str) -> int:
    return _int_at_least(v, 0)


def _int_at_least(v: str, lo: int) -> int:
    import argparse
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {v!r}") from None
    if n < lo:
        raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
    return n


def overrides(a, *classes) -> dict:
    """Recipe keys of the flags given (unset flags are left out, so the recipe's values stand).
    ``--salient`` or ``--salient-ratio`` alone means exactly that: the other cap is cleared (None)."""
    out = {}
    for cls in classes:
        out.update({n: getattr(a, n) for n in _flagged(cls) if getattr(a, n) is not None})
    if "n_salient" in out or "salient_ratio" in out:
        out = {"n_salient": None, "salient_ratio": None, **out}
    return out


def resolve_device(spec: str | None) -> str | None:
    """Refuse a device this machine does not have, in one line, before any work."""
    if spec is None:
        return None
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise GiftError(f"--device: unknown device {spec!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if not torch.backends.cuda.is_built() else "no CUDA device found"
            raise GiftError(f"--device {spec}: CUDA is not available here ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GiftError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise GiftError(f"--device {spec}: only cpu and cuda are supported")
    return spec
