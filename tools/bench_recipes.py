"""Held-out perplexity of every GIFT-SW recipe and baseline on the bundled model, on two held-out domains.

Methods: fp, none (GPTQ + FP16 columns, untrained), post (the shipped recipe: no noise), post-noise
(post with Gaussian noise, sigma = half each group's stored scale), post-kd (post trained to the float
model's next-token distribution instead of the text's next token), post-norms / post-kd-norms (also train
the normalization weights), pre (noise from the run's own
quantizer, then GPTQ), pre-nonoise, ste, lora (rank matched to GIFT's trainable-parameter count). For
each bit width and seed the compressed stage (calibration + GPTQ) is computed once and shared by none /
post / post-noise / post-kd / ste / lora (all start from the very same codes); pre runs its own GPTQ after
training. Every trained method gets the same budget: data, steps, batch, sequence length, lr, schedule
and seed, given explicitly so the recipes' cpu/gpu sections do not differ between methods.

Evaluated on every domain of ``tools/fetch_domains.py`` (idle, licenses and the general-English austen and
reuters, fetched from Debian packages; a domain that cannot be had is left out with a warning): none is
ever used for calibration or training. Tables give each domain and the geometric mean of the ratios to FP. Writes a markdown table (and a PNG if matplotlib is installed) between
``<!-- bench_recipes:begin -->`` and ``<!-- bench_recipes:end -->`` in BENCHMARKS.md, with the command,
machine and date. ``--json`` is rewritten after every method, so a run cut short keeps what it measured;
``--from-json a.json,b.json`` merges runs done in parallel (one per bit width and seed) into one table.

    python tools/bench_recipes.py --bits 2 --seeds 0 --steps 60 --eval-windows 8 --json /tmp/b2s0.json --no-write
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

from gift_quant.io.data import eval_windows
from gift_quant.eval.perplexity import perplexity
from gift_quant.io.model_io import load_model
from gift_quant.train import load_recipe, run_recipe

from fetch_domains import ALL_DOMAINS as EVAL_DOMAINS
from fetch_domains import domain_texts, geomean

BEGIN, END = "<!-- bench_recipes:begin -->", "<!-- bench_recipes:end -->"
METHODS = ("fp", "none", "post", "post-noise", "post-kd", "post-norms", "post-kd-norms", "post-scales",
           "post-kd-norms-scales", "pre", "pre-nonoise", "ste",
           "lora")
# method -> (recipe, forced settings)
VARIANTS = {"post": ("post", {"noise": "none"}), "post-noise": ("post", {"noise": "gaussian"}),
            "post-kd": ("post", {"noise": "none", "loss": "kd"}),
            "post-norms": ("post", {"noise": "none", "train_norms": True}),
            "post-kd-norms": ("post", {"noise": "none", "loss": "kd", "train_norms": True}),
            "post-scales": ("post", {"noise": "none", "train_scales": True}),
            "post-kd-norms-scales": ("post", {"noise": "none", "loss": "kd", "train_norms": True,
                                              "train_scales": True}),
            "pre": ("pre", {"noise": "gaussian"}), "pre-nonoise": ("pre", {"noise": "none"})}
_STAGE_FILES = ("compressed.json", "compressed.safetensors", "saliency.safetensors")


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def budget_overrides(a) -> dict:
    """The one training budget every method gets (explicit, so no cpu/gpu recipe section differs)."""
    return {"steps": a.steps, "batch_size": a.batch_size, "grad_accum": 1, "train_seq_len": a.train_seq_len,
            "lr": a.lr, "scale_lr": a.scale_lr, "warmup_ratio": 0.03, "schedule": "linear", "calib_samples": a.calib_samples,
            "seq_len": 512, "dataset": a.calib_dataset, "max_train_tokens": a.max_train_tokens, "eval_every": 0,
            "patience": 0,
            "save_every": 0, "train_dataset": a.train_dataset, "weight_decay": 0.0, "method": a.quant_method}


def evaluate(model, evs: dict, device) -> dict:
    model.to(device)
    out = {d: perplexity(model, w, progress=False) for d, w in evs.items()}
    model.to("cpu")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model to compress (default: the bundled SmolLM2)")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--train-seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scale-lr", type=float, default=None, help="lr of the group-scale factors (*-scales methods)")
    ap.add_argument("--max-train-tokens", type=int, default=400_000, help="tokens of training text tokenized")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-dataset", default="bundled", help="calibration text, e.g. bundled, generated, "
                    "bundled+generated (every method gets the same)")
    ap.add_argument("--train-dataset", default="train", help="training text (every trained method gets the same)")
    ap.add_argument("--quant-method", default="gptq", choices=["gptq", "rtn"],
                    help="final quantizer (rtn: a cheap A/B on a slow machine; the table uses gptq)")
    ap.add_argument("--stage-dir", default=None, help="keep the compressed stage (calibration + GPTQ) of each "
                    "bit width and seed here and reuse it in later runs (e.g. one run per lr)")
    ap.add_argument("--domains", default=",".join(EVAL_DOMAINS), help="evaluation domains (tools/fetch_domains.py)")
    ap.add_argument("--eval-windows", type=int, default=20, help="512-token windows of each held-out domain")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--json", default=None, help="also write raw results here (after every method)")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md (parallel shards)")
    ap.add_argument("--from-json", default=None, help="comma-separated --json files of earlier runs: only render")
    ap.add_argument("--budget", default=None, help="with --from-json: the budget line to print")
    ap.add_argument("--command", default=None, help="with --from-json: the command that produced the results")
    ap.add_argument("--machine", default=None, help="with --from-json: the machine the results came from")
    ap.add_argument("--note", default="", help="extra sentence for the section (load, what is missing)")
    ap.add_argument("--dump-texts", default=None, help="write this Python's built-in texts to DIR and exit")
    ap.add_argument("--texts", default=None, help="use built-in texts dumped by --dump-texts (same text on "
                    "another machine, e.g. a GPU host whose Python lacks idlelib)")
    a = ap.parse_args(argv)
    if a.dump_texts:
        dump_texts(Path(a.dump_texts))
        return
    if a.texts:
        use_texts(Path(a.texts))
    if a.from_json:
        results = []
        for f in a.from_json.split(","):
            results += json.loads(Path(f).read_text())
        write_section(a, results, a.budget or "see the command", None)
        return
    bits_list = [int(b) for b in a.bits.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model0, tok = load_model(a.model)
    names = [d for d in a.domains.split(",") if d]
    bad = [d for d in names if d not in EVAL_DOMAINS]
    if bad:
        ap.error(f"unknown domain(s) {', '.join(bad)}; choose from {', '.join(EVAL_DOMAINS)}")
    evs = {d: eval_windows(t, tok, 512, a.eval_windows) for d, t in domain_texts(names).items()}
    results = []   # dicts: method, bits, seed, ppl {domain: ppl}, bpw, trainable, step_s, peak_mb
    t_start = time.time()

    def dump():
        if a.json:
            tmp = Path(a.json + ".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(a.json)
    if "fp" in methods:
        results.append({"method": "fp", "bits": 16, "seed": 0, "ppl": evaluate(model0, evs, device), "bpw": 16.0})
        print(json.dumps(results[-1]), flush=True)
        dump()
    for bits in bits_list:
        for seed in seeds:
            if a.stage_dir:  # kept across runs (an lr sweep); a mismatched config fails its fingerprint check
                stage = Path(a.stage_dir) / f"b{bits}-s{seed}-{a.calib_dataset}-{a.calib_samples}-{a.quant_method}"
                stage.mkdir(parents=True, exist_ok=True)
            else:
                stage = Path(tempfile.mkdtemp(prefix=f"bench-b{bits}-s{seed}-"))
            try:
                for m in [m for m in methods if m != "fp"]:
                    recipe, forced = VARIANTS.get(m, (m, {}))
                    ov = {"bits": bits, "seed": seed, **budget_overrides(a), **forced}
                    r = load_recipe(recipe, ov, device=str(device))
                    work = Path(tempfile.mkdtemp(prefix=f"bench-{m}-"))
                    if recipe != "pre":
                        for f in _STAGE_FILES:
                            if (stage / f).exists():
                                shutil.copy(stage / f, work / f)
                    t0 = time.time()
                    try:
                        res = run_recipe(r, copy.deepcopy(model0), tok, work_dir=work, resume=True, progress=False,
                                         device=device)
                    except Exception as e:  # one failing method must not lose the others' results
                        print(f"{m} bits={bits} seed={seed} FAILED: {type(e).__name__}: {e}", flush=True)
                        results.append({"method": m, "bits": bits, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                        dump()
                        continue
                    if recipe != "pre" and not (stage / "compressed.json").exists():
                        for f in _STAGE_FILES:
                            if (work / f).exists():
                                shutil.copy(work / f, stage / f)
                    shutil.rmtree(work, ignore_errors=True)
                    s, tr = res.summary, res.train_report
                    row = {"method": m, "bits": bits, "seed": seed, "ppl": evaluate(res.model, evs, device),
                           "bpw": s.get("bits_per_weight"), "trainable": tr.trainable_params if tr else 0,
                           "step_s": tr.step_seconds if tr else None, "peak_mb": tr.peak_memory_mb if tr else None,
                           "steps": tr.steps_done if tr else 0, "seconds": time.time() - t0,
                           "final_train_loss": tr.losses[-1] if tr and tr.losses else None}
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    dump()
                    del s, res
            finally:
                if not a.stage_dir:
                    shutil.rmtree(stage, ignore_errors=True)
    dump()
    if not a.no_write:
        write_section(a, results, budget_line(a, seeds, evs), time.time() - t_start)


def dump_texts(d: Path):
    from gift_quant.io import data
    d.mkdir(parents=True, exist_ok=True)
    texts = {"topics-train": data._topics(False), "topics-heldout": data._topics(True),
             "stdlib-docstrings": data.stdlib_docstrings(), **domain_texts(EVAL_DOMAINS)}
    for k, v in texts.items():
        (d / f"{k}.json").write_text(json.dumps(v))


def use_texts(d: Path):
    """Point gift_quant.io.data's built-in sources at the dumped texts."""
    from gift_quant.io import data

    def read(k):
        return json.loads((d / f"{k}.json").read_text())
    data._topics = lambda heldout: read("topics-heldout" if heldout else "topics-train")
    data.stdlib_docstrings = lambda min_chars=200: read("stdlib-docstrings")
    data._idle_docs = lambda: read("idle")
    data._license_texts = lambda: read("licenses")
    import fetch_domains
    fetch_domains.fetch = lambda name, force=False: read(name)


