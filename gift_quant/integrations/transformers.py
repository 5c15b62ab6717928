"""transformers integration: the ``gift_sw`` quantization method.

Importing ``gift_quant`` registers :class:`GiftConfig` and :class:`GiftHfQuantizer` (idempotently), so
``AutoModelForCausalLM.from_pretrained(checkpoint)`` rebuilds :class:`MixedPrecisionLinear` modules
whose buffer names equal the checkpoint keys. Without the import transformers would only warn and
return random Linears; :func:`load_checkpoint` imports it for you.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)

from gift_quant.config import QUANT_METHOD, GiftConfig
from gift_quant.errors import GiftError
from gift_quant.nn import MixedPrecisionLinear
from gift_quant.nn.experts import split_fused_experts
from gift_quant.nn.swap import swap_modules
from gift_quant.core.packing import packed_len
from gift_quant.core.quantizer import n_groups


def expected_shapes(m: MixedPrecisionLinear) -> dict[str, tuple]:
    G = n_groups(m.in_features, m.group_size)
    d = {"qweight": (packed_len(m.in_features, m.bits), m.out_features),
         "qzeros": (G, packed_len(m.out_features, m.bits)), "scales": (G, m.out_features),
         "g_idx": (m.in_features,), "salient_idx": (m.n_salient,), "salient_weight": (m.out_features, m.n_salient)}
    if m.bias is not None:
        d["bias"] = (m.out_features,)
    return d


def _checkpoint_shapes(files) -> dict[str, tuple]:
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


def _register(mapping, register, cls):
    if QUANT_METHOD in mapping:
        mapping[QUANT_METHOD] = cls  # idempotent (re-import or reload)
        return cls
    return register(QUANT_METHOD)(cls)


_register(AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, GiftConfig)


def _is_gift_dict(q: dict) -> bool:
    """A quantization_config written by gift-quant, whatever its quant_method says."""
    return str(q.get("format", "")).startswith("gift_sw") or "salient_counts" in q


def _refuse_misnamed(original):
    def supports_quant_method(quantization_config_dict):
        q = quantization_config_dict or {}
        if _is_gift_dict(q) and q.get("quant_method") != QUANT_METHOD:
            # transformers would skip quantization and return random Linears: refuse instead
            raise GiftError(f"this checkpoint's quantization_config was written by gift-quant (format "
                            f"{q.get('format')!r}) but names quant_method {q.get('quant_method')!r}; "
                            f"set it to {QUANT_METHOD!r} in config.json")
        return original(quantization_config_dict)
    supports_quant_method._gift_original = original
    return staticmethod(supports_quant_method)


def _install_misnamed_check():
    from transformers.quantizers.auto import AutoHfQuantizer
    current = AutoHfQuantizer.__dict__.get("supports_quant_method")
    if current is None:  # a transformers without this hook: nothing to guard
        return
    fn = current.__func__ if isinstance(current, staticmethod) else current
    original = getattr(fn, "_gift_original", fn)  # idempotent across re-imports
    AutoHfQuantizer.supports_quant_method = _refuse_misnamed(original)


_install_misnamed_check()


class GiftHfQuantizer(HfQuantizer):
    """Loads pre-quantized gift checkpoints; quantizes on load when given a float model."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs):
        return

    def update_dtype(self, dtype):
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return model  # float weights load into nn.Linear; quantization runs after loading
        replace_linears(model, self.quantization_config)
        files = kwargs.get("checkpoint_files")
        if files:
            check_against_checkpoint(model, _checkpoint_shapes(files))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            quantize_loaded_model(model, self.quantization_config)
        for name, m in model.named_modules():
            if not isinstance(m, MixedPrecisionLinear):
                continue
            if m.n_salient:
                idx = m.salient_idx.long()
                if idx.min() < 0 or idx.max() >= m.in_features or idx.unique().numel() != idx.numel():
                    raise GiftError(f"checkpoint has invalid salient_idx at {name} (out of range or repeated)")
            g = m.g_idx.long()
            if g.numel() and (g.min() < 0 or g.max() >= n_groups(m.in_features, m.group_size)):
                raise GiftError(f"checkpoint has invalid g_idx at {name}: groups {int(g.min())}..{int(g.max())}, "
                                f"the layer has {n_groups(m.in_features, m.group_size)}")
            if not torch.isfinite(m.scales).all():
                raise GiftError(f"checkpoint has non-finite scales at {name} (NaN or inf)")
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


_register(AUTO_QUANTIZER_MAPPING, register_quantizer, GiftHfQuantizer)


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
    from gift_quant.compress.calibration import _token_samples
    tok_field = config.tokenizer
    dataset = config.dataset
    if _token_samples(dataset, config) is not None:
        tok = None
    else:
        tok = _resolve_tokenizer(tok_field, model)
    from gift_quant.compress.api import quantize_
    quantize_(model, config, tok, dataset, progress=config.progress)
    if tok_field is not None and not isinstance(tok_field, str):
        config.tokenizer = None
    if dataset is not None and not isinstance(dataset, str):
        config.dataset = None
    return model


def is_gift_checkpoint(path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    q = json.loads(cfg.read_text()).get("quantization_config") or {}
    return q.get("quant_method") == QUANT_METHOD


def looks_like_gift(path) -> str | None:
    """Why ``path`` holds gift-quant tensors under another quant_method (or none), else None."""
    p = Path(path)
    if not (p / "config.json").is_file() or is_gift_checkpoint(p):
        return None
    try:
        q = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
    except ValueError:
        return None
    keys = set(_checkpoint_shapes(sorted(p.glob("*.safetensors"))))
    gift_keys = sorted({k.rsplit(".", 1)[-1] for k in keys} & {"salient_weight", "salient_idx"})
    if not gift_keys and not _is_gift_dict(q):
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
    if looks_like_gift(p):
        raise GiftError(looks_like_gift(p))
    if not is_gift_checkpoint(p):
        raise GiftError(f"{path} is not a gift-quant checkpoint (quantization_config.quant_method != {QUANT_METHOD!r})")
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


def prepare_for_training(model, train: str = "salient", dtype: torch.dtype = torch.float32):
    """Freeze a gift model for salient-column training (``Trainer`` or a custom loop); returns it.

    ``train="salient"``: only every ``MixedPrecisionLinear.salient_weight`` trains, cast to ``dtype``
    (fp32 by default, so small optimizer updates are not lost to fp16 rounding; loading casts them back
    to the checkpoint dtype). ``train="none"``: everything frozen (for PEFT adapters on top).
    """
    if train not in ("salient", "none"):
        raise GiftError(f"train: must be 'salient' or 'none', got {train!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    if train == "salient":
        for m in model.modules():
            if isinstance(m, MixedPrecisionLinear) and m.n_salient:
                m.salient_weight.data = m.salient_weight.data.to(dtype)
                m.salient_weight.requires_grad_(True)
                n += 1
        if n == 0:
            raise GiftError("model has no MixedPrecisionLinear with FP16 columns to train (k = 0 everywhere?)")
    return model
