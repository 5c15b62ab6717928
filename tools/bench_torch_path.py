"""CPU cost of gift's PyTorch path (dequantize per call, then a matmul) against a dense F.linear.

    OMP_NUM_THREADS=1 python tools/bench_torch_path.py --md torch_path.md

Times, per (shape, bits, batch), the best of ``--repeats`` calls of
- ``dense``: F.linear with a dense weight of the same shape (what an uncompressed model does);
- ``old``: the previous path (``MixedPrecisionLinear.dequantize``: unpack through int64, gathers, column
  write, F.linear), kept here as the baseline;
- ``new``: the current PyTorch backend (``GIFT_QUANT_KERNEL=torch``: uint8/int32 unpacking, FP16 columns
  as a second small matmul);
- ``cached``: the same with ``GIFT_QUANT_TORCH_CACHE=1`` (dequantized base kept per layer: dense memory).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from _common import ints

from gift_quant.io.atomic import write_text
from gift_quant.nn import dispatch
from gift_quant.nn.mixed_linear import MixedPrecisionLinear


def med(f, repeats):
    """Best of ``repeats`` calls (on a shared machine the minimum is the least disturbed sample)."""
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2048x2048,2048x5504")
    ap.add_argument("--bits", type=ints, default=[4, 3, 2])
    ap.add_argument("--batches", type=ints, default=[1, 16])
    ap.add_argument("--salient", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--md")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    rows = []
    with torch.no_grad():
        for shape in a.shapes.split(","):
            K, N = (int(v) for v in shape.lower().split("x"))
            w = torch.randn(N, K, dtype=dtype) * 0.02
            for bits in a.bits:
                layer = MixedPrecisionLinear.random(K, N, bits, 128, a.salient, dtype=dtype, seed=bits)
                for batch in a.batches:
                    x = torch.randn(batch, K, dtype=dtype)

                    def old():
                        wq = layer.dequantize(dtype)
                        return F.linear(x, wq)

                    def new():
                        return dispatch.torch_forward(x, layer)

                    def cached():
                        os.environ["GIFT_QUANT_TORCH_CACHE"] = "1"
                        try:
                            return dispatch.torch_forward(x, layer)
                        finally:
                            os.environ["GIFT_QUANT_TORCH_CACHE"] = "0"

                    err = ((new().double() - old().double()).abs().max() / old().double().abs().max()).item()
                    r = {"K": K, "N": N, "bits": bits, "batch": batch, "ms_dense": med(lambda: F.linear(x, w), a.repeats) * 1e3,
                         "ms_old": med(old, a.repeats) * 1e3, "ms_new": med(new, a.repeats) * 1e3,
                         "ms_cached": med(cached, a.repeats) * 1e3, "rel_diff": err}
                    r["old_over_dense"] = r["ms_old"] / r["ms_dense"]
                    r["new_over_dense"] = r["ms_new"] / r["ms_dense"]
                    r["cached_over_dense"] = r["ms_cached"] / r["ms_dense"]
                    rows.append(r)
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dtype": a.dtype,
            "argv": sys.argv[1:] if argv is None else argv}
    md = [f"CPU {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}, {a.dtype}, k = {a.salient}, "
          f"group 128, {meta['date']}. Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} "
          f"python tools/bench_torch_path.py {' '.join(meta['argv'])}`. Best of {a.repeats} calls.", "",
          "| K x N | bits | batch | dense F.linear ms | old path ms | new path ms | cached ms | old / dense | "
          "new / dense | cached / dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['K']}x{r['N']} | {r['bits']} | {r['batch']} | {r['ms_dense']:.2f} | {r['ms_old']:.2f} | "
                  f"{r['ms_new']:.2f} | {r['ms_cached']:.2f} | {r['old_over_dense']:.1f}x | {r['new_over_dense']:.1f}x | "
                  f"{r['cached_over_dense']:.2f}x |")
    text = "\n".join(md) + "\n"
    print(text)
    if a.md:
        write_text(a.md, text)
    if a.json:
        write_text(a.json, json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
