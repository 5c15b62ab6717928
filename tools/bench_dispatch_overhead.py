"""Host-side cost of one MixedPrecisionLinear call, kernel excluded, against a dense ``F.linear``.

The H200 device check (BENCHMARKS.md) measured eager 7B-shaped decode at 0.34-0.50x FP16 although the
Triton GEMV alone is 1.07-1.29x fp16: 130-185 us per Linear went to Python, not to the GPU. This tool
measures that host time. On CPU the Triton launch is replaced by an allocation of the output, so what
remains is module call, backend choice, layout-cache lookup and op dispatch; the last row is the same call after ``prepare_model``
froze the backend, layout and token policy. On CUDA nothing is stubbed:
the layer is small (256x256, a few us of GPU work), so a loop of asynchronous calls measures host time,
and one more row times the bare Triton launch (``triton_kernel.mixed_linear``). It times the same layer
through the torch.library custom op (what torch.compile traces) and through the eager route, in one
run, and prints microseconds per call and ratios.

    python tools/bench_dispatch_overhead.py            # --calls 3000 --md table.md (CUDA when available)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ["GIFT_QUANT_KERNEL"] = "triton"
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported: the self-check runs once

import _common  # noqa: F401  (one clear line when gift_quant is not installed)

from gift_quant.kernels.triton import kernel as triton_kernel
from gift_quant.kernels.triton import op as triton_op
from gift_quant.nn import dispatch
from gift_quant.nn.mixed_linear import MixedPrecisionLinear


def per_call_us(f, calls: int, repeats: int = 5) -> float:
    for _ in range(min(200, calls)):
        f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        if CUDA:
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    dev, dt = ("cuda", torch.float16) if CUDA else ("cpu", torch.float32)
    layer = MixedPrecisionLinear.random(256, 256, 4, 128, 8, bias=True, seed=0).to(dev)
    x = torch.randn(1, 1, 256, device=dev, dtype=dt)
    w = torch.randn(256, 256, device=dev, dtype=dt)
    with torch.no_grad():
        layer(x)  # self-check and layout build, with the real kernel (interpreted on CPU)
        real = triton_kernel.mixed_linear
        L = dispatch.prepared(layer, "triton", x.dtype)
        launch = []
        if CUDA:
            launch = [("bare Triton launch (triton_kernel.mixed_linear, GEMV)",
                       per_call_us(lambda: real(x.view(1, 256), L, "gemv"), a.calls))]
        else:
            triton_kernel.mixed_linear = lambda x2d, L, path="gemv", config=None: torch.empty(
                x2d.shape[0], L.out_features, dtype=x2d.dtype)
        try:
            def via_op():
                return torch.ops.gift_quant.mixed_linear_triton(
                    x, L.qweight, L.perm, L.gchunk, L.scales, L.zeros, L.sal_w, L.sal_idx, L.bias, L.bits,
                    L.in_features, L.out_features, L.identity_rows, 4, "dequant", L.perm_pos, L.tile, L.group_rows)
            rows = [("dense F.linear (256x256, 1 token)", per_call_us(lambda: F.linear(x, w), a.calls)),
                    ("custom op alone (torch.ops.gift_quant.mixed_linear_triton)", per_call_us(via_op, a.calls)),
                    ("eager route alone (triton_op.run)", per_call_us(lambda: triton_op.run(x, L, 4), a.calls)),
                    ("layout-cache lookup (dispatch.prepared)",
                     per_call_us(lambda: dispatch.prepared(layer, "triton", x.dtype), a.calls)),
                    ("backend choice (dispatch.resolve)", per_call_us(lambda: dispatch.resolve(x, layer), a.calls)),
                    ("whole layer(x), eager", per_call_us(lambda: layer(x), a.calls))]
            dispatch.prepare_model(layer, dt, warmup_tokens=(1,))
            rows.append(("whole layer(x), eager, after prepare_model (frozen route)",
                         per_call_us(lambda: layer(x), a.calls)))
            dispatch.unfreeze(layer)
            rows += launch
        finally:
            triton_kernel.mixed_linear = real
    dense = rows[0][1]
    where = (f"{torch.cuda.get_device_name()}, real launches" if CUDA else
             f"{platform.processor() or platform.machine()}, kernel launch stubbed")
    lines = [(f"Host time per call ({where}, 1 thread, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}), "
              f"median of 5 x {a.calls} calls:"),
             "", "| what | us per call | vs dense F.linear |", "|---|---|---|"]
    lines += [f"| {name} | {us:.1f} | {us / dense:.2f}x |" for name, us in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        Path(a.md).write_text(text)


if __name__ == "__main__":
    main()
