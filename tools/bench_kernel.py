"""Kernel benchmark: gift mixed-precision linear (Triton, C++, PyTorch path) vs fp16 F.linear.

    python tools/bench_kernel.py --md kernel.md                      # the full table (GPU, ~1-2 min)
    python tools/bench_kernel.py --quick --md kernel.md              # 4096x11008 + 11008x4096, batch 1/16, 4/2 bits
    python tools/bench_kernel.py --backends cuda,triton --shapes 4096x11008 --batches 1 --bits 4

For every (K x N, bits, batch) with k FP16 columns (default 128, group 128) it times
- ``triton``: the decode GEMV and the prefill GEMM, both forced, and says which one ``auto`` picks;
- ``cuda`` (opt-in, JIT build ~1 min): the C++ kernel through the same dispatch;
- ``torch``: gift's PyTorch path (dequantize per call);
- fp16 ``F.linear`` on a dense weight of the same shape (always).
Timing: each backend's calls over enough weight copies that L2 cannot hold them (rotated) are captured
in one CUDA graph (kernels compiled and run once before capture), replayed, timed with CUDA events;
median per call. The copy bandwidth (device-to-device copy, read + write) is measured in the same run.
Bytes are what a layer must read and write: packed base + scales + zeros + FP16 columns + x + y; ideal
speedup = fp16 bytes / those bytes. On CPU (smoke test only) it times with perf_counter.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import ints

from gift_quant.core.packing import pack_qweight, pack_qzeros
from gift_quant.nn import dispatch
from gift_quant.nn.mixed_linear import MixedPrecisionLinear

BIG = 1 << 30


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 20 after 5 warm-ups."""
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


def time_calls(fns, device, replays: int = 20) -> float:
    """Median seconds per call of the sequence ``fns`` (zero-arg callables), CUDA-graph replayed."""
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
        for f in fns:
            f()  # every copy once outside capture: compile, autotune, allocator, lazy init
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
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
    del g
    return statistics.median(ts)


