"""Reading a GPTQ checkpoint: its config, its tensors per module, and which zero-point convention it uses.

Zero-point convention. GPTQ v2 (``checkpoint_format: gptq_v2``, and gift) stores the zero-point z
itself; v1 (``gptq``, the AutoGPTQ legacy) stores z - 1. The label is often wrong (tools copy configs),
so the convention is decided FROM THE DATA:

1. sym checkpoints: every v2 zero is 2^(b-1) and every v1 zero is 2^(b-1) - 1. All stored zeros equal to
   one of them decides it outright.
2. otherwise (asym, or sym with other values): the mean of ``code - stored_zero`` over every weight of
   every module. Dequantized weights are s * (code - z) and LLM weights are centred on 0 within each
   group, so this mean is ~0 under v2 and ~+1 under v1 (the stored zero is one lower). Below 0.35 means
   v2, above 0.65 means v1.
3. inside [0.35, 0.65] the data is ambiguous: the label (``checkpoint_format``) decides and a warning
   says so. ``zero_format="v1"|"v2"`` overrides everything.

Limits: rule 2 assumes weights roughly centred within each (group, row); a model whose groups are
strongly one-sided (e.g. a tiny or synthetic model with shifted weights) can mislead it, so pass
``zero_format`` there. v1 is decoded exactly like GPTQModel 7.7 does (2/4/8 bits: add 0x..1111 to each
int32 word, undoing its word-wise subtraction including borrows; 3 bits: +1 per field mod 8). A v1 asym
checkpoint written by old AutoGPTQ with a true zero-point of 0 is corrupt in the file itself (its
packing ORed -1 into the word) and imports with the same error AutoGPTQ itself shows.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from gift_quant.core.packing import packed_len
from gift_quant.core.quantizer import SUPPORTED_BITS, n_groups
from gift_quant.errors import GiftError
from gift_quant.integrations.gptq.layout import bitstream_unpack, gptq_words

SIDECAR = "gift_salient.safetensors"
GPTQ_FORMATS = ("gptq", "gptq_v2")


def read_gptq_config(path) -> dict:
    """The GPTQ quantization config of a folder: config.json's quantization_config, else
    quantize_config.json / quant_config.json."""
    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise GiftError(f"{path} is not a checkpoint folder (no config.json)")
    q = json.loads(cfg_file.read_text()).get("quantization_config")
    for name in ("quantize_config.json", "quant_config.json"):
        if q is None and (p / name).is_file():
            q = json.loads((p / name).read_text())
    if q is None:
        raise GiftError(f"{path}: no quantization_config in config.json and no quantize_config.json")
    return q


def check_gptq_config(q: dict) -> dict:
    """Validate a GPTQ config; returns the normalized fields. Errors name the field they could not handle."""
    def bad(field, msg):
        raise GiftError(f"GPTQ import: unsupported {field!r}: {msg}")

    qm = q.get("quant_method", "gptq")
    if qm != "gptq":
        bad("quant_method", f"{qm!r} (only 'gptq' checkpoints import)")
    method = q.get("method", "gptq")
    if method != "gptq":
        bad("method", f"{method!r} (only 'gptq')")
    fmt = q.get("checkpoint_format", q.get("format", "gptq"))
    if fmt not in GPTQ_FORMATS:
        bad("checkpoint_format", f"{fmt!r} (supported: {', '.join(GPTQ_FORMATS)}; marlin/bitblas/planar "
                                 "layouts must be converted back to gptq first)")
    if q.get("format") not in (None, *GPTQ_FORMATS):
        bad("format", f"{q['format']!r} (supported: {', '.join(GPTQ_FORMATS)})")
    if q.get("is_marlin_format"):
        bad("is_marlin_format", "true (marlin-repacked weights)")
    bits = q.get("bits")
    if bits not in SUPPORTED_BITS:
        bad("bits", f"{bits!r} (supported: {', '.join(map(str, SUPPORTED_BITS))})")
    gs = q.get("group_size", -1)
    if not isinstance(gs, int) or isinstance(gs, bool) or not (gs == -1 or gs >= 1):
        bad("group_size", f"{gs!r} (-1 or a positive int)")
    pack_dtype = q.get("pack_dtype", "int32")
    if pack_dtype not in ("int32", "torch.int32"):
        bad("pack_dtype", f"{pack_dtype!r} (only int32 words)")
    if q.get("dynamic"):
        bad("dynamic", "per-module overrides of bits/group_size are not supported (one setting per checkpoint)")
    if q.get("adapter"):
        bad("adapter", "GPTQ checkpoints with an attached adapter (EoRA) are not supported")
    for f in ("sym", "desc_act"):
        if not isinstance(q.get(f, f == "sym"), bool):
            bad(f, f"{q.get(f)!r} (true or false)")
    return {"bits": bits, "group_size": gs, "sym": q.get("sym", True), "desc_act": q.get("desc_act", False),
            "label": fmt}


def _st_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if f.name != SIDECAR and f.name != "saliency.safetensors"]
    if not files:
        bins = list(path.glob("*.bin")) + list(path.glob("*.pt"))
        if bins:
            raise GiftError(f"{path}: only safetensors checkpoints are read (found {bins[0].name}; no pickle)")
        raise GiftError(f"{path}: no safetensors weights")
    return files


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint folder's safetensors files, by name."""
    from safetensors.torch import load_file
    out = {}
    for f in _st_files(path):
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # truncated / corrupt
            raise GiftError(f"{f.name}: unreadable safetensors file ({e})") from None
    return out


