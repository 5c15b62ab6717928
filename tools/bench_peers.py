#!/usr/bin/env python3
"""The peers side by side with gift-quant: held-out perplexity against bits per weight on every
evaluation domain of tools/fetch_domains.py, for HQQ, GPTQ (GPTQModel) and AutoRound on the bundled
SmolLM2-135M.

Each peer runs in its own venv (their torch pins clash: GPTQModel 7.7 needs torch >= 2.14.1), as a
worker process of this script (``--worker``). ``--setup`` creates the venvs under ``--venv-root``:

    hqq        python3 -m venv --system-site-packages hqq && hqq/bin/pip install -c PIN hqq==0.2.8
    autoround  python3 -m venv --system-site-packages autoround && autoround/bin/pip install -c PIN auto-round==0.16.1
    gptqmodel  python3 -m venv gptqmodel && gptqmodel/bin/pip install torch==2.14.1 gptqmodel==7.7.0

(PIN holds ``torch==2.13.0``, the project's torch.) The prepare step (this Python, with gift-quant)
writes the dequantized GGUF model as an HF folder, the calibration windows gift's recipes use
(``bundled``, N x 512 tokens, seed 0) and the evaluation windows, so every method sees the very same
tokens. Perplexity is gift's formula: exp(mean next-token NLL) over every predicted token.

Bits per weight, counted one way for every method over the decoder Linears (embeddings and lm_head
stay float everywhere): b bits per code (ideal packing), 16 per fp16 scale, the zero point as stored
(16 for HQQ's fp16 zeros, b for the integer zeros of GPTQ / AutoRound), 32 per input column for an
act-order permutation (g_idx), and for gift the FP16 columns (16 x out per column) and their indices
(gift's rows take gift's own count of its stored tensors, which is this formula with b-bit zeros and g_idx).

    python tools/bench_peers.py --setup
    python tools/bench_peers.py --peers hqq,gptq,autoround --bits 2,3,4 --gift-json b2.json,b34.json
    python tools/bench_peers.py --render          # table + plot from the JSON of earlier runs
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "cpu-2026-12-04-peers"
WORK = Path(os.environ.get("GIFT_QUANT_PEERS_WORK", ROOT / ".peers"))  # git-ignored: HF model copy, token windows
VENVS = Path(os.environ.get("GIFT_QUANT_VENVS", "/work/venvs"))
PEER_VENV = {"hqq": "hqq", "gptq": "gptqmodel", "autoround": "autoround"}
SETUP = {
    "hqq": (["--system-site-packages"], ["-c", "{pin}", "hqq==0.2.8"]),
    "autoround": (["--system-site-packages"], ["-c", "{pin}", "auto-round==0.16.1"]),
    "gptqmodel": ([], ["torch==2.14.1", "gptqmodel==7.7.0"]),
}


# ---- bits per weight, one formula -------------------------------------------------------------------
def bits_per_weight(shapes, bits: int, group: int, zero_bits: int, g_idx: bool = False, k_of=None) -> float:
    """Stored bits / weights over Linears of ``shapes`` [(out, in)]; ``k_of(in)`` FP16 columns (gift,
    whose packed format keeps codes for every column, the salient ones included)."""
    stored = weights = 0
    for out, inp in shapes:
        k = k_of(inp) if k_of else 0
        groups = math.ceil(inp / group)
        stored += out * inp * bits + out * groups * (16 + zero_bits)
        stored += 32 * inp if g_idx else 0
        stored += 16 * out * k + 32 * k
        weights += out * inp
    return stored / weights


def linear_shapes(model):
    import torch
    return [tuple(m.weight.shape) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]


def perplexity(model, windows, batch_size: int = 4) -> float:
    """Same formula as gift_quant.eval.perplexity (kept here: the workers run without gift-quant)."""
    import torch
    import torch.nn.functional as F
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i:i + batch_size]
            logits = model(ids, use_cache=False).logits.float()
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


# ---- the peers (run inside their venvs) --------------------------------------------------------------
def _load_hf(work: Path):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()


def run_hqq(work, prep, bits, group, **_):
    import torch
    from hqq.core.quantize import Quantizer
    model = _load_hf(work)
    t = time.time()
    for _, m in model.model.layers.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.data.float()
            wq, meta = Quantizer.quantize(w, nbits=bits, group_size=group, optimize=True, axis=1, bitpack=False,
                                          compute_dtype=torch.float32, device="cpu")
            m.weight.data = Quantizer.dequantize(wq, meta).reshape(w.shape).to(m.weight.dtype)
    secs = time.time() - t
    return model, secs, {"bpw": bits_per_weight(linear_shapes(model), bits, group, zero_bits=16),
                         "settings": f"HQQ {bits}-bit, group {group}, axis 1, fp16 scale and zero, optimize=True"}


def run_autoround(work, prep, bits, group, iters, **_):
    import torch
    from auto_round import AutoRound
    model = _load_hf(work)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(work / "model")
    calib = prep["calib"]
    batches = [calib[i:i + 8] for i in range(0, calib.shape[0], 8)]
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    t = time.time()
    ar = AutoRound(model, tok, bits=bits, group_size=group, sym=False, dataset=batches, nsamples=calib.shape[0],
                   seqlen=calib.shape[1], batch_size=8, iters=iters, device_map="cpu", seed=0)
    ar.quantize()
    secs = time.time() - t
    qm = ar.model
    w = qm.model.layers[0].self_attn.q_proj.weight.detach()
    if torch.equal(w, before):
        raise RuntimeError("AutoRound left the weights untouched (not fake-quantized in place)")
    return qm, secs, {"bpw": bits_per_weight(linear_shapes(qm), bits, group, zero_bits=bits),
                      "settings": f"AutoRound W{bits}A16, group {group}, asym, {iters} iterations, "
                                  f"{calib.shape[0]} x {calib.shape[1]} calibration tokens, batch 8"}


def run_gptq(work, prep, bits, group, **_):
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its default (1 on 2 cores) fails to load
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    cfg = QuantizeConfig(bits=bits, group_size=group, sym=False, desc_act=True, device="cpu")
    model = GPTQModel.load(str(work / "model"), cfg, dtype=torch.float32)
    calib = [{"input_ids": r.tolist(), "attention_mask": [1] * r.numel()} for r in prep["calib"]]
    shapes = linear_shapes(model.model)
    t = time.time()
    model.quantize(calib, batch_size=4)
    secs = time.time() - t
    qdir = work / f"gptq-b{bits}-g{group}"
    model.save(str(qdir))
    del model
    qm = GPTQModel.load(str(qdir), device="cpu", dtype=torch.float16).model  # its CPU kernel: fp16/bf16 only
    _dequantized_to_float(qm)
    return qm.eval(), secs, {"bpw": bits_per_weight(shapes, bits, group, zero_bits=bits, g_idx=True),
                                   "settings": f"GPTQModel GPTQ {bits}-bit, group {group}, asym, act-order, "
                                               f"{len(calib)} x {prep['calib'].shape[1]} calibration tokens"}


def _dequantized_to_float(model):
    """Swap GPTQModel's packed modules for float32 Linears holding the very weights they decode to, so
    every method is evaluated in float32 (its CPU kernel runs only fp16/bf16)."""
    import torch
    for name, m in list(model.named_modules()):
        if hasattr(m, "qweight") and hasattr(m, "dequantize_weight"):
            w = m.dequantize_weight().float()  # [in, out]
            lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None)
            lin.weight.data = w.t().contiguous()
            if m.bias is not None:
                lin.bias.data = m.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    model.float()


def run_fp(work, prep, **_):
    model = _load_hf(work)
    return model, 0.0, {"bpw": 16.0, "settings": "the dequantized Q4_1 GGUF in float32"}


RUNNERS = {"fp": run_fp, "hqq": run_hqq, "gptq": run_gptq, "autoround": run_autoround}


def worker(a):
    import torch
    torch.manual_seed(0)
    prep = torch.load(WORK / "prep.pt")
    model, secs, info = RUNNERS[a.worker](WORK, prep, bits=a.bits_one, group=a.group, iters=a.iters)
    t = time.time()
    ppl = {d: perplexity(model, w) for d, w in prep["eval"].items()}
    row = {"method": a.worker, "bits": a.bits_one, "group": a.group, "quant_seconds": round(secs, 1),
           "eval_seconds": round(time.time() - t, 1), "ppl": ppl, **info}
    if a.worker == "autoround":
        row["iters"] = a.iters
    Path(a.out).write_text(json.dumps(row))
    print(json.dumps(row), flush=True)


# ---- prepare, run, render (this Python, with gift-quant) ----------------------------------------------
def prepare(calib_samples: int, eval_windows_n: int):
    import torch
    from fetch_domains import domain_texts

    from gift_quant.compress.calibration import calibration_tensor
    from gift_quant.config import GiftConfig
    from gift_quant.io.data import eval_windows
    from gift_quant.io.model_io import load_model
    model, tok = load_model(None)
    WORK.mkdir(exist_ok=True)
    if not (WORK / "model" / "config.json").exists():
        model.to(torch.float32).save_pretrained(WORK / "model")
        tok.save_pretrained(WORK / "model")
    calib = calibration_tensor("bundled", tok, GiftConfig(calib_samples=calib_samples, seq_len=512, seed=0),
                               progress=False)
    evs = {d: eval_windows(t, tok, 512, eval_windows_n) for d, t in domain_texts().items()}
    torch.save({"calib": calib, "eval": evs}, WORK / "prep.pt")
    print(f"prepared: calibration {tuple(calib.shape)}, eval {', '.join(f'{d} {tuple(w.shape)}' for d, w in evs.items())}")


def setup(root: Path):
    pin = root / "torch-pin.txt"
    root.mkdir(parents=True, exist_ok=True)
    pin.write_text("torch==2.13.0\n")
    for name, (venv_args, pip_args) in SETUP.items():
        d = root / name
        if not (d / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", *venv_args, str(d)], check=True)
        subprocess.run([str(d / "bin" / "pip"), "install", *[x.format(pin=pin) for x in pip_args]], check=True)


def run_one(peer: str, bits: int, group: int, iters: int, timeout: int) -> dict | None:
    py = VENVS / PEER_VENV.get(peer, "hqq") / "bin" / "python"
    if not py.exists():
        print(f"warning: {peer} skipped: no venv at {py.parent.parent} (run --setup)", file=sys.stderr)
        return None
    tag = f"{peer}-b{bits}-g{group}" + (f"-i{iters}" if peer == "autoround" else "")
    out = OUT / f"{tag}.json"
    log = ROOT / "logs" / f"peers-{tag}.log"
    log.parent.mkdir(exist_ok=True)
    cmd = [str(py), str(Path(__file__).resolve()), "--worker", peer, "--bits-one", str(bits), "--group", str(group),
           "--iters", str(iters), "--out", str(out)]
    t = time.time()
    with open(log, "w") as f:
        try:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False,
                               env={**os.environ, "PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false"})
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0 or not out.exists():
        print(f"warning: {tag} failed ({rc}) after {time.time() - t:.0f}s; see {log}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def gift_rows(files) -> list[dict]:
    """bench_recipes.py --json rows -> this script's rows (bits per weight from gift's own report)."""
    rows = []
    for f in files:
        for r in json.loads(Path(f).read_text()):
            if "error" in r or r["method"] == "fp":
                continue
            name = {"none": "gift none (GPTQ + FP16 cols)", "post": "gift post"}.get(r["method"], "gift " + r["method"])
            rows.append({"method": name, "bits": r["bits"], "group": 128, "bpw": r["bpw"], "ppl": r["ppl"],
                         "quant_seconds": round(r.get("seconds") or 0, 1), "settings": "bench_recipes.py"})
    return rows


def load_rows() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json")) if p.name not in ("peers.json",)
            and not p.name.startswith("gift-")]


def render(rows: list[dict], note: str = "") -> str:
    from fetch_domains import geomean
    fp = next((r for r in rows if r["method"] == "fp"), None)
    if fp is None:
        raise SystemExit("error: no fp row (run --peers fp first)")
    domains = list(fp["ppl"])
    head = ("| method | bits | group | bits/weight | " + " | ".join(f"{d} ppl (/ FP)" for d in domains) +
            " | geomean / FP | run s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1),
             "| FP | 16 | - | 16 | " + " | ".join(f"{fp['ppl'][d]:.2f}" for d in domains) + " | 1.000 | - |"]
    for r in sorted((r for r in rows if r is not fp), key=lambda r: (r["bits"], r["bpw"], r["method"])):
        if not all(d in r["ppl"] for d in domains):
            continue
        ratios = [r["ppl"][d] / fp["ppl"][d] for d in domains]
        r["geomean"] = geomean(ratios)
        name = DISPLAY.get(r["method"], r["method"]) + (f" ({r['iters']} it)" if r.get("iters") else "")
        lines.append(f"| {name} | {r['bits']} | {r['group']} | {r['bpw']:.3f} | " +
                     " | ".join(f"{r['ppl'][d]:.2f} ({x:.2f}x)" for d, x in zip(domains, ratios)) +
                     f" | {r['geomean']:.3f} | {r.get('quant_seconds', 0):.0f} |")
    plot(rows, fp, domains)
    return "\n".join(lines) + ("\n\n" + note if note else "")


YMAX = 30.0   # the plot's top, in ratio to FP
DISPLAY = {"hqq": "HQQ", "gptq": "GPTQModel (GPTQ)", "autoround": "AutoRound"}


def pareto(points):
    best, out = float("inf"), []
    for x, y in sorted(points):
        if y < best:
            best = y
            out.append((x, y))
    return out


def plot(rows, fp, domains):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib not installed: no plot", file=sys.stderr)
        return
    panels = [*domains, "geomean"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    def family(r):
        return DISPLAY.get(r["method"], r["method"]) + (f" g{r['group']}" if r["method"] == "hqq" else "")
    families = sorted({family(r) for r in rows if r is not fp and r["method"] != "fp"})
    for ax, d in zip(axes[0], panels):
        for fam in families:
            pts = []
            for r in rows:
                if family(r) != fam or not all(x in r["ppl"] for x in domains):
                    continue
                y = r["geomean"] if d == "geomean" else r["ppl"][d] / fp["ppl"][d]
                pts.append((r["bpw"], y))
            if pts:
                xs, ys = zip(*sorted(pts))
                line = ax.plot(xs, ys, "o", alpha=0.5)[0]
                fx, fy = zip(*pareto(pts))
                ax.plot(fx, fy, "-", color=line.get_color(), label=fam)
        ax.set_title(f"{d}" + (" of ratios" if d == "geomean" else " (held out)"))
        ax.set_xlabel("bits per weight (decoder Linears)")
        ax.set_ylabel("perplexity / FP")
        ax.set_yscale("log")
        ax.set_ylim(0.9, YMAX)  # a collapsed run (thousands x FP) would flatten the rest; see the table
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "peers.png", dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="fp,hqq,gptq,autoround")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--hqq-groups", default="64,128")
    ap.add_argument("--iters", type=int, default=200, help="AutoRound iterations (its default: 200)")
    ap.add_argument("--calib-samples", type=int, default=32, help="512-token calibration windows (gift's recipe)")
    ap.add_argument("--eval-windows", type=int, default=10, help="512-token windows of each domain")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per peer run")
    ap.add_argument("--gift-json", default="", help="bench_recipes.py --json files to put beside the peers")
    ap.add_argument("--render", action="store_true", help="only render the table and plot from saved JSON")
    ap.add_argument("--setup", action="store_true", help="create the peers' venvs under GIFT_QUANT_VENVS")
    ap.add_argument("--note", default="")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bits-one", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--group", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.setup:
        return setup(VENVS)
    peers = [p for p in a.peers.split(",") if p]
    bad = [p for p in peers if p not in RUNNERS]
    if bad:
        print(f"error: unknown peer(s) {', '.join(bad)}; choose from {', '.join(RUNNERS)}", file=sys.stderr)
        return 2
    try:
        bits = [int(b) for b in a.bits.split(",")]
        groups = [int(g) for g in a.hqq_groups.split(",")]
    except ValueError:
        print("error: --bits and --hqq-groups take comma-separated integers", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    if not a.render:
        if not (WORK / "prep.pt").exists():
            prepare(a.calib_samples, a.eval_windows)
        for p in peers:
            for b in ([16] if p == "fp" else bits):
                for g in (groups if p == "hqq" else [128]):
                    r = run_one(p, b, g, a.iters, a.timeout)
                    if r:
                        print(json.dumps(r), flush=True)
    rows = load_rows() + gift_rows([f for f in a.gift_json.split(",") if f])
    table = render(rows, a.note)
    (OUT / "peers.json").write_text(json.dumps(rows, indent=1))
    md = (f"Peers on the bundled SmolLM2-135M, {datetime.date.today().isoformat()}\n\n" + table +
          "\n\n![perplexity / FP against bits per weight](peers.png)\n")
    (OUT / "peers.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
