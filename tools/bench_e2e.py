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
size) and, on a fresh machine, the CUDA kernel's JIT build comes first: see ``kernel_build_s`` and
``config_s`` in the JSON to plan a run.
"""
from __future__ import annotations

import argparse
import copy
import gc
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gift_quant import bench  # noqa: E402
from gift_quant.errors import GiftError  # noqa: E402
from gift_quant.nn.mixed_linear import MixedPrecisionLinear  # noqa: E402

RANDOM_NOTE = ("part b: random weights in the real packed format; speed and memory only, "
               "never accuracy (its outputs are meaningless).")
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def log(msg: str):
    print(f"[bench_e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ints(s: str) -> list[int]:
    return [int(v) for v in str(s).split(",") if v.strip()]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


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


def drop_compiled(model):
    """Forget transformers' compiled decode step and the kernel layouts so the memory can go."""
    for attr in ("_compiled_call", "_last_compile_config"):
        model.__dict__.pop(attr, None)
    for m in model.modules():
        m.__dict__.pop("_gift_kernel_cache", None)
    try:
        torch._dynamo.reset()  # also frees the CUDA graph pools
    except Exception:  # noqa: BLE001
        pass


class Budget:
    def __init__(self, seconds: float | None):
        self.t0, self.limit = time.time(), seconds

    def elapsed(self) -> float:
        return time.time() - self.t0

    def allows(self, predicted: float) -> bool:
        return self.limit is None or self.elapsed() + predicted <= self.limit


# ---- profile hint -------------------------------------------------------------------------------

@torch.no_grad()
def profile_decode(model, vocab: int, device, prompt_len: int, steps: int = 4) -> dict:
    """Eager decode steps (batch 1) under torch.profiler: the share of time in the decoder Linears
    (``MixedPrecisionLinear`` = ``gift_quant::mixed_linear``, or ``nn.Linear`` for FP16) against the
    rest (attention, norms, lm_head, launch gaps)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    handles = []
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in DECODER_LINEARS:
            def pre(mod, _args):
                mod._bench_rf = record_function("bench::decoder_linear")
                mod._bench_rf.__enter__()

            def post(mod, _args, _out):
                mod._bench_rf.__exit__(None, None, None)
                del mod._bench_rf
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(3, vocab, (1, prompt_len), generator=g).to(device)
        out = model(ids, use_cache=True)
        pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(2):  # warm-up
            out = model(tok, past_key_values=pkv, use_cache=True)
            pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=pkv, use_cache=True)
            pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        plain_ms = (time.perf_counter() - t) / steps * 1e3
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                out = model(tok, past_key_values=pkv, use_cache=True)
                pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
            wall = time.perf_counter() - t
    finally:
        for h in handles:
            h.remove()
    ev = prof.events()
    lin = [e for e in ev if e.name == "bench::decoder_linear"]
    res = {"step_ms": plain_ms, "profiled_step_ms": wall / steps * 1e3}
    if device.type == "cuda":
        total = sum(e.self_device_time_total for e in ev)  # us of kernels
        lin_dev = sum(e.device_time_total for e in lin)
        res.update(linear_share=lin_dev / total if total else None,
                   gpu_busy=total / 1e6 / wall if wall else None,
                   kernel_ms_per_step=total / 1e3 / steps, linear_kernel_ms_per_step=lin_dev / 1e3 / steps)
    else:
        lin_cpu = sum(e.cpu_time_total for e in lin)
        res.update(linear_share=lin_cpu / 1e6 / wall if wall else None, gpu_busy=None)
    return res


def profile_line(name: str, p: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    busy = "" if p.get("gpu_busy") is None else f", GPU busy {f(p['gpu_busy'])} of wall (rest: launch/CPU)"
    return (f"{name}: eager decode step {p['step_ms']:.2f} ms; decoder Linears {f(p['linear_share'])} of "
            f"{'kernel' if p.get('gpu_busy') is not None else 'CPU'} time, the rest attention/norms/lm_head{busy}")


# ---- variants -----------------------------------------------------------------------------------

def llama_config(a):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.heads, vocab_size=a.vocab,
                       max_position_embeddings=max(4096, a.prompt_len + a.new_tokens + 8),
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def n_salient_for(a, in_features: int) -> int:
    return max(0, min(a.salient, in_features // 32))  # the project's default k = min(128, in/32)


@torch.no_grad()
def build_b(a, bits: int | None, device, dtype):
    """A LLaMA-shaped model with random weights, built on ``device``; decoder Linears replaced by
    random MixedPrecisionLinear layers when ``bits`` is set. One random template per (shape, bits)
    is made on the CPU and cloned on the device for every layer (distinct memory, the real footprint)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama_config(a), dtype=dtype)
    model.eval()
    if bits:
        templates = {}
        for li, layer in enumerate(model.model.layers):
            for parent in (layer.self_attn, layer.mlp):
                for name in DECODER_LINEARS:
                    lin = getattr(parent, name, None)
                    if lin is None:
                        continue
                    key = (lin.in_features, lin.out_features)
                    if key not in templates:
                        templates[key] = MixedPrecisionLinear.random(
                            lin.in_features, lin.out_features, bits, group_size=a.group_size,
                            n_salient=n_salient_for(a, lin.in_features), act_order=a.act_order,
                            dtype=torch.float16, seed=len(templates)).to(device)
                    setattr(parent, name, copy.deepcopy(templates[key]))
                    del lin
        del templates
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def eval_texts():
    from gift_quant.data import load_texts
    try:
        return "idle", load_texts("idle")
    except (GiftError, ImportError):  # idlelib is a separate distro package on some systems
        return "topics-heldout", load_texts("topics-heldout")


