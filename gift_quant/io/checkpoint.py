"""Reading gift checkpoints: the empty modules a checkpoint's config implies, the check of its tensor shapes
against them, and :func:`load_checkpoint`.

``from_pretrained`` finds the ``gift_sw`` method because importing any part of ``gift_quant`` runs the
package's ``__init__``, which registers it with transformers (:mod:`gift_quant.integrations.transformers`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from gift_quant.config import QUANT_METHOD, GiftConfig
from gift_quant.errors import GiftError
from gift_quant.nn import MixedPrecisionLinear
from gift_quant.nn.experts import split_fused_experts
from gift_quant.nn.swap import swap_modules


def expected_shapes(m: MixedPrecisionLinear) -> dict[str, tuple]:
    """The checkpoint tensors of ``m`` and their shapes, as ``MixedPrecisionLinear.__init__`` allocates them
    (the buffer names are the checkpoint keys)."""
    return {n: tuple(t.shape) for n, t in [*m.named_buffers(recurse=False), *m.named_parameters(recurse=False)]}


def checkpoint_shapes(files) -> dict[str, tuple]:
    """Tensor name -> shape over the checkpoint's safetensors files, read from their headers."""
    from safetensors import safe_open
    shapes = {}
    for f in files or []:
        if not str(f).endswith(".safetensors"):
            raise GiftError(f"{f}: only safetensors checkpoints are read (no pickle)")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    shapes[key] = tuple(sf.get_slice(key).get_shape())
        except Exception as e:
            raise GiftError(f"{Path(f).name}: unreadable or truncated safetensors file ({e})") from None
    return shapes


def replace_linears(model: nn.Module, config: GiftConfig, dtype=torch.float16) -> list[str]:
    """Swap every Linear that ``config`` converts for an empty MixedPrecisionLinear (in place)."""
    split_fused_experts(model, config.is_converted)  # MoE: fused experts -> one Linear per expert first

    def empty(name, lin):
        return MixedPrecisionLinear(lin.in_features, lin.out_features, config.bits, config.group_size,
                                    config.salient_for(lin.in_features, name), bias=lin.bias is not None,
                                    dtype=dtype, device=lin.weight.device)
    return list(swap_modules(model, empty, (nn.Linear,), where=config.is_converted))


def check_against_checkpoint(model: nn.Module, shapes: dict[str, tuple]):
    """Every MixedPrecisionLinear must find each of its tensors, with the shape the config implies."""
    for name, m in model.named_modules():
        if not isinstance(m, MixedPrecisionLinear):
            continue
        for t, shape in expected_shapes(m).items():
            key = f"{name}.{t}"
            got = shapes.get(key)
            if got is None:
                raise GiftError(f"checkpoint disagrees with its config at {name}: tensor {t!r} is missing")
            if got != shape:
                raise GiftError(f"checkpoint disagrees with its config at {name}: {t} has shape {list(got)}, "
                                f"config (bits={m.bits}, group_size={m.group_size}, k={m.n_salient}) implies {list(shape)}")


def is_gift_checkpoint(path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    q = json.loads(cfg.read_text()).get("quantization_config") or {}
    return q.get("quant_method") == QUANT_METHOD


def is_gift_dict(q: dict) -> bool:
    """A quantization_config written by gift-quant, whatever its quant_method says."""
    return str(q.get("format", "")).startswith("gift_sw") or "salient_counts" in q


def looks_like_gift(path) -> str | None:
    """Why ``path`` holds gift-quant tensors under another quant_method (or none), else None."""
    p = Path(path)
    if not (p / "config.json").is_file() or is_gift_checkpoint(p):
        return None
    try:
        q = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
    except ValueError:
        return None
    keys = set(checkpoint_shapes(sorted(p.glob("*.safetensors"))))
    gift_keys = sorted({k.rsplit(".", 1)[-1] for k in keys} & {"salient_weight", "salient_idx"})
    if not gift_keys and not is_gift_dict(q):
        return None
    return (f"{path} holds gift-quant tensors ({', '.join(gift_keys) or 'gift_sw format'}) but its "
            f"quantization_config.quant_method is {q.get('quant_method')!r}, not {QUANT_METHOD!r}: "
            "loading it would leave random Linears; fix config.json")


def load_checkpoint(path, dtype=None, device=None):
    """(model, tokenizer) of a gift checkpoint folder, with clear errors for anything that is not one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = Path(path)
    if not p.is_dir():
        raise GiftError(f"checkpoint folder not found: {path}")
    if not (p / "config.json").is_file():
        raise GiftError(f"{path} is not a checkpoint (no config.json)")
    if not is_gift_checkpoint(p):  # a misnamed gift checkpoint says so; anything else is not one
        raise GiftError(looks_like_gift(p) or f"{path} is not a gift-quant checkpoint "
                        f"(quantization_config.quant_method != {QUANT_METHOD!r})")
    if not any(p.glob("*.safetensors")):
        raise GiftError(f"{path} has no safetensors weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype or torch.float32, device_map=device)
    except GiftError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise GiftError(f"could not load {path}: {str(e).splitlines()[0]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError):
        tok = None
    return model.eval(), tok