@torch.no_grad()
def random_layer(K: int, N: int, bits: int, gs: int, k: int, act: bool, device, seed: int,
                 dtype=torch.float16) -> MixedPrecisionLinear:
    """A valid random layer built on ``device`` (MixedPrecisionLinear.random works on CPU: too slow at 7B
    shapes). Salient slots hold the zero-point, like a gift checkpoint."""
    k = min(k, K)
    gen = torch.Generator(device=device).manual_seed(seed)
    G = 1 if gs <= 0 else -(-K // gs)
    step = gs if gs > 0 else K
    order = torch.randperm(K, generator=gen, device=device) if act else torch.arange(K, device=device)
    g_idx = torch.empty(K, dtype=torch.long, device=device)
    g_idx[order] = torch.arange(K, device=device) // step
    codes = torch.randint(0, 2 ** bits, (N, K), generator=gen, device=device, dtype=torch.int32)
    zeros = torch.randint(0, 2 ** bits, (G, N), generator=gen, device=device, dtype=torch.int32)
    sal = torch.randperm(K, generator=gen, device=device)[:k].sort().values
    codes[:, sal] = zeros[g_idx[sal]].t()
    m = MixedPrecisionLinear(K, N, bits, gs, k, bias=False, dtype=dtype, device=device)
    m.qweight.copy_(pack_qweight(codes, bits))
    m.qzeros.copy_(pack_qzeros(zeros, bits))
    m.scales.copy_(torch.rand(G, N, generator=gen, device=device) * 0.02 + 0.002)
    m.g_idx.copy_(g_idx.to(torch.int32))
    m.salient_idx.copy_(sal.to(torch.int32))
    m.salient_weight.data.copy_(torch.randn(N, k, generator=gen, device=device) * 0.05)
    return m


def clone_layer(m: MixedPrecisionLinear) -> MixedPrecisionLinear:
    """Same values, new memory (a copy that L2 has not seen)."""
    c = MixedPrecisionLinear(m.in_features, m.out_features, m.bits, m.group_size, m.n_salient, False,
                             m.scales.dtype, m.qweight.device)
    c.load_state_dict(m.state_dict())
    return c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="triton", help="comma list of triton, cuda, torch (fp16 always runs)")
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="KxN (in x out) list")
    ap.add_argument("--batches", default="1,2,4,8,16,64")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--quick", action="store_true", help="4096x11008,11008x4096 at batch 1,16, bits 4,2")
    ap.add_argument("--salient", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true", help="random act-order g_idx")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--l2-factor", type=float, default=3.0, help="weight copies cover this many L2 sizes")
    ap.add_argument("--sweep", default="ATOMIC=1;BN=128;STAGES=3;num_warps=8;SPLIT=4",
                    help="split-K configs (keys of triton_kernel.splitk_config, over its defaults) timed at "
                    "batch 1 ('' to skip): ;-separated key=value lists")
    ap.add_argument("--tuned-out", help="write the tuned table (fastest path per shape, bits and tokens) to "
                    "this folder, named for the GPU (gift_quant/kernels/tuned_tables/ format)")
    ap.add_argument("--out", default="bench_out/kernel", help="folder for kernel.json/kernel.md")
    ap.add_argument("--md", help="write the markdown table here (default OUT/kernel.md)")
    ap.add_argument("--json", help="write the raw rows here (default OUT/kernel.json)")
    a = ap.parse_args(argv)
    if a.quick:
        a.shapes, a.batches, a.bits = "4096x11008,11008x4096", "1,16", "4,2"
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    bad = set(backends) - {"triton", "cuda", "torch"}
    if bad:
        ap.error(f"unknown backend(s) {sorted(bad)}; choose from triton, cuda, torch")
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
        batches, bitss = ints(a.batches), ints(a.bits)
    except ValueError as e:
        ap.error(f"bad --shapes/--batches/--bits: {e}")

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    if device.type != "cuda" and "triton" in backends and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("# triton skipped on CPU (set TRITON_INTERPRET=1 to run it in the interpreter)", flush=True)
        backends.remove("triton")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "backends": backends, "copy_bw_GBs": None,
            "gemv_max_tokens": dispatch.GEMV_MAX_TOKENS, "argv": sys.argv[1:] if argv is None else argv}
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    if cuda:
        meta["copy_bw_GBs"] = copy_bandwidth(device) / 1e9
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
    else:
        l2 = 0
    meta["l2_bytes"] = l2
    if "cuda" in backends and cuda:
        from gift_quant.kernels.cuda import build
        t = time.time()
        meta["cuda_build"] = "ok" if build.extension(warn=False) is not None else build.unavailable_reason()
        meta["cuda_build_s"] = round(time.time() - t, 1)
    print(json.dumps(meta), flush=True)

    def run(backend, x, layer, gmt=None):
        return dispatch.run(backend, x, layer, gmt)

    sweep = []
    if a.sweep and "triton" in backends and 1 in batches:
        for item in a.sweep.split(";"):
            try:
                sweep.append({k.strip(): int(v) for k, v in (kv.split("=") for kv in item.split(",") if kv.strip())})
            except ValueError:
                ap.error(f"bad --sweep item {item!r}")
    sweep_rows = []
    rows = []
    for K, N in shapes:
        fp_w = K * N * 2
        fp_copies = max(2, math.ceil(a.l2_factor * l2 / fp_w)) if l2 else 1
        ws = [torch.randn(N, K, device=device, dtype=dtype) * 0.02 for _ in range(fp_copies)]
        for bits in bitss:
            t0 = time.time()
            base = random_layer(K, N, bits, a.group_size, a.salient, a.act_order, device, seed=bits, dtype=dtype)
            qbytes = K * N * bits // 8
            copies = max(2, math.ceil(a.l2_factor * l2 / qbytes)) if l2 else 1
            layers = [base] + [clone_layer(base) for _ in range(copies - 1)]
            L = dispatch.prepared(base, "triton", dtype) if "triton" in backends else None
            for m in layers[1:]:
                if L is not None:
                    dispatch.prepared(m, "triton", dtype)
            lay_bytes = L.nbytes() if L is not None else (base.qweight.numel() * 4 + base.scales.numel() * 2
                                                          + base.zeros().numel() + N * base.n_salient * 2
                                                          + base.n_salient * 4)
            int4 = False
            if L is not None and bits == 4 and dtype == torch.bfloat16:
                from gift_quant.kernels import torch_int4
                if torch_int4.unavailable(L) is None:
                    for m in layers:
                        lo = dispatch.prepared(m, "triton", dtype)
                        lo.__dict__["_int4"] = torch_int4.build(lo)
                    int4 = True
            w_ref = base.dequantize(torch.float32)
            print(f"# {K}x{N} {bits}-bit: {copies} copies, setup {time.time() - t0:.1f}s", flush=True)
            for batch in batches:
                xs = [torch.randn(batch, K, device=device).to(dtype) for _ in range(max(copies, fp_copies))]
                ref = F.linear(xs[0].float(), w_ref)
                row = {"K": K, "N": N, "bits": bits, "batch": batch, "k": a.salient, "copies": copies}

                def err(y):
                    return ((y.float() - ref).abs().max() / ref.abs().max()).item()

                timings = {}
                with torch.no_grad():
                    row["us_fp16"] = time_calls([lambda x=xs[i], w=ws[i % fp_copies]: F.linear(x, w)
                                                 for i in range(fp_copies)], device) * 1e6
                    if "triton" in backends:
                        from gift_quant.kernels.triton import op as triton_op
                        default_prefill = triton_op.PREFILL_PATH
                        for path, gmt in (("gemv", BIG), ("gemm", 0), ("dequant", 0), ("int4pack", 0)):
                            if path == "gemv" and batch > 16:
                                continue  # the GEMV is for decode (<= 16 tokens)
                            if path == "int4pack" and not int4:
                                continue  # aten's int4 kernel: 4 bits, bf16 activations
                            triton_op.PREFILL_PATH = default_prefill if path == "gemv" else path
                            try:
                                row[f"err_triton_{path}"] = err(run("triton", xs[0], base, gmt))
                                timings[f"triton_{path}"] = time_calls(
                                    [lambda x=xs[i], m=layers[i]: run("triton", x, m, gmt) for i in range(copies)],
                                    device)
                            finally:
                                triton_op.PREFILL_PATH = default_prefill
                        auto = "gemv" if batch <= dispatch.GEMV_MAX_TOKENS else default_prefill
                        row["triton_auto_path"] = auto
                    if "cuda" in backends and cuda and meta.get("cuda_build") == "ok":
                        row["err_cuda"] = err(run("cuda", xs[0], base))
                        timings["cuda"] = time_calls([lambda x=xs[i], m=layers[i]: run("cuda", x, m)
                                                      for i in range(copies)], device)
                    if "torch" in backends:
                        row["err_torch"] = err(run("torch", xs[0], base))
                        timings["torch"] = time_calls([lambda x=xs[i], m=layers[i]: run("torch", x, m)
                                                       for i in range(copies)], device)
                for name, t in timings.items():
                    row[f"us_{name}"] = t * 1e6
                io = batch * (K + N) * 2
                row["bytes"] = lay_bytes + io
                row["ideal"] = (fp_w + io) / row["bytes"]
                tri = {k: v for k, v in timings.items() if k.startswith("triton")}
                if tri:
                    best = min(tri, key=tri.get)
                    row["triton_best"] = best.split("_")[1]
                    row["us_triton"] = tri[best] * 1e6
                    row["speedup"] = row["us_fp16"] / row["us_triton"]
                    row["of_ideal"] = row["speedup"] / row["ideal"]
                    if meta["copy_bw_GBs"]:
                        row["GBs"] = row["bytes"] / tri[best] / 1e9
                        row["pct_copy_bw"] = 100 * row["GBs"] / meta["copy_bw_GBs"]
                if "cuda" in timings:
                    row["speedup_cuda"] = row["us_fp16"] / row["us_cuda"]
                rows.append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                      flush=True)
                if batch == 1 and sweep:
                    from gift_quant.kernels.triton import kernel as triton_kernel
                    lays = [dispatch.prepared(m, "triton", dtype) for m in layers]
                    for cfg in sweep:
                        sr = {"K": K, "N": N, "bits": bits, "config": cfg}
                        try:
                            with torch.no_grad():
                                sr["err"] = err(triton_kernel.mixed_linear(xs[0], lays[0], "gemv", cfg))
                                t = time_calls([lambda x=xs[i], lo=lays[i]: triton_kernel.mixed_linear(x, lo, "gemv", cfg)
                                                for i in range(copies)], device)
                            sr["us"] = t * 1e6
                            sr["speedup"] = row["us_fp16"] / sr["us"]
                            if meta["copy_bw_GBs"]:
                                sr["pct_copy_bw"] = 100 * row["bytes"] / t / 1e9 / meta["copy_bw_GBs"]
                        except Exception as e:
                            sr["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                        sweep_rows.append(sr)
                        print(json.dumps(sr), flush=True)
            del layers, base, L, w_ref
            if cuda:
                torch.cuda.empty_cache()
        del ws

    json_path = Path(a.json) if a.json else out / "kernel.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows, "sweep": sweep_rows}, indent=1))
    md = markdown(meta, rows, a, backends)
    if sweep_rows:
        md += ("\nTriton split-K config sweep at batch 1 (each over the default config of "
               "triton_kernel.splitk_config):\n\n| K x N | bits | config | us | speedup vs fp16 | "
               "% copy bw | rel err |\n|---|---|---|---|---|---|---|\n")
        for r in sweep_rows:
            cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
            if "error" in r:
                md += f"| {r['K']}x{r['N']} | {r['bits']} | {cfg} | {r['error']} | | | |\n"
            else:
                md += (f"| {r['K']}x{r['N']} | {r['bits']} | {cfg} | {r['us']:.1f} | {r['speedup']:.2f}x | "
                       f"{_f(r.get('pct_copy_bw'), '.0f')}% | {r['err']:.1e} |\n")
    if a.tuned_out:
        from gift_quant.kernels import tuned
        name, cap = ((torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))) if cuda
                     else ("cpu smoke test", (0, 0)))
        tp = tuned.write(Path(a.tuned_out) / tuned.table_name(name, cap), name, cap, rows,
                         "python tools/bench_kernel.py " + " ".join(meta["argv"]), meta["date"])
        md += f"\nTuned table written: `{tp.name}` (copy it into gift_quant/kernels/tuned_tables/).\n"
    md_path = Path(a.md) if a.md else out / "kernel.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    print(md)