def prepare_a(a, device, dtype, budget: Budget) -> tuple[list[dict], dict]:
    """Part a variants as CPU models: FP16, then compressed (here or from --checkpoints)."""
    from gift_quant.config import GiftConfig
    from gift_quant.data import eval_windows
    from gift_quant.evaluate import perplexity
    from gift_quant.model_io import load_model

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

    variants = []
    base = copy.deepcopy(fp).to(dtype)
    variants.append({"name": "fp16", "bits": 16, "model": base, "size_mib": state_dict_mib(base),
                     "size_source": "state_dict", "ppl": ppl(base)})
    log(f"fp16: ppl {variants[0]['ppl']}")
    if a.checkpoints:
        from gift_quant.hf import load_checkpoint
        for path in a.checkpoints:
            m, _ = load_checkpoint(path, dtype=dtype)
            bits = m.config.quantization_config.bits if hasattr(m.config.quantization_config, "bits") else \
                m.config.quantization_config.get("bits")
            v = {"name": f"gift-{bits}bit", "bits": bits, "model": m.eval(), "path": str(path),
                 "size_mib": bench.disk_size_mib(path), "size_source": "disk"}
            v["ppl"] = ppl(m)
            log(f"{v['name']} from {path}: ppl {v['ppl']}")
            variants.append(v)
    else:
        for bits in a.bits:
            if not budget.allows(a.compress_estimate):
                log(f"gift-{bits}bit: compression skipped (time budget)")
                variants.append({"name": f"gift-{bits}bit", "bits": bits, "model": None, "skipped": True})
                continue
            from gift_quant.api import quantize_
            m = copy.deepcopy(fp)
            cfg = GiftConfig(bits=bits, group_size=a.group_size, calib_samples=a.calib_samples, seq_len=a.seq_len)
            t = time.time()
            rep = quantize_(m, cfg, tok, dataset="bundled", device=device, progress=False)
            m = m.to(dtype).eval()
            free(device)
            v = {"name": f"gift-{bits}bit", "bits": bits, "model": m, "size_mib": state_dict_mib(m),
                 "size_source": "state_dict", "compress_s": time.time() - t,
                 "bits_per_weight": rep.bits_per_weight}
            v["ppl"] = ppl(m)
            log(f"{v['name']}: compressed in {v['compress_s']:.1f} s ({rep.bits_per_weight:.2f} bits/weight "
                f"in the Linears), ppl {v['ppl']}")
            variants.append(v)
    del fp
    gc.collect()
    return variants, info


# ---- the run ------------------------------------------------------------------------------------

def add_ratios(rows: list[dict]):
    fp = {(r["part"], r["mode"], r["batch"]): r for r in rows if r["bits"] == 16 and r["status"] == "ok"}
    for r in rows:
        ref = fp.get((r["part"], r["mode"], r["batch"]))
        ok = ref is not None and r["status"] == "ok"
        div = lambda x, y: x / y if ok and x is not None and y else None  # noqa: E731
        r["tok_s_vs_fp16"] = div(r.get("decode_tok_s"), ref and ref.get("decode_tok_s"))
        r["prefill_speedup_vs_fp16"] = div(ref and ref.get("prefill_ms"), r.get("prefill_ms"))
        r["mem_vs_fp16"] = div(r.get("peak_mem_mib"), ref and ref.get("peak_mem_mib"))
        r["size_vs_fp16"] = (r["size_mib"] / ref["size_mib"] if ref is not None and r.get("size_mib")
                             and ref.get("size_mib") else None)


