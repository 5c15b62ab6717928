"""transformers integration: the ``gift_sw`` quantization method.

Importing ``gift_quant`` registers :class:`GiftConfig` and :class:`GiftHfQuantizer` (idempotently), so
``AutoModelForCausalLM.from_pretrained(checkpoint)`` rebuilds :class:`MixedPrecisionLinear` modules
whose buffer names equal the checkpoint keys. Without the import transformers would only warn and
return random Linears; :func:`load_checkpoint` imports it for you.
"""
from __future__ import annotations

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)

from gift_quant.config import QUANT_METHOD, GiftConfig
from gift_quant.core.quantizer import n_groups
from gift_quant.errors import GiftError
# the checkpoint reader lives in io/; re-exported here, where users of the transformers path look for it
from gift_quant.io.checkpoint import (check_against_checkpoint, checkpoint_shapes, is_gift_checkpoint,  # noqa: F401
                                      is_gift_dict, load_checkpoint, looks_like_gift, replace_linears)
from gift_quant.nn import MixedPrecisionLinear


def _register(mapping, register, cls):
    if QUANT_METHOD in mapping:
        mapping[QUANT_METHOD] = cls  # idempotent (re-import or reload)
        return cls
    return register(QUANT_METHOD)(cls)


_register(AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, GiftConfig)


def _refuse_misnamed(original):
    def supports_quant_method(quantization_config_dict):
        q = quantization_config_dict or {}
        if is_gift_dict(q) and q.get("quant_method") != QUANT_METHOD:
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
            check_against_checkpoint(model, checkpoint_shapes(files))
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
    from gift_quant.compress.calibration import token_samples
    tok_field = config.tokenizer
    dataset = config.dataset
    if token_samples(dataset, config) is not None:
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
