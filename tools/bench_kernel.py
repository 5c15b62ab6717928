"""Kernel benchmark: gift mixed-precision linear vs fp16 F.linear, per shape, batch and bit width.

Run on the GPU (see BENCHMARKS.md for the published table):

    python tools/bench_kernel.py --out bench_out/kernel

For every (K x N, batch, bits) with k = 128 FP16 columns it reports
- time of the gemv path and of the dequant+cuBLAS path (both forced), and of fp16 F.linear;
- bytes the chosen path must read (packed base + scales + zeros + FP16 columns + x + y);
- effective bandwidth, as a share of the measured device copy bandwidth;
- speedup over fp16 next to the ideal speedup (fp16 bytes / our bytes).
Timing: each call sequence is captured in a CUDA graph over enough weight copies that L2 cannot hold
them (inputs rotate), replayed after warm-up, timed with CUDA events; medians. On CPU (smoke test
only) it times with perf_counter and skips the bandwidth columns.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_quant.kernels import build, cuda_args, ops  # noqa: E402
from gift_quant.nn.mixed_linear import MixedPrecisionLinear  # noqa: E402


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 20."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times[5:])


def time_calls(fns, device, replays: int = 15) -> float:
    """Median seconds per call of the sequence ``fns`` (each a zero-arg callable)."""
    if device.type != "cuda":
        for f in fns[:2]:
            f()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            for f in fns:
                f()
            ts.append((time.perf_counter() - t0) / len(fns))
        return statistics.median(ts)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns[:3]:
            f()  # warm-up outside capture (allocator, lazy init)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(3):
        g.replay()
    ts = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / len(fns))
    return statistics.median(ts)


def op_call(layer, p, x, gemv_max_tokens):
    return lambda: ops.run_op(x, layer, p, gemv_max_tokens)


def layer_bytes(layer, p, batch: int, gemv: bool, dtype_size: int = 2) -> int:
    """Bytes the path must move: packed base, scales, zeros, FP16 columns, x, y (dequant path also writes
    and re-reads the dense weight)."""
    K, N, k = layer.in_features, layer.out_features, layer.n_salient
    base = p.qweight.numel() * 4 + p.scales.numel() * dtype_size + p.zeros.numel() + p.perm.numel() * 8
    cols = N * k * dtype_size + k * 4
    io = batch * (K + N) * dtype_size
    dense = 0 if gemv else 2 * K * N * dtype_size
    return base + cols + io + dense


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="KxN (in x out) list")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--salient", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true", help="random act-order g_idx (repacked layout)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--version", default="v1", help="kernel version label for the notes file")
    ap.add_argument("--out", default="bench_out/kernel")
    a = ap.parse_args(argv)

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "version": a.version, "date": time.strftime("%Y-%m-%d"),
            "kernel": None, "copy_bw_GBs": None}
    if device.type == "cuda":
        meta["kernel"] = "cuda" if build.extension() is not None else f"fallback ({build.unavailable_reason()})"
        meta["copy_bw_GBs"] = copy_bandwidth(device) / 1e9
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
    else:
        meta["kernel"] = "pytorch (cpu)"
        l2 = 0
    print(json.dumps(meta), flush=True)

    rows = []
    for shape in a.shapes.split(","):
        K, N = (int(v) for v in shape.lower().split("x"))
        fp16_bytes_w = K * N * 2
        for bits in (int(b) for b in a.bits.split(",")):
            copies = max(2, math.ceil(3 * l2 / max(1, K * N * bits // 8))) if l2 else 1
            layers = [MixedPrecisionLinear.random(K, N, bits, a.group_size, a.salient, act_order=a.act_order,
                                                  dtype=torch.float16, seed=i).to(device) for i in range(copies)]
            preps = [cuda_args(m, dtype) if device.type == "cuda" else None for m in layers]
            if device.type != "cuda" or preps[0] is None:
                from gift_quant.kernels.prepare import prepare
                preps = [prepare(m, dtype) for m in layers]
            fp_copies = max(2, math.ceil(3 * l2 / fp16_bytes_w)) if l2 else 1
            ws = [layers[i % copies].dequantize(dtype) for i in range(fp_copies)]
            for batch in (int(b) for b in a.batches.split(",")):
                xs = [torch.randn(batch, K, device=device).to(dtype) for _ in range(max(copies, fp_copies))]
                # correctness guard: the timed op against the dense reference
                y = op_call(layers[0], preps[0], xs[0], 64)()
                ref = F.linear(xs[0].float(), layers[0].dequantize(torch.float32))
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                t_gemv = time_calls([op_call(layers[i], preps[i], xs[i], 1 << 30) for i in range(copies)], device) \
                    if N % 4 == 0 else float("nan")
                t_deq = time_calls([op_call(layers[i], preps[i], xs[i], 0) for i in range(copies)], device)
                t_fp = time_calls([(lambda x=xs[i], w=ws[i]: F.linear(x, w)) for i in range(fp_copies)], device)
                gemv_wins = t_gemv == t_gemv and t_gemv <= t_deq
                t_best = t_gemv if gemv_wins else t_deq
                ours = layer_bytes(layers[0], preps[0], batch, gemv=gemv_wins)
                fp_bytes = fp16_bytes_w + batch * (K + N) * 2
                row = {"K": K, "N": N, "bits": bits, "batch": batch, "k": a.salient,
                       "us_gemv": t_gemv * 1e6, "us_dequant_mm": t_deq * 1e6, "us_fp16": t_fp * 1e6,
                       "best_path": "gemv" if gemv_wins else "dequant+mm", "bytes": ours,
                       "speedup": t_fp / t_best, "ideal": fp_bytes / layer_bytes(layers[0], preps[0], batch, True),
                       "rel_err": err}
                row["speedup_vs_ideal"] = row["speedup"] / row["ideal"]
                if meta["copy_bw_GBs"]:
                    row["GBs"] = ours / t_best / 1e9
                    row["pct_copy_bw"] = 100 * row["GBs"] / meta["copy_bw_GBs"]
                rows.append(row)
                print(json.dumps(row), flush=True)
            del layers, preps, ws
            if device.type == "cuda":
                torch.cuda.empty_cache()

    (out / "kernel.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [f"Device: {meta['device']}, torch {meta['torch']}, kernel {meta['kernel']} ({meta['version']}), "
          f"copy bandwidth {meta['copy_bw_GBs'] or float('nan'):.0f} GB/s, {meta['date']}; k = {a.salient}, "
          f"group {a.group_size}, {a.dtype}{', act-order' if a.act_order else ''}.", "",
          "| K x N | bits | batch | gemv us | dequant+mm us | fp16 us | path | GB/s | % copy bw | speedup | ideal | "
          "speedup/ideal | rel err |", "|" + "---|" * 13]
    for r in rows:
        md.append(f"| {r['K']}x{r['N']} | {r['bits']} | {r['batch']} | {r['us_gemv']:.1f} | {r['us_dequant_mm']:.1f} | "
                  f"{r['us_fp16']:.1f} | {r['best_path']} | {r.get('GBs', float('nan')):.0f} | "
                  f"{r.get('pct_copy_bw', float('nan')):.0f}% | {r['speedup']:.2f}x | {r['ideal']:.2f}x | "
                  f"{r['speedup_vs_ideal']:.2f} | {r['rel_err']:.1e} |")
    (out / "kernel.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
