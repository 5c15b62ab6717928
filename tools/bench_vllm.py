#!/usr/bin/env python3
"""Decode speed through vLLM: FP16 against gift 4/3/2-bit checkpoints, batch 1 and 16.

A LLaMA-shaped model with RANDOM weights (``--layers --hidden --intermediate --heads --vocab``; default
LLaMA-2-7B width, 4 layers so that four engines start within the device check's budget) is saved once
in FP16 and once per bit width as a gift checkpoint in the real packed format
(``MixedPrecisionLinear.random``, act-order, k = min(128, in/32)). Each is served by ``vllm.LLM`` (one
engine at a time) and timed on greedy decode of exactly ``--new-tokens`` tokens (``ignore_eos``) after
a warm-up; tokens/s = batch * new tokens / (generate time - prefill-only time). Speed only, never
accuracy. Needs vLLM with the gift-quant wheel installed (its entry point registers ``gift_sw``).
Engines run eager by default (fast start; per-call Python overhead counts, on both sides);
``--compile`` uses vLLM's default torch.compile + CUDA graphs (about a minute more per engine).

    python3 tools/bench_vllm.py [--bits 4,3,2] [--batches 1,16] [--md OUT.md] [--json OUT.json] [--compile]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import ints, llama_config, logger, random_gift_linears, shape_args

from gift_quant.io.atomic import write_text

log = logger("bench_vllm")


@torch.no_grad()
def save_model(a, bits: int | None, out: Path):
    """FP16 random model (``bits`` None) or its gift version, saved as a checkpoint folder."""
    from transformers import LlamaForCausalLM

    from gift_quant.config import GiftConfig
    from gift_quant.io.export import save_checkpoint
    torch.manual_seed(0)
    cfg = llama_config(a, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.float16).eval()
    if bits:
        counts = random_gift_linears(model, bits, group_size=128, salient=a.salient, act_order=True)
        model.config.quantization_config = GiftConfig(bits=bits, group_size=128, desc_act=True, n_salient=a.salient,
                                                      salient_ratio=None, salient_counts=counts)
    save_checkpoint(model, None, out)


def run(llm, prompts, n: int) -> float:
    import vllm
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    t = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    return time.perf_counter() - t


def measure(path: Path, a, batches: list[int]) -> list[dict]:
    import vllm
    t0 = time.time()
    llm = vllm.LLM(model=str(path), dtype=a.dtype, skip_tokenizer_init=True, enforce_eager=not a.compile,
                   max_model_len=a.prompt_len + a.new_tokens + 8, max_num_seqs=max(batches),
                   gpu_memory_utilization=a.gpu_memory_utilization, seed=0)
    start_s = time.time() - t0
    rows = []
    g = torch.Generator().manual_seed(0)
    for b in batches:
        prompts = [{"prompt_token_ids": torch.randint(3, a.vocab, (a.prompt_len,), generator=g).tolist()}
                   for _ in range(b)]

        run(llm, prompts, a.new_tokens)  # warm-up
        prefill = min(run(llm, prompts, 1) for _ in range(3))
        total = min(run(llm, prompts, a.new_tokens) for _ in range(a.repeats))
        rows.append({"batch": b, "decode_tok_s": b * (a.new_tokens - 1) / max(total - prefill, 1e-9),
                     "generate_s": total, "prefill_s": prefill, "engine_start_s": start_s})
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=ints, default=[4, 3, 2])
    p.add_argument("--batches", type=ints, default=[1, 16])
    shape_args(p, layers=4)
    p.add_argument("--salient", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float16", help="float32 on vLLM's CPU backend (smoke runs)")
    p.add_argument("--compile", action="store_true", help="vLLM's torch.compile + CUDA graphs (default: eager)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--md", type=Path)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    for k, v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}.items():
        os.environ.setdefault(k, v)
    try:
        import vllm
    except ImportError:
        print("bench_vllm: error: vllm is not installed", file=sys.stderr)
        return 2
    from gift_quant.integrations.vllm import register
    register()  # also works from a checkout; worker processes need the installed entry point
    results, base = [], a.dtype.replace("float", "fp")
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as tmp:
        for bits in [None, *a.bits]:
            name = base if bits is None else f"gift {bits}-bit"
            path = Path(tmp) / name.replace(" ", "_")
            t = time.time()
            save_model(a, bits, path)
            log(f"{name}: checkpoint built in {time.time() - t:.0f} s")
            try:
                for r in measure(path, a, a.batches):
                    results.append({"variant": name, **r})
                    log(f"{name} batch {r['batch']}: {r['decode_tok_s']:.1f} tok/s")
            except Exception as e:  # noqa: BLE001  (one failed variant must not hide the others)
                log(f"{name}: FAILED {type(e).__name__}: {e}")
                results.append({"variant": name, "error": f"{type(e).__name__}: {e}"})
            shutil.rmtree(path, ignore_errors=True)
    fp = {r["batch"]: r["decode_tok_s"] for r in results if r["variant"] == base and "decode_tok_s" in r}
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    meta = {"device": dev, "vllm": vllm.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "shape": f"{a.layers} layers, hidden {a.hidden}, MLP {a.intermediate}, vocab {a.vocab}",
            "mode": "vLLM default (torch.compile + CUDA graphs)" if a.compile else "eager",
            "command": "python3 tools/bench_vllm.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    lines = [f"### vLLM decode, {meta['device']}, vLLM {meta['vllm']}, {meta['date']}", "",
             (f"`{meta['command']}`; {meta['shape']}, random weights (speed only), {meta['mode']}, "
              f"{a.dtype}, prompt {a.prompt_len}, {a.new_tokens} new tokens."), "",
             f"| variant | batch | decode tok/s | x {base} |", "|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | - | failed: {r['error'][:80]} | - |")
        else:
            ratio = r["decode_tok_s"] / fp[r["batch"]] if r["batch"] in fp else float("nan")
            lines.append(f"| {r['variant']} | {r['batch']} | {r['decode_tok_s']:.1f} | {ratio:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.md:
        write_text(a.md, md)
    if a.json:
        write_text(a.json, json.dumps({"meta": meta, "rows": results}, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
