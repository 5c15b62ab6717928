"""``gift-quant eval | verify | bench``: look at a checkpoint (perplexity, integrity, deployment speed)."""
from __future__ import annotations

import math
from pathlib import Path

from gift_quant.cli.flags import non_negative, positive, resolve_device
from gift_quant.errors import GiftError


def add_eval(sub):
    p = sub.add_parser("eval", help="held-out perplexity of a checkpoint (or of a float model)")
    p.add_argument("path", help="a gift-quant checkpoint folder, a HF model folder, a .gguf file, or 'bundled'")
    p.add_argument("--dataset", default="idle", help="held-out text (default: idle)")
    p.add_argument("--seq-len", type=positive, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--windows", type=positive, default=20, help="evaluation windows of --seq-len tokens (default 20)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: where the model loads, the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_eval(a) -> int:
    from gift_quant.io.data import eval_windows, load_texts
    from gift_quant.eval.perplexity import perplexity
    from gift_quant.io.checkpoint import is_gift_checkpoint, load_checkpoint, looks_like_gift
    from gift_quant.io.model_io import load_model

    device = resolve_device(a.device)
    texts = load_texts(a.dataset)  # bad text fails before the model loads
    if is_gift_checkpoint(a.path):
        model, tok = load_checkpoint(a.path)
        if tok is None:
            raise GiftError(f"{a.path} has no tokenizer files; cannot tokenize the evaluation text")
    elif why := looks_like_gift(a.path):
        raise GiftError(why)
    elif a.path in ("bundled",) or a.path.endswith(".gguf") or (Path(a.path) / "config.json").is_file():
        model, tok = load_model(a.path)
    elif Path(a.path).exists():
        raise GiftError(f"{a.path} is not a checkpoint (no config.json)")
    else:
        raise GiftError(f"checkpoint not found: {a.path}")
    ctx = getattr(model.config, "max_position_embeddings", None)
    if isinstance(ctx, int) and a.seq_len > ctx:
        raise GiftError(f"--seq-len {a.seq_len} is longer than the model's context window ({ctx} tokens)")
    if device:
        model.to(device)
    ev = eval_windows(texts, tok, a.seq_len, a.windows)
    ppl = perplexity(model, ev, progress=not a.quiet)
    if not math.isfinite(ppl):
        raise GiftError(f"perplexity is {ppl}: the model's outputs are not finite (NaN or inf weights or scales "
                        f"in {a.path}?)")
    print(f"perplexity ({a.dataset}, {ev.shape[0]}x{a.seq_len}): {ppl:.3f}")
    return 0


def add_verify(sub):
    p = sub.add_parser("verify", help="check a checkpoint's files against its manifest (sha256, sizes)")
    p.add_argument("path", help="a gift-quant checkpoint folder")


def cmd_verify(a) -> int:
    from gift_quant.io.manifest import verify
    n = verify(a.path)
    print(f"{a.path}: {n} files match the manifest")
    return 0


def add_bench(sub):
    p = sub.add_parser("bench", help="deployment benchmark: prefill, decode tokens/s, memory, size, perplexity")
    p.add_argument("path", help="a gift-quant checkpoint folder")
    p.add_argument("--baseline", default=None, help="float model to compare with (folder, .gguf or 'bundled')")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per measurement (default 64)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (CUDA graphs on GPU)")
    p.add_argument("--eval-windows", type=non_negative, default=4,
                   help="512-token windows of held-out text (default 4; 0: skip)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG plot (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_writable(path: str, flag: str):
    """Refuse, before the benchmark runs, an output file that cannot be written."""
    import os
    folder = Path(path).expanduser().resolve().parent
    if Path(path).is_dir():
        raise GiftError(f"{flag} {path} is a folder; give a file name")
    if not folder.is_dir():
        raise GiftError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GiftError(f"{flag} {path}: folder {folder} is not writable")


def cmd_bench(a) -> int:
    from gift_quant.eval import bench
    try:
        batches = [int(b) for b in a.batch.split(",") if b.strip()]
    except ValueError:
        raise GiftError(f"--batch must be comma-separated integers, got {a.batch!r}") from None
    if not batches or min(batches) < 1 or a.prompt_len < 1 or a.new_tokens < 2:
        raise GiftError("--batch, --prompt-len must be >= 1 and --new-tokens >= 2")
    if a.json:
        _check_writable(a.json, "--json")
    if a.plot:
        _check_writable(a.plot, "--plot")
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise GiftError("--plot needs matplotlib (pip install matplotlib)")
    rows = bench.run(a.path, a.baseline, batches, a.prompt_len, a.new_tokens, a.compile, resolve_device(a.device),
                     a.eval_windows, progress=not a.quiet)
    if rows and rows[0]["device"] == "cpu":
        print("(CPU: the PyTorch fallback path; peak memory is the process's peak RSS)")
    print(bench.table(rows, extra=(("linear path", "kernel", "s"),)))
    if a.json:
        bench.write_json(rows, a.json)
    if a.plot:
        bench.plot(rows, a.plot)
    return 0
