"""GPTQ interop: import standard GPTQ checkpoints as gift models (k = 0), export a gift model's base as a
standard GPTQ v2 tensor set plus a sidecar with the FP16 columns (``gift-quant gptq import|export``).
Layout rules: :mod:`.layout`; zero-point detection: :mod:`.detect`.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from gift_quant.config import QUANT_METHOD
from gift_quant.errors import GiftError
from gift_quant.integrations.gptq.detect import (SIDECAR, linear_names, load_tensors, GptqModule, check_gptq_config,
                                                 detect_zero_format, read_gptq_config)
from gift_quant.core.packing import packed_len
from gift_quant.integrations.gptq.layout import gptq_words, to_gift_words, to_gptq_words, v1_to_v2_qzeros
from gift_quant.version import VERSION

_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def import_gptq(src, dst, zero_format: str = "auto", overwrite: bool = False) -> dict:
    """Convert a GPTQ checkpoint folder ``src`` into a gift checkpoint folder ``dst`` (k = 0).

    Returns a summary (bits, group_size, sym, desc_act, modules, zero_format and its evidence).
    """
    from gift_quant.config import GiftConfig
    from gift_quant.io.export import atomic_output_dir
    src = Path(src)
    if not src.is_dir():
        raise GiftError(f"GPTQ checkpoint folder not found: {src}")
    if zero_format not in ("auto", "v1", "v2"):
        raise GiftError(f"zero_format: must be auto, v1 or v2, got {zero_format!r}")
    q = read_gptq_config(src)
    info = check_gptq_config(q)
    bits, gs = info["bits"], info["group_size"]
    config_dict = json.loads((src / "config.json").read_text())
    tensors = load_tensors(src)
    qnames = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not qnames:
        raise GiftError(f"{src}: no '*.qweight' tensors: not a GPTQ checkpoint")
    modules = [GptqModule(n, tensors, bits, gs) for n in qnames]
    if zero_format == "auto":
        zf, evidence = detect_zero_format(modules, bits, info["sym"], info["label"])
    else:
        zf, evidence = zero_format, "given by the caller"
    linear = linear_names(config_dict)
    unknown = [n for n in qnames if n not in linear]
    if unknown:
        raise GiftError(f"GPTQ import: {unknown[0]}: quantized tensors for a module that is not a Linear of "
                        f"this {config_dict.get('model_type')!r} architecture")
    not_converted = sorted(n for n in linear if n not in set(qnames))
    out = {k: v for k, v in tensors.items()
           if not any(k.startswith(n + ".") for n in qnames)}
    for m in modules:
        qz = m.qzeros if m.qzeros.shape[1] == gptq_words(m.out_f, bits) else to_gptq_words(
            m.qzeros.t().contiguous(), bits, m.out_f).t().contiguous()
        if zf == "v1":
            qz = v1_to_v2_qzeros(qz, bits, m.out_f)
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
    from gift_quant.io.export import atomic_output_dir
    from gift_quant.io.checkpoint import is_gift_checkpoint
    src = Path(src)
    if not is_gift_checkpoint(src):
        raise GiftError(f"{src} is not a gift-quant checkpoint (quantization_config.quant_method != {QUANT_METHOD!r})")
    config_dict = json.loads((src / "config.json").read_text())
    g = config_dict["quantization_config"]
    bits, gs = g["bits"], g["group_size"]
    tensors = load_tensors(src)
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
          "meta": {"quantizer": [f"gift-quant:{VERSION}"], "gift_salient_sidecar": SIDECAR if side else None,
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
