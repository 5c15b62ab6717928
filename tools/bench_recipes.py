"""Held-out perplexity of every GIFT-SW recipe and baseline on the bundled model.

Methods: fp, none (GPTQ + FP16 columns, untrained), post (the shipped recipe for this device),
post-qni (post with Gaussian noise at the target bits), post-nonoise, pre, ste, lora. For each bit
width and seed the compressed stage (calibration + GPTQ) is computed once and shared by none / post /
post-nonoise / ste / lora (all start from the very same codes); pre runs its own GPTQ after training.
Every trained method gets the same data, steps, batch, lr and seed.

Writes a markdown table (and a PNG if matplotlib is installed) between
``<!-- bench_recipes:begin -->`` and ``<!-- bench_recipes:end -->`` in BENCHMARKS.md (created at the end
of the file if missing), with the command, machine and date. On CPU keep the budget small, e.g.:

    python tools/bench_recipes.py --bits 2,3 --seeds 0,1 --steps 40 --eval-windows 8
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gift_quant.io.data import eval_windows, load_texts  # noqa: E402
from gift_quant.eval.perplexity import perplexity  # noqa: E402
from gift_quant.io.model_io import load_model  # noqa: E402
from gift_quant.train import load_recipe, run_recipe  # noqa: E402

BEGIN, END = "<!-- bench_recipes:begin -->", "<!-- bench_recipes:end -->"
METHODS = ("fp", "none", "post", "post-qni", "post-nonoise", "pre", "ste", "lora")


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's for this device)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--train-seq-len", type=int, default=None)
    ap.add_argument("--calib-samples", type=int, default=None)
    ap.add_argument("--eval-windows", type=int, default=20, help="512-token windows of the idle text")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--json", default=None, help="also write raw results here")
    ap.add_argument("--from-json", default=None, help="only re-render the section from a --json file of an earlier run")
    ap.add_argument("--budget", default=None, help="with --from-json: the budget line to print")
    ap.add_argument("--command", default=None, help="with --from-json: the command that produced the results")
    a = ap.parse_args(argv)
    if a.from_json:
        write_section(a, json.loads(Path(a.from_json).read_text()), a.budget or "see the command", None)
        return
    bits_list = [int(b) for b in a.bits.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    model0, tok = load_model(None)
    ev = eval_windows(load_texts("idle"), tok, 512, a.eval_windows)
    results = []   # dicts: method, bits, seed, ppl, bpw, trainable, step_s, peak_mb
    t_start = time.time()
    if "fp" in methods:
        results.append({"method": "fp", "bits": 16, "seed": 0, "ppl": perplexity(model0, ev, progress=False),
                        "bpw": 16.0})
        print(f"fp: {results[-1]['ppl']:.3f}", flush=True)
    for bits in bits_list:
        for seed in seeds:
            stage = Path(tempfile.mkdtemp(prefix=f"bench-b{bits}-s{seed}-"))
            try:
                for m in [m for m in methods if m != "fp"]:
                    recipe = {"post-nonoise": "post", "post-qni": "post"}.get(m, m)
                    ov = {"bits": bits, "seed": seed, "steps": a.steps, "batch_size": a.batch_size,
                          "train_seq_len": a.train_seq_len, "calib_samples": a.calib_samples, "save_every": 0}
                    if m == "post-nonoise":
                        ov["noise"] = "none"
                    if m == "post-qni":  # the paper's noise: gaussian, sigma from the target bits
                        ov["noise"] = "gaussian"
                    r = load_recipe(recipe, ov)
                    work = Path(tempfile.mkdtemp(prefix=f"bench-{m}-"))
                    if m != "pre" and (stage / "compressed.json").exists():
                        for f in ("compressed.json", "compressed.safetensors", "saliency.safetensors"):
                            if (stage / f).exists():
                                shutil.copy(stage / f, work / f)
                    t0 = time.time()
                    res = run_recipe(r, copy.deepcopy(model0), tok, work_dir=work, resume=True, progress=False,
                                     eval_windows=ev)
                    s, tr = res.summary, res.train_report
                    if m != "pre" and not (stage / "compressed.json").exists():
                        for f in ("compressed.json", "compressed.safetensors", "saliency.safetensors"):
                            if (work / f).exists():
                                shutil.copy(work / f, stage / f)
                    shutil.rmtree(work, ignore_errors=True)
                    row = {"method": m, "bits": bits, "seed": seed, "ppl": s["perplexity"],
                           "bpw": s.get("bits_per_weight"), "trainable": tr.trainable_params if tr else 0,
                           "step_s": tr.step_seconds if tr else None, "peak_mb": tr.peak_memory_mb if tr else None,
                           "steps": tr.steps_done if tr else 0, "seconds": time.time() - t0}
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    del s, res
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    r0 = load_recipe("post", {"steps": a.steps, "batch_size": a.batch_size, "train_seq_len": a.train_seq_len,
                              "calib_samples": a.calib_samples})
    t, c = r0.train, r0.config
    budget = (f"{t.steps} steps x {t.batch_size} x {t.train_seq_len} tokens (lr {t.lr}, train text "
              f"`{t.train_dataset}`), calibration {c.calib_samples} x {c.seq_len} tokens, "
              f"eval idle {ev.shape[0]} x 512 tokens, seeds {seeds}")
    write_section(a, results, budget, time.time() - t_start)


def _fmt(v, f="{:.2f}"):
    return "-" if v is None else f.format(v)


def table(results) -> str:
    fp = next((r["ppl"] for r in results if r["method"] == "fp"), None)
    groups = {}
    for r in results:
        groups.setdefault((r["bits"], r["method"]), []).append(r)
    untrained = {b: statistics.mean(x["ppl"] for x in rs) for (b, m), rs in groups.items() if m == "none"}
    lines = ["| bits | method | bits/weight | ppl idle (mean ± spread) | / FP | log-gap closed vs none | "
             "trainable params | train s/step | peak MB (CUDA: per run; CPU: process max RSS so far) |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for (b, m), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        ppls = [x["ppl"] for x in rs]
        mean = statistics.mean(ppls)
        spread = (max(ppls) - min(ppls)) / 2 if len(ppls) > 1 else 0.0
        gap = None
        if fp and b in untrained and m not in ("none", "fp") and untrained[b] > fp:
            gap = (math.log(untrained[b]) - math.log(mean)) / (math.log(untrained[b]) - math.log(fp))
        steps = [x.get("step_s") for x in rs if x.get("step_s")]
        mem = [x.get("peak_mb") for x in rs if x.get("peak_mb")]
        lines.append(f"| {b if m != 'fp' else 16} | {m} | {_fmt(rs[0].get('bpw'), '{:.3f}')} | {mean:.2f} ± {spread:.2f} "
                     f"(n={len(ppls)}) | {_fmt(mean / fp if fp else None)} | {_fmt(gap, '{:.0%}')} | "
                     f"{rs[0].get('trainable') or 0:,} | {_fmt(statistics.median(steps) if steps else None)} | "
                     f"{_fmt(max(mem) if mem else None, '{:.0f}')} |")
    return "\n".join(lines)


def plot(results, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        pts = {}
        for r in results:
            if r["method"] == m and r.get("bpw"):
                pts.setdefault(r["bpw"], []).append(r["ppl"])
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [statistics.mean(pts[x]) for x in xs], marker="o", label=m)
    ax.set_xlabel("bits per weight (decoder Linears)")
    ax.set_ylabel("perplexity (idle)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_section(a, results, budget, seconds):
    out = Path(a.out)
    png = out.with_name("bench_recipes.png")
    has_png = plot(results, png)
    cmd = getattr(a, "command", None) or "python tools/bench_recipes.py " + " ".join(sys.argv[1:])
    body = "\n".join([
        BEGIN,
        "### GIFT-SW recipes and baselines (tools/bench_recipes.py)",
        "",
        f"`{cmd}` on {machine()}, {datetime.date.today().isoformat()}"
        + (f", {seconds / 60:.0f} min in all." if seconds else "."),
        f"Budget: {budget}. The GGUF weights are dequantized Q4_1, so 4-bit numbers look better than on a "
        "true FP16 model. 'log-gap closed' = (log ppl(none) - log ppl(method)) / (log ppl(none) - log ppl(FP)).",
        "",
        table(results),
        "",
        f"![ppl vs bits/weight]({png.name})" if has_png else "(matplotlib not installed: no plot)",
        END,
    ])
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        _, post = rest.split(END, 1)
        text = pre + body + post
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
