"""GPTQ interop: import standard GPTQ checkpoints as gift models (k = 0), export a gift model's base as a
standard GPTQ v2 tensor set plus a sidecar with the FP16 columns.

Layout (checked against GPTQModel 7.7's ``pack_original`` / ``dequantize_weight``, see
tests/test_gptq_interop.py): codes are one LSB-first bitstream of b-bit fields over int32 words, along
the input dim for ``qweight`` [ceil(in*b/32), out] and along the output dim for ``qzeros``
[G, ceil(out*b/32)]; 3-bit fields straddle words. gift pads each dim to whole 32-value chunks
([ceil(n/32)*b] words), which is the same bitstream with extra zero words when n % 32 != 0, so both
directions only trim or pad words.

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
import re
import shutil
import warnings
from pathlib import Path

import torch

from .errors import GiftError
from .packing import packed_len, unpack
from .quant import SUPPORTED_BITS, n_groups

SIDECAR = "gift_salient.safetensors"
GPTQ_FORMATS = ("gptq", "gptq_v2")
_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


# ---------------------------------------------------------------------------------------------- layout
def _gptq_words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def bitstream_unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 words [w, m] (LSB-first bitstream along dim 0, any padding) -> codes int32 [n, m]."""
    need = packed_len(n, bits)
    w = packed.shape[0]
    if w < _gptq_words(n, bits):
        raise ValueError(f"{w} packed words hold fewer than {n} {bits}-bit values")
    if w < need:
        packed = torch.cat([packed, packed.new_zeros(need - w, packed.shape[1])])
    return unpack(packed[:need], bits, n)


