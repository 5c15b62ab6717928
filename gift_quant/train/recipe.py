"""Recipes: a method name plus a :class:`GiftConfig` and a :class:`TrainSettings`, read from YAML.

A recipe file is a flat mapping whose keys are ``recipe`` (the method: none, post, pre, ste, lora),
``description``, and the fields of ``GiftConfig`` and ``TrainSettings`` (each declared once, there), plus
optional ``cpu:`` / ``gpu:`` mappings applied on that kind of machine. Built-ins live in
``gift_quant/recipes/*.yaml`` (package data; ``recipes/`` in the repository points there). CLI flags
override YAML fields. A key the recipe does not know, or a wrong type, is a one-line :class:`GiftError`.
"""
from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import torch

from gift_quant.config import GiftConfig
from gift_quant.errors import GiftError
from gift_quant.settings import saved_fields, specs, type_error, value_error
from gift_quant.train.settings import TrainSettings

OVERRIDE_SECTIONS = ("cpu", "gpu")


@dataclasses.dataclass
class Recipe:
    method: str
    config: GiftConfig
    train: TrainSettings
    description: str = ""

    def __post_init__(self):
        if self.train.noise is None:  # the method's default, whatever file names the method
            from gift_quant.train.methods import METHODS
            noise = METHODS[self.method].default_noise if self.method in METHODS else "none"
            self.train = dataclasses.replace(self.train, noise=noise)

    def to_dict(self) -> dict:
        """The flat form a recipe file uses (written as ``recipe.json`` beside a checkpoint)."""
        c = {k: v for k, v in saved_fields(self.config).items() if k in recipe_keys()}
        return {"recipe": self.method, "description": self.description, **c, **saved_fields(self.train)}

    def fingerprint_fields(self) -> dict:
        """What resumable state must agree on (everything but checkpoint cadence and display)."""
        c = {k: v for k, v in self.config.to_dict().items() if k != "salient_counts"}
        return {"recipe": self.method, **c, **self.train.resume_fields()}


def recipe_keys() -> dict[str, dataclasses.Field]:
    """Every key a recipe file may set, with the field that declares it."""
    out = {}
    for cls in (GiftConfig, TrainSettings):
        out.update({n: f for n, f in specs(cls).items() if f.metadata["recipe"]})
    return out


def _check(key: str, value, where: str):
    keys = recipe_keys()
    if key in ("recipe", "description"):
        if not isinstance(value, str):
            raise GiftError(f"{where}: recipe key {key!r} must be str, got {value!r}")
        return
    if key not in keys:
        raise GiftError(f"{where}: unknown recipe key {key!r} (known: {', '.join(sorted([*keys, 'recipe', 'description']))})")
    msg = type_error(key, value, keys[key].metadata)
    if msg:
        raise GiftError(f"{where}: recipe key {key!r} {msg}")


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("gift_quant").joinpath("recipes").iterdir()
                  if p.name.endswith(".yaml"))


def _unique_key_loader():
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: left to PyYAML's own error
                continue
            if dup:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
        return loader.construct_mapping(node, deep)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _read_yaml(spec: str) -> tuple[dict, str]:
    import yaml
    path = Path(spec).expanduser()
    # a built-in name wins over a stray local file of that name (`--recipe none` beside a file `none`)
    if spec.endswith((".yaml", ".yml")) or (spec not in builtin_names() and path.is_file()):
        if not path.is_file():
            raise GiftError(f"recipe file not found: {spec}")
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise GiftError(f"{where}: not a UTF-8 text file") from None
        except OSError as e:
            raise GiftError(f"{where}: cannot read it ({e.strerror or e})") from None
    elif spec in builtin_names():
        res = resources.files("gift_quant").joinpath("recipes", f"{spec}.yaml")
        text, where = res.read_text(encoding="utf-8"), f"built-in recipe {spec!r}"
    else:
        raise GiftError(f"unknown recipe {spec!r}; choose one of {', '.join(builtin_names())} or give a .yaml file")
    try:
        data = yaml.load(text, Loader=_unique_key_loader())
    except yaml.YAMLError as e:
        raise GiftError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GiftError(f"{where}: a recipe must be a mapping of keys to values")
    return data, where


def load_recipe(spec: str = "none", overrides: dict | None = None, device: str | None = None) -> Recipe:
    """Read a built-in name or a YAML path, apply the ``cpu``/``gpu`` section, then ``overrides``
    (None clears a nullable field and is skipped for the others)."""
    from gift_quant.train.methods import METHODS
    data, where = _read_yaml(spec)
    kind = "gpu" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
    merged = {}
    for k, v in data.items():
        if k in OVERRIDE_SECTIONS:
            if not isinstance(v, dict):
                raise GiftError(f"{where}: recipe key {k!r} must be a mapping of overrides")
            for k2, v2 in v.items():
                _check(k2, v2, f"{where} ({k})")
            continue
        _check(k, v, where)
        merged[k] = v
    merged.update(data.get(kind) or {})
    for k, v in (overrides or {}).items():
        if v is not None or (k in recipe_keys() and recipe_keys()[k].metadata["nullable"]):
            _check(k, v, "command line")
            meta = recipe_keys()[k].metadata
            msg = value_error(v, meta)
            if msg:
                raise GiftError(f"{meta['flag'] or k} {msg}")
            merged[k] = v
    method = merged.pop("recipe", None)
    if method not in METHODS:
        raise GiftError(f"{where}: recipe must be one of {', '.join(METHODS)}, got {method!r}")
    description = merged.pop("description", "")
    train_keys = specs(TrainSettings)
    try:
        cfg = GiftConfig(recipe=method, **{k: v for k, v in merged.items() if k not in train_keys})
        ts = TrainSettings(**{k: v for k, v in merged.items() if k in train_keys})
    except GiftError as e:
        raise GiftError(f"{where}: {e}") from None
    return Recipe(method, cfg, ts, description)
