"""Peak GPU memory of compressing a LLaMA-2-7B-shaped model with the model kept on CPU.

Builds a random-weight ``LlamaForCausalLM`` (default: the LLaMA-2-7B shape, 32 layers, hidden 4096,
intermediate 11008, 32 heads, vocab 32000) on CPU in fp16, then runs gift's layer-by-layer compression
(:func:`gift_quant.compress.pipeline.compress_model`): the model stays on CPU and one decoder layer at a time
moves to ``--device``; calibration activations stay on the device when they fit (``--activations auto``)
or are offloaded to CPU (``--activations cpu``). Calibration: ``--samples`` random-token windows of
``--seq-len`` tokens. Reports ``torch.cuda.max_memory_allocated()`` / ``max_memory_reserved()`` over the
compression against the model's fp16 size, the wall time, and the process's peak CPU RSS; writes a JSON
(``--json``) and prints one markdown row. On ``--device cpu`` only the RSS is reported.

    python tools/bench_offload_memory.py                              # 7B shape on cuda (~13 GB of RAM)
    python tools/bench_offload_memory.py --layers 4                   # 7B-wide, 4 layers: a quicker check
    python tools/bench_offload_memory.py --device cpu --layers 2 --hidden 256 --intermediate 512 \\
        --heads 4 --vocab 1000 --samples 4 --seq-len 64                # CPU smoke run (seconds)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import threading
import time

import torch
from _common import llama_config, shape_args

from gift_quant.compress import pipeline
from gift_quant.config import GiftConfig
from gift_quant.io.atomic import write_text

GIB = 2 ** 30


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


class RssSampler:
    """Peak RSS inside a window (ru_maxrss only gives the peak since the process started)."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self._stop = every, rss_bytes(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def build_model(a):
    """Random-weight Llama on CPU, parameters created directly in fp16 (no fp32 copy of the model)."""
    from transformers import LlamaForCausalLM
    cfg = llama_config(a, max_position_embeddings=max(4096, a.seq_len), dtype="float16")
    torch.manual_seed(a.seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.config.use_cache = False
    return model.eval().requires_grad_(False)


def tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def run(a) -> dict:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    torch.set_grad_enabled(False)
    t0 = time.time()
    model = build_model(a)
    build_s = time.time() - t0
    params = sum(p.numel() for p in model.parameters())
    model_bytes = tensor_bytes(model)
    layers, _ = pipeline.decoder_layers(model)
    layer_bytes = max(tensor_bytes(layer) for layer in layers)
    rss_model = rss_bytes()

    g = torch.Generator().manual_seed(a.seed + 1)
    samples = torch.randint(0, a.vocab, (a.samples, a.seq_len), generator=g)
    cfg = GiftConfig(bits=a.bits, group_size=a.group_size, n_salient=a.salient, salient_ratio=None,
                     method=a.method, calib_samples=a.samples, seq_len=a.seq_len, seed=a.seed)

    if a.activations == "cpu":  # force the calibration activations off the device
        pipeline.activation_device = lambda samples, hidden, device: torch.device("cpu")
    elif a.activations == "device":
        pipeline.activation_device = lambda samples, hidden, device: device
    act_dev = pipeline.activation_device(samples, a.hidden, device)

    if cuda:
        torch.cuda.init()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    t1 = time.time()
    with RssSampler() as rss:
        report = pipeline.compress_model(model, samples, cfg, device=device, batch_size=a.batch_size,
                                         progress=not a.quiet)
        if cuda:
            torch.cuda.synchronize(device)
    compress_s = time.time() - t1
    n_converted = len(report.modules)
    if n_converted != a.layers * 7:
        raise SystemExit(f"expected {a.layers * 7} converted Linears, got {n_converted}")

    out = {
        "tool": "bench_offload_memory", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "host_cpus": os.cpu_count(), "platform": platform.platform(),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "shape": {"layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate, "heads": a.heads,
                  "kv_heads": a.kv_heads or a.heads, "vocab": a.vocab},
        "params": params, "model_fp16_gib": round(model_bytes / GIB, 3),
        "layer_fp16_gib": round(layer_bytes / GIB, 3),
        "samples": a.samples, "seq_len": a.seq_len, "batch_size": a.batch_size, "bits": a.bits,
        "group_size": a.group_size, "n_salient": a.salient, "method": a.method,
        "activations": str(act_dev), "bits_per_weight": round(report.bits_per_weight, 4),
        "build_seconds": round(build_s, 1), "compress_seconds": round(compress_s, 1),
        "seconds_per_layer": round(compress_s / a.layers, 2),
        "cpu_rss_after_build_gib": round(rss_model / GIB, 3),
        "cpu_peak_rss_compress_gib": round(rss.peak / GIB, 3),
        "cpu_peak_rss_process_gib": round(max(peak_rss_bytes(), rss.peak) / GIB, 3),
        "gpu_peak_allocated_gib": None, "gpu_peak_reserved_gib": None, "gpu_peak_over_model": None,
        "gpu_peak_over_layer": None,
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base_alloc
        out.update(gpu_peak_allocated_gib=round(peak / GIB, 3),
                   gpu_peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 3),
                   gpu_peak_over_model=round(peak / model_bytes, 4),
                   gpu_peak_over_layer=round(peak / layer_bytes, 2))
    return out


HEADER = ("| shape (layers x hidden / inter, vocab) | calibration | bits | device | activations | "
          "GPU peak alloc / reserved | model fp16 | peak / model | compress time | CPU peak RSS |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    s = r["shape"]
    gpu = (f"{r['gpu_peak_allocated_gib']:.2f} / {r['gpu_peak_reserved_gib']:.2f} GiB"
           if r["gpu_peak_allocated_gib"] is not None else "n/a (CPU)")
    ratio = f"{100 * r['gpu_peak_over_model']:.1f}%" if r["gpu_peak_over_model"] is not None else "n/a"
    return (f"| {s['layers']} x {s['hidden']} / {s['intermediate']}, {s['vocab']} | "
            f"{r['samples']} x {r['seq_len']} tokens | {r['bits']} (g{r['group_size']}, k={r['n_salient']}) | "
            f"{r['device_name']} | {r['activations']} | {gpu} | {r['model_fp16_gib']:.2f} GiB | {ratio} | "
            f"{r['compress_seconds']:.0f} s ({r['seconds_per_layer']:.1f} s/layer) | "
            f"{r['cpu_peak_rss_compress_gib']:.2f} GiB |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_args(ap)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (LLaMA-2-7B has no GQA)")
    ap.add_argument("--samples", type=int, default=16, help="random-token calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration windows per layer forward")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--salient", type=int, default=128, help="FP16 columns per Linear")
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--activations", default="auto", choices=["auto", "cpu", "device"],
                    help="where calibration activations live between layers (auto: device if they fit)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench_offload_memory.json", help="output JSON path")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if a.hidden % a.heads or (a.kv_heads and a.heads % a.kv_heads):
        ap.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    if min(a.layers, a.samples, a.seq_len, a.batch_size) < 1:
        ap.error("--layers, --samples, --seq-len and --batch-size must be >= 1")
    if a.salient >= min(a.hidden, a.intermediate):
        ap.error("--salient must be smaller than --hidden and --intermediate")
    r = run(a)
    write_text(a.json, json.dumps(r, indent=1) + "\n")
    print(HEADER)
    print(row(r))
    print(f"(JSON: {a.json})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