def budget_line(a, seeds, evs=None) -> str:
    n = a.eval_windows if evs is None else min(w.shape[0] for w in evs.values())
    return (f"every trained method {a.steps} steps x {a.batch_size} x {a.train_seq_len} tokens = "
            f"{a.steps * a.batch_size * a.train_seq_len:,} training tokens (lr {a.lr:g}, 3% warm-up then linear "
            f"decay, AdamW, no held-out selection; train text `{getattr(a, 'train_dataset', 'train')}` "
            f"(`train` = pydoc topics split + stdlib docstrings), "
            f"{a.max_train_tokens:,} tokens tokenized), calibration {a.calib_samples} x 512 tokens of "
            f"`{getattr(a, 'calib_dataset', 'bundled')}`, "
            f"eval {n} x 512 tokens of each of {', '.join(evs or EVAL_DOMAINS)}, seeds {seeds}")


def _fmt(v, f="{:.2f}"):
    return "-" if v is None else f.format(v)


def _ppl(r, d):
    p = r.get("ppl")
    return p.get(d) if isinstance(p, dict) else (p if d == EVAL_DOMAINS[0] else None)


def table(results) -> str:
    ok = [r for r in results if "error" not in r]
    domains = [d for d in EVAL_DOMAINS if any(_ppl(r, d) for r in ok)]
    fp = {d: next((_ppl(r, d) for r in ok if r["method"] == "fp"), None) for d in domains}
    groups = {}
    for r in ok:
        groups.setdefault((r["bits"], r["method"]), []).append(r)
    untrained = {(b, d): statistics.mean(_ppl(x, d) for x in rs) for (b, m), rs in groups.items() if m == "none"
                 for d in domains}
    head = "| bits | method | bits/weight | " + " | ".join(
        f"ppl {d} (mean ± half-spread, n) | {d} / FP | {d} log-gap closed" for d in domains) + \
        " | geomean / FP | trainable params | train s/step | final train loss |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = {m: i for i, m in enumerate(METHODS)}
    for (b, m), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        cells, ratios = [], []
        for d in domains:
            ppls = [_ppl(x, d) for x in rs]
            mean = statistics.mean(ppls)
            spread = (max(ppls) - min(ppls)) / 2 if len(ppls) > 1 else 0.0
            gap = None
            u = untrained.get((b, d))
            if fp[d] and u and m not in ("none", "fp") and u > fp[d]:
                gap = (math.log(u) - math.log(mean)) / (math.log(u) - math.log(fp[d]))
            if fp[d]:
                ratios.append(mean / fp[d])
            cells += [f"{mean:.2f} ± {spread:.2f} ({len(ppls)})", _fmt(mean / fp[d] if fp[d] else None),
                      _fmt(gap, "{:.0%}")]
        steps = [x.get("step_s") for x in rs if x.get("step_s")]
        losses = [x.get("final_train_loss") for x in rs if x.get("final_train_loss")]
        gm = geomean(ratios) if len(ratios) == len(domains) else None
        lines.append(f"| {b} | {m} | {_fmt(rs[0].get('bpw'), '{:.3f}')} | " + " | ".join(cells) +
                     f" | {_fmt(gm, '{:.3f}')} | {rs[0].get('trainable') or 0:,} | {_fmt(statistics.median(steps) if steps else None)} | "
                     f"{_fmt(statistics.mean(losses) if losses else None, '{:.3f}')} |")
    errs = [r for r in results if "error" in r]
    for r in errs:
        lines.append(f"\n{r['method']} at {r['bits']} bits, seed {r['seed']} failed: {r['error']}")
    return "\n".join(lines)


