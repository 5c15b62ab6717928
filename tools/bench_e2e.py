#!/usr/bin/env python3
"""End-to-end deployment benchmark: FP16 against gift 4/3/2-bit, side by side in one run.

Per variant, batch size and mode (eager; ``torch.compile`` with CUDA graphs): prefill latency, decode
tokens/s (greedy, static KV cache, exactly ``--new-tokens``), peak GPU memory, size (saved checkpoint
on disk, or the state dict's bytes) and, part a only, held-out perplexity. Ratios to FP16 of the same
part, mode and batch.

- part a: the bundled SmolLM2-135M (or ``--model``), compressed here with a small calibration set
  (or ``--checkpoints DIR...`` already compressed), against its FP16 model.
- part b: a LLaMA-2-7B-shaped model (``--layers --hidden --intermediate --vocab``) with RANDOM
  weights built directly on the device; the decoder Linears become
  ``MixedPrecisionLinear.random(...)`` in the real packed format. Speed and memory only, never accuracy.

Variants are built, measured and deleted one at a time (empty_cache and reset_peak_memory_stats
between them), one pass per mode in ``--modes`` order (default: eager, then compile). ``--time-budget``
skips (and marks) what would not fit; OOM and any other error are caught per configuration. The JSON
and markdown table are rewritten after every configuration, so a run cut short still leaves its
results; the plot is drawn at the end when matplotlib is importable.

    python3 tools/bench_e2e.py --part b --out OUT [--batch 1,8] [--modes compile,eager] [--compile-batch 1]
        [--time-budget 540] [--profile]
    python3 tools/bench_e2e.py --part a --model FILE.gguf --out OUT [--calib-samples 32] [--checkpoints DIR ...]

Compiled configurations cost the inductor compile of the whole decode step (once per variant and batch
size) and, with GIFT_QUANT_KERNEL=cuda on a fresh machine, the C++ kernel's JIT build comes first: see ``kernel_build_s`` and
``config_s`` in the JSON to plan a run.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from _common import device_name, ints, logger, shape_args
from e2e.loop import Budget, Run
from e2e.variants import prepare_a

from gift_quant.errors import GiftError

log = logger("bench_e2e")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_e2e_out")
    ap.add_argument("--part", choices=("a", "b", "both"), default="b")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure with torch.compile (CUDA graphs); default: on with CUDA, off on CPU")
    ap.add_argument("--modes", default=None, help="comma list in run order, e.g. compile,eager (overrides "
                    "--compile/--no-compile)")
    ap.add_argument("--compile-batch", default=None, help="batch sizes for compiled runs (default: --batch)")
    ap.add_argument("--compile-estimate", type=float, default=None, help="seconds assumed for a variant's "
                    "first compiled configuration when none finished yet (for --time-budget; default 90 on "
                    "CUDA, 0 on CPU)")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; configurations that would "
                    "not fit are skipped and marked")
    ap.add_argument("--profile", action="store_true", help="profile a few eager decode steps per variant")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    # part a
    ap.add_argument("--model", default="bundled", help="part a: bundled | FILE.gguf | HF folder")
    ap.add_argument("--checkpoints", nargs="+", default=None, help="part a: bench these gift checkpoints "
                    "instead of compressing here")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--compress-estimate", type=float, default=60.0,
                    help="part a: seconds one compression is assumed to take (for --time-budget)")
    # part b
    shape_args(ap)
    ap.add_argument("--salient", type=int, default=128, help="part b: FP16 columns per Linear, at most in/32")
    ap.add_argument("--act-order", action="store_true", help="part b: act-order g_idx (kernel layout repacks)")
    a = ap.parse_args(argv)
    try:
        a.batch, a.bits = ints(a.batch), ints(a.bits)
        a.compile_batch = a.batch if a.compile_batch is None else ints(a.compile_batch)
    except ValueError:
        ap.error("--batch, --compile-batch and --bits take comma-separated integers")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.compile is None:
        a.compile = device.type == "cuda"
    a.modes = [m.strip() for m in a.modes.split(",")] if a.modes else ["eager"] + (["compile"] if a.compile else [])
    if not a.modes or set(a.modes) - {"eager", "compile"}:
        ap.error("--modes takes eager and/or compile")
    if a.compile_estimate is None:
        a.compile_estimate = 90.0 if device.type == "cuda" else 0.0
    return a, device


def run_meta(a, argv, device, dtype) -> dict:
    """The JSON's ``meta``: the run's settings, versions, and which kernel the GPU rows use (on CUDA with
    GIFT_QUANT_KERNEL=cuda this JIT-builds the C++ kernel first)."""
    from gift_quant.kernels.cuda import build
    from gift_quant.nn.dispatch import requested_backend
    meta = {"argv": sys.argv[1:] if argv is None else list(argv), "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "device_name": device_name(device),
            "torch": torch.__version__, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
            "batches": a.batch, "bits": a.bits, "modes": a.modes, "time_budget_s": a.time_budget,
            "part_desc": {"a": f"{a.model} (real weights), FP16 vs gift; perplexity on held-out text",
                          "b": f"LLaMA-shaped {a.layers} layers, hidden {a.hidden}, intermediate "
                               f"{a.intermediate}, {a.heads} heads, vocab {a.vocab}, group {a.group_size}, "
                               f"k = min({a.salient}, in/32), act-order {a.act_order}"},
            "notes": []}
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    t = time.time()
    backend = requested_backend()
    meta["backend"] = backend
    if device.type == "cuda" and backend == "cuda":
        log("building / loading the C++ kernel (first use: about a minute or more) ...")
        ext = build.extension()
        meta["kernel_build_s"] = time.time() - t
        meta["kernel_status"] = "C++ built" if ext is not None else f"C++ unavailable ({build.unavailable_reason()})"
        meta["kernel_unavailable_reason"] = build.unavailable_reason()
    elif device.type == "cuda":
        meta["kernel_status"] = f"GIFT_QUANT_KERNEL={backend} ({'Triton' if backend == 'auto' else backend})"
    else:
        meta["kernel_status"] = f"not used on {device.type} (PyTorch path)"
    if device.type != "cuda":
        meta["notes"].append("on CPU, peak memory is the process's peak RSS (it never goes down), so its "
                             "ratios mean nothing; the CPU path dequantizes every layer (no kernel)")
    return meta


def main(argv=None) -> int:
    a, device = parse_args(argv)
    budget = Budget(a.time_budget)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(a, argv, device, dtype)
    log(f"device {meta['device_name']}; kernel {meta['kernel_status']}")
    run = Run(a, device, dtype, meta, out, budget)
    for part in ["a", "b"] if a.part == "both" else [a.part]:
        if part == "a":
            variants, info = prepare_a(a, device, dtype, budget)
            meta.update(info)
        else:
            variants = [{"name": "fp16", "bits": 16}] + [{"name": f"gift-{b}bit", "bits": b} for b in a.bits]
        for mode in a.modes:
            for v in variants:
                run.variant(part, v, mode)
        del variants
        gc.collect()
    meta["total_s"] = budget.elapsed()
    print(run.save(final=True))
    log(f"done in {meta['total_s']:.1f} s; wrote {out / 'bench_e2e.json'} and {out / 'bench_e2e.md'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GiftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