EXTRA = (("tok/s vs FP16", "tok_s_vs_fp16", ".2f"), ("prefill speedup", "prefill_speedup_vs_fp16", ".2f"),
         ("mem vs FP16", "mem_vs_fp16", ".2f"), ("size vs FP16", "size_vs_fp16", ".2f"),
         ("kernel layers", "kernel_layers", "d"))


def write_outputs(out: Path, meta: dict, rows: list[dict], profiles: dict, final: bool = False):
    add_ratios(rows)
    bench.write_json({"meta": meta, "rows": rows, "profile": profiles}, out / "bench_e2e.json")
    md = [f"# End-to-end benchmark ({meta['device_name']}, {meta['date']})", "",
          f"prompt {meta['prompt_len']} tokens, {meta['new_tokens']} new tokens, greedy, static KV cache; "
          f"compute dtype {meta['dtype']}. Ratios are against FP16 of the same part, mode and batch "
          "(tok/s and prefill: >1 is faster; memory and size: <1 is smaller). Peak memory includes the "
          "weights. In `compile` rows only the decode step is compiled (transformers' own path, "
          "mode=reduce-overhead on CUDA); prefill runs eager.",
          "Size: the state dict with float tensors at 2 bytes (FP16 storage), or the checkpoint's "
          "safetensors on disk (`size_source` in the JSON).",
          f"CUDA kernel: {meta.get('kernel_status')}.", ""]
    for part in ("a", "b"):
        pr = [r for r in rows if r["part"] == part]
        if not pr:
            continue
        md.append(f"## Part {part}: {meta['part_desc'][part]}")
        if part == "b":
            md.append(f"**{RANDOM_NOTE}**")
        elif meta.get("eval_dataset") and meta["eval_dataset"] != "idle":
            md.append(f"(perplexity column is on `{meta['eval_dataset']}`: idlelib is missing here)")
        md += ["", bench.table(pr, EXTRA), ""]
        for name, p in profiles.items():
            if name.startswith(part + ":"):
                md.append("- " + profile_line(name, p))
        md.append("")
        if final and any(r["status"] == "ok" for r in pr):
            try:
                bench.plot([dict(r, model=r["model"]) for r in pr], out / f"bench_e2e_{part}.png")
            except GiftError:
                note = "no plot: matplotlib is not installed"
                if note not in meta["notes"]:
                    meta["notes"].append(note)
    if meta.get("notes"):
        md += ["Notes:"] + [f"- {n}" for n in meta["notes"]]
    (out / "bench_e2e.md").write_text("\n".join(md) + "\n")
    return "\n".join(md)


