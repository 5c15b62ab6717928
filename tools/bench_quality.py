#!/usr/bin/env python3
"""Quality benchmark on the bundled SmolLM2-135M: held-out perplexity of FP, RTN, GPTQ (k=0) and
GPTQ + FP16 salient columns at 2/3/4 bits, with compression time and bits per weight.

Writes a markdown table between <!-- bench_quality:begin --> / <!-- bench_quality:end --> in
BENCHMARKS.md (and prints it). Calibration: the bundled text; evaluation: every domain of
tools/fetch_domains.py (idle, licenses and the general-English austen and reuters), text the project
never calibrates or trains on, each reported with the geometric mean of the ratios to FP.

    python tools/bench_quality.py --bits 2,3,4 [--calib-samples 64] [--eval-windows 20] [--sweep]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from gift_quant.config import GiftConfig
from gift_quant.io.data import calibration_samples, eval_windows, load_texts
from gift_quant.eval.perplexity import perplexity
from gift_quant.io.model_io import load_model
from gift_quant.compress.pipeline import compress_model

from fetch_domains import domain_texts, geomean


def write_section(name: str, body: str, path: Path = ROOT / "BENCHMARKS.md"):
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also sweep the salient ratio at the lowest bits")
    ap.add_argument("--ab-true-sequential", action="store_true",
                    help="only GPTQ + FP16 cols, with true-sequential staging off and on (own BENCHMARKS section)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", default=None, help="also dump raw rows to this file")
    a = ap.parse_args()
    bits_list = [int(b) for b in a.bits.split(",")]
    torch.manual_seed(0)
    model, tok = load_model(None)
    calib = calibration_samples(load_texts("bundled"), tok, a.calib_samples, a.seq_len, seed=0)
    evs = {d: eval_windows(t, tok, 512, a.eval_windows) for d, t in domain_texts().items()}
    t = time.time()
    fp = {d: perplexity(model, w, progress=False) for d, w in evs.items()}
    rows = [dict(method="FP (dequantized Q4_1 GGUF)", bits=16, k="-", ppl=fp, seconds=0.0, bpw=32.0)]
    print(f"FP ppl {fp} ({time.time() - t:.0f}s)", flush=True)
    configs = []
    for b in bits_list:
        if a.ab_true_sequential:
            configs += [("GPTQ + FP16 cols", dict(bits=b, true_sequential=False)),
                        ("GPTQ + FP16 cols, true-sequential", dict(bits=b, true_sequential=True))]
            continue
        configs += [("RTN + FP16 cols", dict(bits=b, method="rtn")),
                    ("GPTQ (k=0)", dict(bits=b, n_salient=0)),
                    ("GPTQ + FP16 cols", dict(bits=b))]
    if a.sweep:
        b = min(bits_list)
        for r in (1 / 64, 1 / 16):
            configs.append((f"GPTQ + FP16 cols, ratio 1/{round(1 / r)}", dict(bits=b, salient_ratio=r)))
    for name, kw in configs:
        cfg = GiftConfig(calib_samples=a.calib_samples, seq_len=a.seq_len, **kw)
        m = copy.deepcopy(model)
        rep = compress_model(m, calib, cfg, progress=False)
        ppl = {d: perplexity(m, w, progress=False) for d, w in evs.items()}
        k = sorted({x.k for x in rep.modules})
        rows.append(dict(method=name, bits=cfg.bits, k="/".join(map(str, k)), ppl=ppl,
                         seconds=rep.seconds, bpw=rep.bits_per_weight))
        print(json.dumps(rows[-1]), flush=True)
        del m
    date = datetime.date.today().isoformat()
    cpu = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    title = "True-sequential staging A/B" if a.ab_true_sequential else "Quality"
    lines = [f"### {title}: held-out perplexity, bundled SmolLM2-135M-Instruct ({date}, {cpu})", "",
             f"Command: `python tools/bench_quality.py --bits {a.bits} --calib-samples {a.calib_samples} "
             f"--eval-windows {a.eval_windows}{' --sweep' if a.sweep else ''}"
             f"{' --ab-true-sequential' if a.ab_true_sequential else ''}`", "",
             f"Calibration: bundled text, {a.calib_samples} x {a.seq_len} tokens, seed 0. Evaluation: "
             f"{', '.join(f'`{d}` ({w.shape[0]} x 512 tokens)' for d, w in evs.items())}, none ever used for "
             "calibration or training (tools/fetch_domains.py). "
             "Group size 128, asym, act-order, MSE clip. k = FP16 columns per Linear (default: "
             "min(128, in/32), i.e. 18 for 576-wide and 48 for 1536-wide inputs). Bits/weight counts every "
             "stored tensor of the decoder Linears (codes, scales, zeros, g_idx, FP16 columns, indices). "
             "The model ships as Q4_1 GGUF, so the FP reference is already 4-bit-rounded: 4-bit results look "
             "better than they would on a true FP16 model. Times are wall-clock on a shared 2-core machine.", "",
             "| method | bits | k | " + " | ".join(f"{d} ppl (/ FP)" for d in evs) +
             " | geomean / FP | compress s | bits/weight |",
             "|---|---|---|" + "---|" * len(evs) + "---|---|---|"]
    for r in rows:
        ratios = {d: r["ppl"][d] / fp[d] for d in evs}
        lines.append(f"| {r['method']} | {r['bits']} | {r['k']} | " +
                     " | ".join(f"{r['ppl'][d]:.2f} ({ratios[d]:.3f})" for d in evs) +
                     f" | {geomean(ratios.values()):.3f} | {r['seconds']:.0f} | {r['bpw']:.2f} |")
    body = "\n".join(lines)
    print(body)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    if not a.no_write:
        write_section("bench_true_sequential" if a.ab_true_sequential else "bench_quality", body)


if __name__ == "__main__":
    main()