def plot(results, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in results if "error" not in r]
    domains = [d for d in EVAL_DOMAINS if any(_ppl(r, d) for r in ok)]
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4), squeeze=False)
    for ax, d in zip(axes[0], domains):
        fp = next((_ppl(r, d) for r in ok if r["method"] == "fp"), None)
        for m in METHODS[1:]:
            pts = {}
            for r in ok:
                if r["method"] == m:
                    pts.setdefault(r["bits"], []).append(_ppl(r, d))
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [statistics.mean(pts[x]) / fp if fp else statistics.mean(pts[x]) for x in xs],
                        marker="o", label=m)
        ax.set_xlabel("bits (codes; + FP16 columns)")
        ax.set_ylabel("perplexity / FP" if fp else "perplexity")
        ax.set_title(f"held-out: {d}")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["bits"] for r in ok if r["method"] != "fp"}))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
        f"`{cmd}` on {getattr(a, 'machine', None) or machine()}, {datetime.date.today().isoformat()}"
        + (f", {seconds / 60:.0f} min in all." if seconds else "."),
        f"Budget: {budget}. {getattr(a, 'note', '') or ''}",
        "The GGUF weights are dequantized Q4_1, so 4-bit numbers look better than on a true FP16 model. "
        "'log-gap closed' = (log ppl(none) - log ppl(method)) / (log ppl(none) - log ppl(FP)), per domain.",
        "",
        table(results),
        "",
        f"![ppl / FP vs bits]({png.name})" if has_png else "(matplotlib not installed: no plot)",
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