def main(argv=None) -> int:
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
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--salient", type=int, default=128, help="part b: FP16 columns per Linear, at most in/32")
    ap.add_argument("--act-order", action="store_true", help="part b: act-order g_idx (kernel layout repacks)")
    a = ap.parse_args(argv)
    budget = Budget(a.time_budget)
    try:
        a.batch, a.bits = ints(a.batch), ints(a.bits)
        a.compile_batch = a.batch if a.compile_batch is None else ints(a.compile_batch)
    except ValueError:
        ap.error("--batch, --compile-batch and --bits take comma-separated integers")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.compile is None:
        a.compile = device.type == "cuda"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["a", "b"] if a.part == "both" else [a.part]
    modes = [m.strip() for m in a.modes.split(",")] if a.modes else ["eager"] + (["compile"] if a.compile else [])
    if not modes or set(modes) - {"eager", "compile"}:
        ap.error("--modes takes eager and/or compile")
    if a.compile_estimate is None:
        a.compile_estimate = 90.0 if device.type == "cuda" else 0.0

    from gift_quant.kernels import build
    from gift_quant.nn.dispatch import prepare_model, requested_backend
    meta = {"argv": sys.argv[1:] if argv is None else list(argv), "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
            "batches": a.batch, "bits": a.bits, "modes": modes, "time_budget_s": a.time_budget,
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
    log(f"device {meta['device_name']}; kernel {meta['kernel_status']}")

    rows: list[dict] = []
    profiles: dict = {}
    cost: dict = {}  # (part, mode, batch index) -> seconds of the slowest finished config
    build_cost: dict = {}

    for part in parts:
        if part == "a":
            variants, info = prepare_a(a, device, dtype, budget)
            meta.update(info)
        else:
            variants = [{"name": "fp16", "bits": 16}] + [{"name": f"gift-{b}bit", "bits": b} for b in a.bits]
        for mode in modes:
            for v in variants:
                label = f"{part}:{v['name']}:{mode}"
                base = {"part": part, "model": v["name"], "bits": v["bits"], "mode": mode,
                        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "device": str(device),
                        "dtype": meta["dtype"], "ppl_idle": v.get("ppl"), "size_mib": v.get("size_mib"),
                        "size_source": v.get("size_source"), "path": v.get("path")}

                batches = a.compile_batch if mode == "compile" else a.batch

                def skip(why, b_from=0):
                    for b in batches[b_from:]:
                        rows.append({**base, "batch": b, "status": why})
                    write_outputs(out, meta, rows, profiles)

                if v.get("skipped") or (part == "a" and v.get("model") is None):
                    skip("skipped")
                    continue
                if not budget.allows(build_cost.get(part, 0.0)):
                    log(f"{label}: skipped (time budget, {budget.elapsed():.0f} s used)")
                    skip("skipped")
                    continue
                t = time.time()
                try:
                    if part == "b":
                        model = build_b(a, None if v["bits"] == 16 else v["bits"], device, dtype)
                        base["size_mib"], base["size_source"] = state_dict_mib(model), "state_dict"
                    else:
                        model = v["model"].to(device)
                    n_kernel = prepare_model(model) if device.type == "cuda" else 0
                except Exception as e:  # noqa: BLE001 - report it in the table, go on with the next variant
                    oom = bench._is_oom(e)
                    if not oom:
                        traceback.print_exc()
                    log(f"{label}: {'OOM' if oom else type(e).__name__} while building")
                    model = None
                    free(device)
                    skip("OOM (build)" if oom else f"error (build): {type(e).__name__}")
                    continue
                build_s = time.time() - t
                build_cost[part] = max(build_cost.get(part, 0.0), build_s)
                base.update(build_s=build_s, mixed_layers=n_mixed(model), kernel_layers=n_kernel)
                log(f"{label}: ready in {build_s:.1f} s ({base['mixed_layers']} mixed-precision Linears, "
                    f"{n_kernel} on a kernel, {base['size_mib']:.1f} MiB)")
                if a.profile and mode == "eager":
                    try:
                        p = profile_decode(model, model.config.vocab_size, device, a.prompt_len)
                        profiles[f"{part}:{v['name']}"] = p
                        log("profile " + profile_line(f"{part}:{v['name']}", p))
                    except Exception as e:  # noqa: BLE001 - a hint only, never fatal
                        meta["notes"].append(f"profile of {part}:{v['name']} failed: {type(e).__name__}: {e}")
                gen = bench.generate_options(mode)
                if mode == "compile":
                    from transformers import CompileConfig
                    cc = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default",
                                       dynamic=False)
                    if device.type != "cuda":
                        cc._compile_all_devices = True  # transformers compiles on CUDA only unless told
                    gen = {"compile_config": cc}
                for bi, b in enumerate(batches):
                    guess = cost.get((part, mode, bi)) or (
                        max(3 * cost.get((part, "eager", bi), 0.0), a.compile_estimate) if mode == "compile" else 0.0)
                    if not budget.allows(guess):
                        log(f"{label} b{b}: skipped (time budget: {budget.elapsed():.0f} s used, ~{guess:.0f} s "
                            "needed)")
                        skip("skipped", bi)
                        break
                    t = time.time()
                    try:
                        r = bench.measure_safe(model, model.config.vocab_size, b, a.prompt_len, a.new_tokens,
                                               device, repeats=a.repeats, **gen)
                    except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the run
                        traceback.print_exc()
                        r = {"status": f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}",
                             "peak_mem_mib": None}
                        free(device)
                    secs = time.time() - t
                    cost[(part, mode, bi)] = max(cost.get((part, mode, bi), 0.0), secs)
                    rows.append({**base, "batch": b, **r, "config_s": secs})
                    log(f"{label} b{b}: {r['status']}"
                        + (f", prefill {r['prefill_ms']:.1f} ms, decode {r['decode_tok_s']:.1f} tok/s"
                           if r["status"] == "ok" else "")
                        + (f", peak {r['peak_mem_mib']:.0f} MiB" if r["peak_mem_mib"] is not None else "")
                        + f" ({secs:.1f} s; {budget.elapsed():.0f} s used)")
                    write_outputs(out, meta, rows, profiles)
                drop_compiled(model)
                if part == "a":
                    model.to("cpu")
                del model
                free(device)
        if part == "a":
            del variants
            gc.collect()
    meta["total_s"] = budget.elapsed()
    print(write_outputs(out, meta, rows, profiles, final=True))
    log(f"done in {meta['total_s']:.1f} s; wrote {out / 'bench_e2e.json'} and {out / 'bench_e2e.md'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GiftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
