"""How a setting is declared: once, as a dataclass field with its type (the annotation), default, range and
help.

``GiftConfig`` (compression) and ``TrainSettings`` (training) declare their fields with :func:`setting`;
:func:`validate` checks them, the recipe reader accepts exactly these names, and the CLI builds its flags
from the same metadata, so no default or range is written twice.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from gift_quant.errors import GiftError

_NONE = type(None)


def setting(default: Any, help: str, *, choices: tuple | None = None, lo: float | None = None,
            hi: float | None = None, lo_open: bool = False, hi_open: bool = False, nullable: bool = False,
            flag: str | None = None, check: Callable[[Any], str | None] | None = None,
            runtime: bool = False, recipe: bool = True) -> Any:
    """A dataclass field; the types it accepts are its annotation's (``Any``: anything; ``a | b``: either).
    ``flag``: its CLI option (None: no flag). ``runtime``: not saved with the config. ``recipe``: accepted as
    a recipe YAML key. ``check`` returns an error message or None."""
    meta = dict(help=help, types=None, choices=choices, lo=lo, hi=hi, lo_open=lo_open,
                hi_open=hi_open, nullable=nullable, flag=flag, check=check, runtime=runtime, recipe=recipe)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _accepted(annotation) -> tuple:
    """The classes an annotation admits: ``int`` -> (int,), ``str | int`` -> (str, int), ``Any`` -> (object,)."""
    if annotation is Any:
        return (object,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(annotation) if a is not _NONE for t in _accepted(a))
    return (annotation,)


def specs(cls) -> dict[str, dataclasses.Field]:
    """The settings of ``cls`` by name; the first call fills each one's ``types`` from its annotation."""
    out = {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}
    for f in out.values():
        if f.metadata["types"] is None:
            ann = eval(f.type, vars(sys.modules[cls.__module__])) if isinstance(f.type, str) else f.type
            f.metadata = types.MappingProxyType({**f.metadata, "types": _accepted(ann)})
    return out


def type_error(name: str, value, meta: dict) -> str | None:
    """The message for a value of the wrong type (bool is never an int), else None."""
    types = meta["types"] + ((_NONE,) if meta["nullable"] else ())
    if value is None and meta["nullable"]:
        return None
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if ok:
        return None
    names = "/".join("null" if t is _NONE else t.__name__ for t in types)
    hint = ""
    if float in types and isinstance(value, str):
        try:
            float(value)
            hint = " (YAML reads a number like 1e-4 as text: write 1.0e-4)"
        except ValueError:
            pass
    return f"must be {names}, got {value!r}{hint}"


def value_error(value, meta: dict) -> str | None:
    """The message for a value outside its choices or range, else None."""
    if value is None:
        return None
    if meta["choices"] is not None and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}"
    lo, hi = meta["lo"], meta["hi"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) and (lo is not None or hi is not None):
            return f"must be a finite number, got {value!r}"
        if lo is not None and (value <= lo if meta["lo_open"] else value < lo):
            return f"must be {'>' if meta['lo_open'] else '>='} {lo}, got {value!r}"
        if hi is not None and (value >= hi if meta["hi_open"] else value > hi):
            return f"must be {'<' if meta['hi_open'] else '<='} {hi}, got {value!r}"
    return meta["check"](value) if meta["check"] else None


def validate(obj, where: str):
    """Raise one :class:`GiftError` naming the first field of ``obj`` that is invalid."""
    for name, f in specs(type(obj)).items():
        value = getattr(obj, name)
        msg = type_error(name, value, f.metadata) or value_error(value, f.metadata)
        if msg:
            raise GiftError(f"{where}.{name}: {msg}")


def saved_fields(obj) -> dict[str, Any]:
    """Fields that belong in a saved config (runtime-only ones, like a tokenizer object, excluded)."""
    return {n: getattr(obj, n) for n, f in specs(type(obj)).items() if not f.metadata["runtime"]}
