#!/usr/bin/env python3
"""Head-to-head with GPTQModel: quantize the bundled SmolLM2-135M with GPTQModel's GPTQ and with
gift-quant at k = 0 (plain GPTQ), same calibration windows, bits, group size 128, act-order, asym,
damping 0.01, no clip search; held-out perplexity and quantization wall time side by side.

Both checkpoints are evaluated through the same code: the GPTQModel checkpoint is imported with
``gift_quant.integrations.gptq.import_gptq`` (bit-exact; tests/integrations/test_gptq_interop.py checks the logits against
GPTQModel's own TorchLinear) and run through ``gift_quant.eval.perplexity`` in fp32.

    pip install --no-deps gptqmodel==7.7.0 optimum pypcre logbar device-smi tokenicer defuser pillow threadpoolctl
    GPTQMODEL_CPU_WORKERS=2 python tools/bench_vs_gptqmodel.py --bits 2,3,4

Writes a table between <!-- bench_vs_gptqmodel:begin --> / <!-- bench_vs_gptqmodel:end --> in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel 7.7 refuses 1-worker pools on 2-core machines

import torch  # noqa: E402
from _common import ints  # noqa: E402

from gift_quant.compress.pipeline import compress_model  # noqa: E402
from gift_quant.config import GiftConfig  # noqa: E402
from gift_quant.eval.perplexity import perplexity  # noqa: E402
from gift_quant.io.data import calibration_samples, eval_windows, load_texts  # noqa: E402
from gift_quant.io.model_io import load_model  # noqa: E402


def run_gptqmodel(fp_dir: Path, out_dir: Path, calib: torch.Tensor, bits: int, group_size: int, damp: float,
                  mse: bool, batch_size: int, true_sequential: bool = True) -> float:
    from gptqmodel import GPTQModel, QuantizeConfig
    qc = QuantizeConfig(bits=bits, group_size=group_size, desc_act=True, sym=False, damp_percent=damp,
                        mse=2.4 if mse else 0.0, fallback=None, true_sequential=true_sequential)
    m = GPTQModel.load(str(fp_dir), qc, device="cpu", dtype=torch.float32)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    t = time.time()
    m.quantize(data, batch_size=batch_size)
    seconds = time.time() - t
    m.save(str(out_dir))
    del m
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled SmolLM2-135M GGUF)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--mse", action="store_true", help="clip search on both sides (GPTQModel mse=2.4, gift mse_clip)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-true-sequential", action="store_true",
                    help="GPTQModel without true_sequential (every Linear of a layer calibrated on the float "
                         "layer's inputs, as gift's pipeline does); diagnostic, with --gptqmodel-only")
    ap.add_argument("--gptqmodel-only", action="store_true", help="skip the gift runs (diagnostics)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    try:
        bits_list = ints(a.bits)
    except ValueError:
        ap.error("--bits takes comma-separated integers")
    import gptqmodel
    from transformers import AutoModelForCausalLM

    from gift_quant.integrations.gptq.convert import import_gptq

    torch.manual_seed(0)
    model, tok = load_model(a.model)
    calib = calibration_samples(load_texts("bundled"), tok, a.calib_samples, a.seq_len, seed=0)
    ev = eval_windows(load_texts("idle"), tok, 512, a.eval_windows)
    fp = perplexity(model, ev, progress=False)
    print(f"FP ppl {fp:.3f}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_vs_gptqmodel_"))
    fp_dir = work / "fp"
    model.save_pretrained(fp_dir)
    tok.save_pretrained(fp_dir)
    rows = []
    for b in bits_list:
        gdir, idir = work / f"gptqmodel_{b}", work / f"imported_{b}"
        g_sec = run_gptqmodel(fp_dir, gdir, calib, b, a.group_size, a.damp, a.mse, a.batch_size,
                              true_sequential=not a.no_true_sequential)
        summary = import_gptq(gdir, idir)
        gm = AutoModelForCausalLM.from_pretrained(idir, dtype=torch.float32).eval()
        g_ppl = perplexity(gm, ev, progress=False)
        del gm
        if a.gptqmodel_only:
            print(json.dumps(dict(bits=b, gptqmodel_ppl=g_ppl, gptqmodel_s=g_sec,
                                  true_sequential=not a.no_true_sequential)), flush=True)
            continue
        cfg = GiftConfig(bits=b, group_size=a.group_size, sym=False, desc_act=True, n_salient=0, salient_ratio=None,
                         damp_percent=a.damp, mse_clip=a.mse, calib_samples=a.calib_samples, seq_len=a.seq_len,
                         true_sequential=not a.no_true_sequential)
        m = copy.deepcopy(model)
        rep = compress_model(m, calib, cfg, batch_size=a.batch_size, progress=False)
        o_ppl = perplexity(m, ev, progress=False)
        del m
        rows.append(dict(bits=b, gptqmodel_ppl=g_ppl, gptqmodel_s=g_sec, gift_ppl=o_ppl, gift_s=rep.seconds,
                         zero_format=summary["zero_format"]))
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(work, ignore_errors=True)  # ~1 GB of checkpoints per run
    if a.gptqmodel_only:
        return
    date = datetime.date.today().isoformat()
    machine = (f"{platform.machine()} CPU ({os.cpu_count()} cores, shared with other jobs), "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cmd = (f"GPTQMODEL_CPU_WORKERS=2 python tools/bench_vs_gptqmodel.py --bits {a.bits}"
           + (f" --model {a.model}" if a.model else "") + (f" --seq-len {a.seq_len}" if a.seq_len != 512 else "")
           + (f" --group-size {a.group_size}" if a.group_size != 128 else "")
           + (f" --calib-samples {a.calib_samples}" if a.calib_samples != 64 else "")
           + (f" --eval-windows {a.eval_windows}" if a.eval_windows != 20 else "") + (" --mse" if a.mse else "")
           + (" --no-true-sequential" if a.no_true_sequential else ""))
    lines = [f"### gift-quant (k = 0) vs GPTQModel {gptqmodel.__version__}: GPTQ on {a.model or 'the bundled SmolLM2-135M'} ({date})",
             "", f"Command: `{cmd}`. Machine: {machine}.", "",
             f"Same {a.calib_samples} x {a.seq_len}-token calibration windows (bundled text, seed 0, batch "
             f"{a.batch_size}), {', '.join(map(str, bits_list))} bits, group size {a.group_size}, act-order, asym, "
             f"damping {a.damp}, clip search {'on (GPTQModel mse=2.4, gift mse_clip)' if a.mse else 'off on both'}, "
             f"true-sequential {'off' if a.no_true_sequential else 'on'} on both. "
             f"Perplexity on `idle` ({ev.shape[0]} x 512 tokens, never used for calibration); both checkpoints are "
             "evaluated by the same fp32 code (the GPTQModel checkpoint imported bit-exactly with "
             "`gift_quant.integrations.gptq`). Time = the quantization call only (GPTQModel `quantize()`, gift "
             "`compress_model`, both including packing), wall-clock on a shared machine: indicative only. "
             f"FP perplexity {fp:.3f} (the model ships as Q4_1 GGUF, so 4-bit results look better than they "
             "would on a true FP16 model).", "",
             "| bits | GPTQModel ppl | gift-quant ppl | ppl ratio gift/GPTQModel | GPTQModel s | gift-quant s | time ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['gptqmodel_ppl']:.3f} | {r['gift_ppl']:.3f} | "
                     f"{r['gift_ppl'] / r['gptqmodel_ppl']:.3f} | {r['gptqmodel_s']:.0f} | {r['gift_s']:.0f} | "
                     f"{r['gift_s'] / r['gptqmodel_s']:.2f} |")
    body = "\n".join(lines)
    print(body)
    if not a.no_write:
        from bench_quality import write_section
        write_section("bench_vs_gptqmodel", body)


if __name__ == "__main__":
    main()
