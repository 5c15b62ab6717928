"""What bench_e2e measures: part b's LLaMA-shaped models with random weights built on the device, and part
a's real model as FP16 and compressed (here or loaded from gift checkpoints), with their sizes."""
from __future__ import annotations

import copy
import gc
import time

import torch
from _common import free, llama_config, logger, random_gift_linears

from gift_quant.errors import GiftError
from gift_quant.eval import bench
from gift_quant.nn.mixed_linear import MixedPrecisionLinear

log = logger("bench_e2e")


def state_dict_mib(model) -> float:
    """MiB of parameters and buffers as an FP16 checkpoint stores them (float tensors at 2 bytes, whatever
    the compute dtype; shared storages such as tied embeddings counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes() // t.element_size() * (2 if t.is_floating_point() else
                                                                        t.element_size())
    return total / 2**20


def n_mixed(model) -> int:
    return sum(isinstance(m, MixedPrecisionLinear) for m in model.modules())


@torch.no_grad()
def build_b(a, bits: int | None, device, dtype):
    """A LLaMA-shaped model with random weights, built on ``device``; decoder Linears replaced by
    random MixedPrecisionLinear layers when ``bits`` is set (one CPU template per shape, cloned on the
    device for every layer: distinct memory, the real footprint)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    cfg = llama_config(a, max_position_embeddings=max(4096, a.prompt_len + a.new_tokens + 8),
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.eval()
    if bits:
        random_gift_linears(model, bits, group_size=a.group_size, salient=a.salient, act_order=a.act_order,
                            device=device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def eval_texts():
    from gift_quant.io.data import load_texts
    try:
        return "idle", load_texts("idle")
    except (GiftError, ImportError):  # idlelib is a separate distro package on some systems
        return "topics-heldout", load_texts("topics-heldout")


def _compressed(a, fp, tok, bits: int, device, dtype) -> dict:
    from gift_quant.compress.api import quantize_
    from gift_quant.config import GiftConfig
    m = copy.deepcopy(fp)
    cfg = GiftConfig(bits=bits, group_size=a.group_size, calib_samples=a.calib_samples, seq_len=a.seq_len)
    t = time.time()
    rep = quantize_(m, cfg, tok, dataset="bundled", device=device, progress=False)
    m = m.to(dtype).eval()
    free(device)
    return {"name": f"gift-{bits}bit", "bits": bits, "model": m, "size_mib": state_dict_mib(m),
            "size_source": "state_dict", "compress_s": time.time() - t, "bits_per_weight": rep.bits_per_weight}


def _loaded(path, dtype) -> dict:
    from gift_quant.io.checkpoint import load_checkpoint
    m, _ = load_checkpoint(path, dtype=dtype)
    qc = m.config.quantization_config
    bits = qc.bits if hasattr(qc, "bits") else qc.get("bits")
    return {"name": f"gift-{bits}bit", "bits": bits, "model": m.eval(), "path": str(path),
            "size_mib": bench.disk_size_mib(path), "size_source": "disk"}


def prepare_a(a, device, dtype, budget) -> tuple[list[dict], dict]:
    """Part a variants as CPU models: FP16, then compressed (here or from --checkpoints)."""
    from gift_quant.eval.perplexity import perplexity
    from gift_quant.io.data import eval_windows
    from gift_quant.io.model_io import load_model

    t = time.time()
    fp, tok = load_model(a.model, dtype=torch.float32)
    log(f"loaded {a.model} in {time.time() - t:.1f} s")
    ds_name, texts = eval_texts()
    win = eval_windows(texts, tok, a.eval_seq_len, a.eval_windows) if a.eval_windows else None
    info = {"eval_dataset": ds_name, "eval_windows": 0 if win is None else int(win.shape[0]),
            "eval_seq_len": a.eval_seq_len}

    def ppl(m):
        if win is None:
            return None
        m.to(device)
        try:
            return perplexity(m, win, progress=False)
        finally:
            m.to("cpu")
            free(device)

    base = copy.deepcopy(fp).to(dtype)
    variants = [{"name": "fp16", "bits": 16, "model": base, "size_mib": state_dict_mib(base),
                 "size_source": "state_dict", "ppl": ppl(base)}]
    log(f"fp16: ppl {variants[0]['ppl']}")
    for path in a.checkpoints or ():
        v = _loaded(path, dtype)
        v["ppl"] = ppl(v["model"])
        log(f"{v['name']} from {path}: ppl {v['ppl']}")
        variants.append(v)
    for bits in () if a.checkpoints else a.bits:
        if not budget.allows(a.compress_estimate):
            log(f"gift-{bits}bit: compression skipped (time budget)")
            variants.append({"name": f"gift-{bits}bit", "bits": bits, "model": None, "skipped": True})
            continue
        v = _compressed(a, fp, tok, bits, device, dtype)
        v["ppl"] = ppl(v["model"])
        log(f"{v['name']}: compressed in {v['compress_s']:.1f} s ({v['bits_per_weight']:.2f} bits/weight "
            f"in the Linears), ppl {v['ppl']}")
        variants.append(v)
    del fp
    gc.collect()
    return variants, info
