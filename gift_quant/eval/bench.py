"""Deployment benchmark behind ``gift-quant bench``: prefill latency, decode tokens/s with a static KV
cache (eager and, optionally, ``torch.compile``), peak memory, size on disk and held-out perplexity of a
compressed checkpoint next to its float baseline. Out-of-memory is caught per configuration."""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gift_quant.errors import GiftError


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def disk_size_mib(path) -> float | None:
    p = Path(path)
    if not p.is_dir():
        return p.stat().st_size / 2**20 if p.is_file() else None
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) / 2**20


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def generate_options(mode: str) -> dict:
    """Extra ``generate`` kwargs for a mode. ``eager`` turns off transformers' own auto-compile, which
    otherwise compiles the decode step of a static cache on CUDA (eager numbers would not be eager)."""
    return {"disable_compile": True} if mode == "eager" else {}


@torch.no_grad()
def measure(model, vocab: int, batch: int, prompt_len: int, new_tokens: int, device, repeats: int = 3,
            **generate_kwargs) -> dict:
    """Median prefill seconds and decode tokens/s (greedy, static cache, exactly ``new_tokens``).
    ``generate_kwargs`` go to every ``generate`` call (e.g. ``disable_compile``, ``compile_config``)."""
    g = torch.Generator().manual_seed(batch * 1000 + prompt_len)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    gen = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, attention_mask=mask,
               cache_implementation="static", pad_token_id=0, **generate_kwargs)
    # warm-up (and compile) at the timed length: the static cache then has its final size, so no
    # recompile or CUDA-graph capture falls inside the timed calls
    model.generate(ids, **gen)
    prefill, total = [], []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        model.generate(ids, **{**gen, "max_new_tokens": 1, "min_new_tokens": 1})
        _sync(device)
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.generate(ids, **gen)
        _sync(device)
        total.append(time.perf_counter() - t)
    p, tt = statistics.median(prefill), statistics.median(total)
    decode_s = max(tt - p, 1e-9)
    return {"prefill_ms": p * 1e3, "decode_tok_s": batch * (new_tokens - 1) / decode_s}


def measure_safe(model, vocab: int, batch: int, prompt_len: int, new_tokens: int, device, **generate_kwargs) -> dict:
    """:func:`measure` with peak memory (reset first on CUDA) and ``status`` "ok" or "OOM" (caught)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {}
    try:
        row.update(measure(model, vocab, batch, prompt_len, new_tokens, device, **generate_kwargs))
        row["status"] = "ok"
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if not is_oom(e):
            raise
        row["status"] = "OOM"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["peak_mem_mib"] = _peak_memory_mib(device)
    return row


def run(path, baseline=None, batches=(1,), prompt_len=128, new_tokens=64, compile=False, device=None,
        eval_windows: int = 0, progress: bool = True) -> list[dict]:
    from gift_quant.io.data import eval_windows as windows, load_texts
    from gift_quant.eval.perplexity import perplexity
    from gift_quant.io.checkpoint import is_gift_checkpoint, load_checkpoint
    from gift_quant.io.model_io import load_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not is_gift_checkpoint(path):
        raise GiftError(f"{path} is not a gift-quant checkpoint")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    entries = [("gift", str(path))] + ([("baseline", baseline)] if baseline else [])
    modes = ["eager"] + (["compile"] if compile else [])
    rows = []
    bar = tqdm(total=len(entries) * len(batches) * len(modes), desc="bench", disable=not progress)
    for label, src in entries:
        if label == "gift":
            model, tok = load_checkpoint(src, dtype=dtype)
            if tok is None:
                raise GiftError(f"{src} has no tokenizer files; the benchmark needs one")
        else:
            model, tok = load_model(src, dtype=dtype)
        model.to(device).eval()
        kernel = "-"
        if device.type == "cuda" and label == "gift":  # build the kernel layout before anything is compiled
            from gift_quant.nn.dispatch import prepare_model
            n = prepare_model(model, dtype)
            from gift_quant.nn.dispatch import requested_backend
            kernel = f"{requested_backend()} ({n} layers on a kernel)" if n else "pytorch"
        elif label == "gift":
            kernel = "pytorch (cpu)"
        vocab = model.config.vocab_size
        ppl = None
        if eval_windows:
            ppl = perplexity(model, windows(load_texts("idle"), tok, 512, eval_windows), progress=False)
        for mode in modes:
            if mode == "compile":
                model.forward = torch.compile(model.forward, mode="reduce-overhead" if device.type == "cuda" else None)
            for b in batches:
                row = {"model": label, "path": src, "mode": mode, "batch": b, "prompt_len": prompt_len,
                       "new_tokens": new_tokens, "device": str(device), "size_mib": disk_size_mib(src),
                       "ppl_idle": ppl, "kernel": kernel}
                row.update(measure_safe(model, vocab, b, prompt_len, new_tokens, device, **generate_options(mode)))
                rows.append(row)
                bar.update(1)
        del model
    bar.close()
    return rows


def table(rows: list[dict], extra: tuple = ()) -> str:
    """Markdown table; ``extra`` adds columns as (header, key, format) after the standard ones."""
    head = "| model | mode | batch | prefill ms | decode tok/s | peak MiB | disk MiB | ppl (idle) | " + \
        "".join(f"{h} | " for h, _, _ in extra) + "status |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {f(r.get('prefill_ms'), '.1f')} | "
                     f"{f(r.get('decode_tok_s'), '.1f')} | {f(r.get('peak_mem_mib'), '.0f')} | "
                     f"{f(r.get('size_mib'), '.1f')} | {f(r.get('ppl_idle'), '.2f')} | "
                     + "".join(f"{f(r.get(k), fmt)} | " for _, k, fmt in extra) + f"{r['status']} |")
    return "\n".join(lines)


def plot(rows: list[dict], out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GiftError("--plot needs matplotlib (pip install matplotlib)") from None
    ok = [r for r in rows if r["status"] == "ok"]
    labels = [f"{r['model']}/{r['mode']}/b{r['batch']}" for r in ok]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].bar(labels, [r["decode_tok_s"] for r in ok])
    ax[0].set_ylabel("decode tokens/s")
    ax[1].bar(labels, [r["peak_mem_mib"] for r in ok])
    ax[1].set_ylabel("peak memory (MiB)")
    for a in ax:
        a.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out)


def write_json(rows, out):
    from gift_quant.io.atomic import write_json
    write_json(out, rows, indent=2)
