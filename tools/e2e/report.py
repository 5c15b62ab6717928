"""bench_e2e's outputs: ratios to FP16 of the same part, mode and batch, the JSON, the markdown table with
its profile lines and notes, and (at the end, with matplotlib) the plot. Rewritten after every
configuration, so a run cut short still leaves its results."""
from __future__ import annotations

from pathlib import Path

from gift_quant.errors import GiftError
from gift_quant.eval import bench
from gift_quant.io.atomic import write_text

from .profile import profile_line

RANDOM_NOTE = ("part b: random weights in the real packed format; speed and memory only, "
               "never accuracy (its outputs are meaningless).")


def _div(ok: bool, x, y):
    return x / y if ok and x is not None and y else None


def add_ratios(rows: list[dict]):
    fp = {(r["part"], r["mode"], r["batch"]): r for r in rows if r["bits"] == 16 and r["status"] == "ok"}
    for r in rows:
        ref = fp.get((r["part"], r["mode"], r["batch"]))
        ok = ref is not None and r["status"] == "ok"
        r["tok_s_vs_fp16"] = _div(ok, r.get("decode_tok_s"), ref and ref.get("decode_tok_s"))
        r["prefill_speedup_vs_fp16"] = _div(ok, ref and ref.get("prefill_ms"), r.get("prefill_ms"))
        r["mem_vs_fp16"] = _div(ok, r.get("peak_mem_mib"), ref and ref.get("peak_mem_mib"))
        r["size_vs_fp16"] = (r["size_mib"] / ref["size_mib"] if ref is not None and r.get("size_mib")
                             and ref.get("size_mib") else None)


EXTRA = (("tok/s vs FP16", "tok_s_vs_fp16", ".2f"), ("prefill speedup", "prefill_speedup_vs_fp16", ".2f"),
         ("mem vs FP16", "mem_vs_fp16", ".2f"), ("size vs FP16", "size_vs_fp16", ".2f"),
         ("kernel layers", "kernel_layers", "d"))


def write_outputs(out: Path, meta: dict, rows: list[dict], profiles: dict, final: bool = False):
    add_ratios(rows)
    bench.write_json({"meta": meta, "rows": rows, "profile": profiles}, out / "bench_e2e.json")
    md = [f"# End-to-end benchmark ({meta['device_name']}, {meta['date']})", "",
          (f"prompt {meta['prompt_len']} tokens, {meta['new_tokens']} new tokens, greedy, static KV cache; "
           f"compute dtype {meta['dtype']}. Ratios are against FP16 of the same part, mode and batch "
           "(tok/s and prefill: >1 is faster; memory and size: <1 is smaller). Peak memory includes the "
           "weights. In `compile` rows only the decode step is compiled (transformers' own path, "
           "mode=reduce-overhead on CUDA); prefill runs eager."),
          ("Size: the state dict with float tensors at 2 bytes (FP16 storage), or the checkpoint's "
           "safetensors on disk (`size_source` in the JSON)."),
          f"Kernel: {meta.get('kernel_status')}.", ""]
    for part in ("a", "b"):
        pr = [r for r in rows if r["part"] == part]
        if not pr:
            continue
        md.append(f"## Part {part}: {meta['part_desc'][part]}")
        if part == "b":
            md.append(f"**{RANDOM_NOTE}**")
        elif meta.get("eval_dataset") and meta["eval_dataset"] != "idle":
            md.append(f"(perplexity column is on `{meta['eval_dataset']}`: idlelib is missing here)")
        md += ["", bench.table(pr, EXTRA), ""]
        for name, p in profiles.items():
            if name.startswith(part + ":"):
                md.append("- " + profile_line(name, p))
        md.append("")
        if final and any(r["status"] == "ok" for r in pr):
            try:
                bench.plot([dict(r, model=r["model"]) for r in pr], out / f"bench_e2e_{part}.png")
            except GiftError:
                note = "no plot: matplotlib is not installed"
                if note not in meta["notes"]:
                    meta["notes"].append(note)
    if meta.get("notes"):
        md += ["Notes:"] + [f"- {n}" for n in meta["notes"]]
    write_text(out / "bench_e2e.md", "\n".join(md) + "\n")
    return "\n".join(md)