def linear_names(config_dict: dict) -> dict[str, bool]:
    """Linear module names of the architecture (built on meta) -> has bias."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: m.bias is not None for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


class GptqModule:
    """One quantized Linear of a GPTQ checkpoint, its tensors checked against ``bits`` and ``group_size``."""

    def __init__(self, name, t, bits, gs):
        self.name = name
        for k in ("qweight", "qzeros", "scales"):
            if f"{name}.{k}" not in t:
                raise GiftError(f"GPTQ import: {name}: tensor {k!r} is missing")
        self.qweight, self.qzeros = t[f"{name}.qweight"], t[f"{name}.qzeros"]
        self.scales = t[f"{name}.scales"]
        for k in ("qweight", "qzeros"):
            if getattr(self, k).dtype != torch.int32:
                raise GiftError(f"GPTQ import: {name}: {k} has dtype {getattr(self, k).dtype}, expected int32 "
                                "('pack_dtype' other than int32 is not supported)")
        self.out_f = self.scales.shape[1]
        self.in_f = self.qweight.shape[0] * 32 // bits
        G = self.scales.shape[0]
        g_idx = t.get(f"{name}.g_idx")
        if g_idx is not None:
            self.in_f = g_idx.numel()
        if gs > 0 and n_groups(self.in_f, gs) != G:
            raise GiftError(f"GPTQ import: {name}: scales have {G} groups, but in_features={self.in_f} with "
                            f"group_size={gs} implies {n_groups(self.in_f, gs)} (field 'group_size')")
        if gs <= 0 and G != 1:
            raise GiftError(f"GPTQ import: {name}: group_size=-1 but scales have {G} groups")
        if g_idx is None:  # very old checkpoints: static groups
            g_idx = torch.arange(self.in_f) // gs if gs > 0 else torch.zeros(self.in_f)
        self.g_idx = g_idx.to(torch.int32)
        if self.g_idx.min() < 0 or self.g_idx.max() >= G:
            raise GiftError(f"GPTQ import: {name}: g_idx out of range [0, {G})")
        if self.qweight.shape != (gptq_words(self.in_f, bits), self.out_f) and \
                self.qweight.shape != (packed_len(self.in_f, bits), self.out_f):
            raise GiftError(f"GPTQ import: {name}: qweight has shape {list(self.qweight.shape)}, expected "
                            f"{[gptq_words(self.in_f, bits), self.out_f]} for bits={bits} (field 'bits')")
        if self.qzeros.shape[0] != G or self.qzeros.shape[1] not in (gptq_words(self.out_f, bits),
                                                                      packed_len(self.out_f, bits)):
            raise GiftError(f"GPTQ import: {name}: qzeros has shape {list(self.qzeros.shape)}, expected "
                            f"{[G, gptq_words(self.out_f, bits)]} for bits={bits} (field 'bits')")
        self.bias = t.get(f"{name}.bias")
        self.bits = bits

    def codes(self) -> torch.Tensor:  # [in, out]
        return bitstream_unpack(self.qweight, self.bits, self.in_f)

    def raw_zeros(self) -> torch.Tensor:  # [G, out]
        return bitstream_unpack(self.qzeros.t().contiguous(), self.bits, self.out_f).t()


def detect_zero_format(modules: list[GptqModule], bits: int, sym: bool, label: str) -> tuple[str, str]:
    """('v1' | 'v2', evidence). See the module docstring for the rule."""
    if sym:
        vals = torch.unique(torch.cat([m.raw_zeros().flatten() for m in modules]))
        if vals.numel() == 1 and int(vals) == 1 << (bits - 1):
            return "v2", f"sym: every stored zero-point is {1 << (bits - 1)} = 2^(b-1)"
        if vals.numel() == 1 and int(vals) == (1 << (bits - 1)) - 1:
            return "v1", f"sym: every stored zero-point is {(1 << (bits - 1)) - 1} = 2^(b-1) - 1"
    tot, cnt = 0.0, 0
    for m in modules:
        c = m.codes().to(torch.float64)                    # [in, out]
        z = m.raw_zeros().to(torch.float64)[m.g_idx.long()]  # [in, out]
        tot += float((c - z).sum())
        cnt += c.numel()
    mean = tot / max(cnt, 1)
    ev = f"mean(code - stored zero) over {cnt} weights = {mean:+.3f} (v2 ~ 0, v1 ~ +1)"
    if mean < 0.35:
        return "v2", ev
    if mean > 0.65:
        return "v1", ev
    guess = "v1" if label == "gptq" else "v2"
    warnings.warn(f"GPTQ import: zero-point convention ambiguous from the data ({ev}); using the label "
                  f"checkpoint_format={label!r} -> {guess}. Pass zero_format='v1' or 'v2' to decide.")
    return guess, ev + f"; ambiguous, label {label!r} used"