def _f(v, fmt):
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, fmt)


def markdown(meta, rows, a, backends) -> str:
    bw = meta["copy_bw_GBs"]
    lines = [f"Device: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, measured copy bandwidth "
             f"{_f(bw, '.0f')} GB/s (read + write), {meta['date']}. k = {a.salient} FP16 columns, group "
             f"{a.group_size}, {a.dtype}{', act-order' if a.act_order else ''}. CUDA-graph replay over weight "
             f"copies covering {a.l2_factor:g}x L2, median per call. Command: "
             f"`python tools/bench_kernel.py {' '.join(meta['argv'])}`.", ""]
    cols = ["K x N", "bits", "batch", "fp16 us", "triton gemv us", "triton gemm us", "dequant+mm us", "auto path",
            "speedup",
            "ideal", "of ideal", "GB/s", "% copy bw"]
    if "cuda" in backends:
        cols += ["C++ us", "C++ speedup"]
    if "torch" in backends:
        cols += ["torch path us"]
    cols += ["max rel err"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        auto = r.get("triton_auto_path")
        t_auto = r.get(f"us_triton_{auto}") if auto else None
        sp = r["us_fp16"] / t_auto if t_auto else None
        gbs = r["bytes"] / (t_auto * 1e-6) / 1e9 if t_auto else None
        errs = [v for k, v in r.items() if k.startswith("err_")]
        cells = [f"{r['K']}x{r['N']}", str(r["bits"]), str(r["batch"]), _f(r["us_fp16"], ".1f"),
                 _f(r.get("us_triton_gemv"), ".1f"), _f(r.get("us_triton_gemm"), ".1f"),
                 _f(r.get("us_triton_dequant"), ".1f"), auto or "-",
                 _f(sp, ".2f") + ("x" if sp else ""), _f(r["ideal"], ".2f") + "x",
                 _f(sp / r["ideal"] if sp else None, ".2f"), _f(gbs, ".0f"),
                 _f(100 * gbs / bw if gbs and bw else None, ".0f") + ("%" if gbs and bw else "")]
        if "cuda" in backends:
            cells += [_f(r.get("us_cuda"), ".1f"), _f(r.get("speedup_cuda"), ".2f")]
        if "torch" in backends:
            cells += [_f(r.get("us_torch"), ".1f")]
        cells += [_f(max(errs) if errs else None, ".1e")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "speedup, GB/s and % copy bw are for the path `auto` picks at that batch (GEMV up to "
              f"GIFT_QUANT_GEMV_MAX_TOKENS={meta['gemv_max_tokens']} tokens, else GIFT_QUANT_TRITON_PREFILL: "
              "dequant = W^T written once then torch's GEMM, gemm = the tl.dot kernel); ideal = fp16 "
              "bytes / gift bytes (packed base, scales, zeros, FP16 columns, x, y); 'of ideal' = speedup / ideal."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("GIFT_QUANT_KERNEL", "auto")
    main()
