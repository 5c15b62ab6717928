"""The one module-swap helper: every conversion (compression, loading, training wrappers) goes through it."""
from __future__ import annotations

from typing import Callable

from torch import nn


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def swap_modules(root: nn.Module, fn: Callable[[str, nn.Module], nn.Module], kinds,
                 where: Callable[[str], bool] | None = None) -> dict[str, nn.Module]:
    """Replace every submodule of a type in ``kinds`` (and with a name ``where`` accepts) by
    ``fn(name, module)``; returns the new modules by name."""
    out = {}
    for name, m in list(root.named_modules()):
        if isinstance(m, kinds) and (where is None or where(name)):
            new = fn(name, m)
            set_module(root, name, new)
            out[name] = new
    return out