def to_gift_words(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """GPTQ-padded words [ceil(n*b/32), m] -> gift-padded words [ceil(n/32)*b, m] (same bitstream)."""
    need = packed_len(n, bits)
    if packed.shape[0] >= need:
        return packed[:need].contiguous()
    return torch.cat([packed, packed.new_zeros(need - packed.shape[0], packed.shape[1])]).contiguous()


def to_gptq_words(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """gift-padded words -> GPTQ-padded words (drop the all-padding tail words)."""
    return packed[:_gptq_words(n, bits)].contiguous()


def _v1_to_v2_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """GPTQ v1 qzeros (z - 1) -> v2 (z), decoded exactly as GPTQModel 7.7 does (gptq-padded words)."""
    if bits == 3:
        z = bitstream_unpack(qzeros.t().contiguous(), 3, out_features)
        z = (z + 1) & 7
        from .packing import pack
        return to_gptq_words(pack(z, 3), 3, out_features).t().contiguous()
    per_word = 32 // bits
    const = sum(1 << (bits * j) for j in range(per_word))
    w = (qzeros.to(torch.int64) & 0xFFFFFFFF) + const
    w = w & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def v2_to_v1_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of the v1 decoding above (what GPTQModel 7.7 writes for checkpoint_format 'gptq')."""
    if bits == 3:
        z = bitstream_unpack(qzeros.t().contiguous(), 3, out_features)
        z = (z - 1) & 7
        from .packing import pack
        return to_gptq_words(pack(z, 3), 3, out_features).t().contiguous()
    per_word = 32 // bits
    const = sum(1 << (bits * j) for j in range(per_word))
    w = ((qzeros.to(torch.int64) & 0xFFFFFFFF) - const) & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


# ---------------------------------------------------------------------------------------------- config
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


# ---------------------------------------------------------------------------------------------- tensors
def _st_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if f.name != SIDECAR and f.name != "saliency.safetensors"]
    if not files:
        bins = list(path.glob("*.bin")) + list(path.glob("*.pt"))
        if bins:
            raise GiftError(f"{path}: only safetensors checkpoints are read (found {bins[0].name}; no pickle)")
        raise GiftError(f"{path}: no safetensors weights")
    return files


def _load_all(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in _st_files(path):
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # truncated / corrupt
            raise GiftError(f"{f.name}: unreadable safetensors file ({e})") from None
    return out


def _linear_names(config_dict: dict) -> dict[str, bool]:
    """Linear module names of the architecture (built on meta) -> has bias."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: m.bias is not None for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


class _Module:
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
        if self.qweight.shape != (_gptq_words(self.in_f, bits), self.out_f) and \
                self.qweight.shape != (packed_len(self.in_f, bits), self.out_f):
            raise GiftError(f"GPTQ import: {name}: qweight has shape {list(self.qweight.shape)}, expected "
                            f"{[_gptq_words(self.in_f, bits), self.out_f]} for bits={bits} (field 'bits')")
        if self.qzeros.shape[0] != G or self.qzeros.shape[1] not in (_gptq_words(self.out_f, bits),
                                                                      packed_len(self.out_f, bits)):
            raise GiftError(f"GPTQ import: {name}: qzeros has shape {list(self.qzeros.shape)}, expected "
                            f"{[G, _gptq_words(self.out_f, bits)]} for bits={bits} (field 'bits')")
        self.bias = t.get(f"{name}.bias")
        self.bits = bits

    def codes(self) -> torch.Tensor:  # [in, out]
        return bitstream_unpack(self.qweight, self.bits, self.in_f)

    def raw_zeros(self) -> torch.Tensor:  # [G, out]
        return bitstream_unpack(self.qzeros.t().contiguous(), self.bits, self.out_f).t()


def detect_zero_format(modules: list[_Module], bits: int, sym: bool, label: str) -> tuple[str, str]:
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


def import_gptq(src, dst, zero_format: str = "auto", overwrite: bool = False) -> dict:
    """Convert a GPTQ checkpoint folder ``src`` into a gift checkpoint folder ``dst`` (k = 0).

    Returns a summary (bits, group_size, sym, desc_act, modules, zero_format and its evidence).
    """
    from .config import GiftConfig
    from .export import atomic_output_dir
    src = Path(src)
    if not src.is_dir():
        raise GiftError(f"GPTQ checkpoint folder not found: {src}")
    if zero_format not in ("auto", "v1", "v2"):
        raise GiftError(f"zero_format: must be auto, v1 or v2, got {zero_format!r}")
    q = read_gptq_config(src)
    info = check_gptq_config(q)
    bits, gs = info["bits"], info["group_size"]
    config_dict = json.loads((src / "config.json").read_text())
    tensors = _load_all(src)
    qnames = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not qnames:
        raise GiftError(f"{src}: no '*.qweight' tensors: not a GPTQ checkpoint")
    modules = [_Module(n, tensors, bits, gs) for n in qnames]
    if zero_format == "auto":
        zf, evidence = detect_zero_format(modules, bits, info["sym"], info["label"])
    else:
        zf, evidence = zero_format, "given by the caller"
    linear = _linear_names(config_dict)
    unknown = [n for n in qnames if n not in linear]
    if unknown:
        raise GiftError(f"GPTQ import: {unknown[0]}: quantized tensors for a module that is not a Linear of "
                        f"this {config_dict.get('model_type')!r} architecture")
    not_converted = sorted(n for n in linear if n not in set(qnames))
    out = {k: v for k, v in tensors.items()
           if not any(k.startswith(n + ".") for n in qnames)}
    for m in modules:
        qz = m.qzeros if m.qzeros.shape[1] == _gptq_words(m.out_f, bits) else to_gptq_words(
            m.qzeros.t().contiguous(), bits, m.out_f).t().contiguous()
        if zf == "v1":
            qz = _v1_to_v2_qzeros(qz, bits, m.out_f)
        out[f"{m.name}.qweight"] = to_gift_words(m.qweight, bits, m.in_f)
        out[f"{m.name}.qzeros"] = to_gift_words(qz.t().contiguous(), bits, m.out_f).t().contiguous()
        out[f"{m.name}.scales"] = m.scales.to(torch.float16).contiguous()
        out[f"{m.name}.g_idx"] = m.g_idx.contiguous()
        out[f"{m.name}.salient_idx"] = torch.zeros(0, dtype=torch.int32)
        out[f"{m.name}.salient_weight"] = torch.zeros(m.out_f, 0, dtype=torch.float16)
        if m.bias is not None:
            out[f"{m.name}.bias"] = m.bias.to(torch.float16).contiguous()
        elif linear[m.name]:
            raise GiftError(f"GPTQ import: {m.name}: the architecture has a bias here but the checkpoint has none")
    gcfg = GiftConfig(bits=bits, group_size=gs, sym=info["sym"], desc_act=info["desc_act"], n_salient=0,
                      salient_ratio=None, modules_not_converted=not_converted,
                      salient_counts={n: 0 for n in qnames})
    summary = {"source": str(src), "bits": bits, "group_size": gs, "sym": info["sym"], "desc_act": info["desc_act"],
               "modules": len(qnames), "checkpoint_format_label": info["label"], "zero_format": zf,
               "zero_format_evidence": evidence, "quantizer": (q.get("meta") or {}).get("quantizer")}
    qc = gcfg.to_dict()
    qc["imported_from"] = {"quant_method": "gptq", "checkpoint_format": info["label"], "zero_format": zf}
    config_dict["quantization_config"] = qc
    from safetensors.torch import save_file
    with atomic_output_dir(dst, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
        (tmp / "gift_report.json").write_text(json.dumps({"imported_from_gptq": summary}, indent=2, default=str))
        for f in _COPY_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
    return summary


# ---------------------------------------------------------------------------------------------- export
def export_gptq(src, dst, overwrite: bool = False) -> dict:
    """Write the base of gift checkpoint ``src`` as a standard GPTQ v2 checkpoint folder ``dst``
    (loadable by GPTQModel and transformers' GPTQ path) plus ``gift_salient.safetensors`` with each
    module's ``salient_idx`` / ``salient_weight``.

    The base alone lacks the FP16 columns (their slots dequantize to 0): exact when k = 0; otherwise add
    them back with :func:`attach_salient` (any framework's Linear modules) or load the gift checkpoint.
    """
    from .export import atomic_output_dir
    from .hf import is_gift_checkpoint
    src = Path(src)
    if not is_gift_checkpoint(src):
        raise GiftError(f"{src} is not a gift-quant checkpoint (quantization_config.quant_method != 'gift_sw')")
    config_dict = json.loads((src / "config.json").read_text())
    g = config_dict["quantization_config"]
    bits, gs = g["bits"], g["group_size"]
    tensors = _load_all(src)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    moe = [n for n in names if re.search(r"\.experts\.(gate_up_proj|down_proj)\.\d+$", n)]
    if moe:  # MoE hook: GPTQ loaders expect experts.<e>.gate_proj/up_proj/down_proj, not fused gate_up
        raise GiftError(f"GPTQ export: mixture-of-experts checkpoints are not supported yet ({len(moe)} expert "
                        f"projections such as {moe[0]}); load the gift checkpoint itself")
    out, side, k_total = {}, {}, 0
    for k, v in tensors.items():
        if not any(k.startswith(n + ".") for n in names):
            out[k] = v
    for n in names:
        try:
            qw, qz, sc = tensors[f"{n}.qweight"], tensors[f"{n}.qzeros"], tensors[f"{n}.scales"]
            g_idx = tensors[f"{n}.g_idx"]
            idx, sw = tensors[f"{n}.salient_idx"], tensors[f"{n}.salient_weight"]
        except KeyError as e:
            raise GiftError(f"GPTQ export: {n}: tensor {e.args[0].rsplit('.', 1)[-1]!r} is missing") from None
        in_f, out_f = g_idx.numel(), sc.shape[1]
        if qw.shape != (packed_len(in_f, bits), out_f):
            raise GiftError(f"GPTQ export: {n}: qweight shape {list(qw.shape)} disagrees with bits={bits}")
        out[f"{n}.qweight"] = to_gptq_words(qw, bits, in_f)
        out[f"{n}.qzeros"] = to_gptq_words(qz.t().contiguous(), bits, out_f).t().contiguous()
        out[f"{n}.scales"] = sc.to(torch.float16).contiguous()
        out[f"{n}.g_idx"] = g_idx.to(torch.int32).contiguous()
        if f"{n}.bias" in tensors:
            out[f"{n}.bias"] = tensors[f"{n}.bias"].to(torch.float16)
        if idx.numel():
            side[f"{n}.salient_idx"] = idx.to(torch.int32).contiguous()
            side[f"{n}.salient_weight"] = sw.to(torch.float16).contiguous()
            k_total += idx.numel()
    qc = {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": g.get("desc_act", False),
          "sym": g.get("sym", False), "checkpoint_format": "gptq_v2", "format": "gptq_v2",
          "pack_dtype": "int32", "lm_head": "lm_head" in names, "true_sequential": True,
          "meta": {"quantizer": ["gift-quant:0.1.0"], "gift_salient_sidecar": SIDECAR if side else None,
                   "gift_salient_columns": k_total}}
    config_dict["quantization_config"] = qc
    from safetensors.torch import save_file
    with atomic_output_dir(dst, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if side:
            save_file(side, str(tmp / SIDECAR), metadata={"what": "gift-quant FP16 salient columns; "
                                                          "y += x[..., salient_idx] @ salient_weight^T"})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
        (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2))
        for f in _COPY_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
    return {"modules": len(names), "bits": bits, "group_size": gs, "salient_columns": k_total,
            "sidecar": SIDECAR if side else None}


def attach_salient(model, sidecar) -> list:
    """Add the FP16 columns of a sidecar to a model whose Linears hold the GPTQ base (GPTQModel,
    transformers' GPTQ path, ...): a forward hook per module adds ``x[..., idx] @ W^T``. Returns the
    hook handles (``h.remove()`` undoes it)."""
    from safetensors.torch import load_file
    side = load_file(str(sidecar))
    handles = []
    for key in sorted(side):
        if not key.endswith(".salient_idx"):
            continue
        name = key[: -len(".salient_idx")]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise GiftError(f"attach_salient: {name}: no such module in the model") from None
        idx = side[key].long()
        w = side[f"{name}.salient_weight"]

        def hook(_m, args, out, idx=idx, w=w):
            x = args[0]
            return out + torch.nn.functional.linear(x[..., idx.to(x.device)], w.to(device=x.device, dtype=x.dtype)).to(out.dtype)
        handles.append(mod.register_forward_hook(hook))
    return handles


def main(argv=None) -> int:
    """``python -m gift_quant.gptq_interop import|export SRC DST [--zero-format auto|v1|v2] [--overwrite]``."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="python -m gift_quant.gptq_interop",
                                 description="GPTQ checkpoint <-> gift checkpoint")
    ap.add_argument("direction", choices=["import", "export"],
                    help="import: GPTQ folder -> gift folder (k=0); export: gift folder -> GPTQ v2 folder + sidecar")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--zero-format", default="auto", choices=["auto", "v1", "v2"])
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.direction == "import":
            s = import_gptq(a.src, a.dst, zero_format=a.zero_format, overwrite=a.overwrite)
        else:
            s = export_gptq(a.src, a.dst, overwrite=a.overwrite)
    except GiftError as e:
        print(f"gift-quant: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, default=str))
    return 0


__all__ = ["import_gptq", "export_gptq", "attach_salient", "read_gptq_config", "check_gptq_config",
           "detect_zero_format", "bitstream_unpack", "v2_to_v1_qzeros"]


if __name__ == "__main__":
    raise SystemExit(main())
