"""``gift-quant``: compress, eval. Every user error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from .errors import GiftError

RECIPES = ("none", "pre", "post", "ste", "lora")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise GiftError(message)


def _add_compress(sub):
    p = sub.add_parser("compress", help="select salient columns, quantize the rest, write a checkpoint")
    p.add_argument("--model", default=None, help="local HF folder, .gguf file or hub name (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--output", "-o", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder atomically")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUTPUT.partial/ (finished layers, training checkpoints)")
    p.add_argument("--bits", type=int, default=None, help="2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=None, help="columns per scale group, -1 for per row (default 128)")
    p.add_argument("--sym", action="store_true", default=None, help="symmetric quantization (default asym)")
    p.add_argument("--no-act-order", dest="desc_act", action="store_false", default=None,
                   help="quantize columns in natural order (default: descending Hessian diagonal)")
    p.add_argument("--true-sequential", dest="true_sequential", action="store_true", default=None,
                   help="quantize q/k/v, o, gate/up, down in turn, each calibrated on the quantized stages "
                        "before it (as GPTQModel; slower)")
    p.add_argument("--salient", type=int, default=None, help="FP16 columns per Linear (0: plain GPTQ)")
    p.add_argument("--salient-ratio", type=float, default=None, help="FP16 columns as a share of in_features")
    p.add_argument("--metric", default=None, help="gift (default), owq, wanda or quik")
    p.add_argument("--metric-tau", default=None, help="norm over rows of D: 1, 2 or inf")
    p.add_argument("--metric-rho", default=None, help="norm over tokens of X: 1, 2 or inf")
    p.add_argument("--metric-gamma", type=float, default=None, help="power of the activation norm: 0.5, 1 or 2")
    p.add_argument("--metric-weight", default=None, choices=["error", "raw", "none"], help="D = W - Q(W), W, or 1")
    p.add_argument("--method", default=None, help="gptq (default) or rtn")
    p.add_argument("--recipe", default="none",
                   help="none (GPTQ + FP16 columns, no training), post (GIFT-SW: train the FP16 columns on the "
                        "frozen codes), pre, ste, lora, or a recipe .yaml (flags override its fields)")
    p.add_argument("--dataset", default=None, help="calibration text: bundled (default), a .txt/.jsonl/.json/.parquet file, a folder or a hub name")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 64)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 512)")
    p.add_argument("--eval-dataset", default="idle", help="held-out text for the final perplexity (default: idle)")
    p.add_argument("--eval-windows", type=int, default=20, help="512-token windows of held-out text (default 20)")
    p.add_argument("--no-eval", action="store_true", help="skip the final perplexity")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from .cli_recipes import add_training_args
    add_training_args(p)


def _add_eval(sub):
    p = sub.add_parser("eval", help="held-out perplexity of a checkpoint (or of a float model)")
    p.add_argument("path", help="a gift-quant checkpoint folder, a HF model folder, a .gguf file, or 'bundled'")
    p.add_argument("--dataset", default="idle", help="held-out text (default: idle)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")


def _add_verify(sub):
    p = sub.add_parser("verify", help="check a checkpoint's files against its manifest (sha256, sizes)")
    p.add_argument("path")


def cmd_verify(a) -> int:
    from .manifest import verify
    n = verify(a.path)
    print(f"{a.path}: {n} files match the manifest")
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="deployment benchmark: prefill, decode tokens/s, memory, size, perplexity")
    p.add_argument("path", help="a gift-quant checkpoint folder")
    p.add_argument("--baseline", default=None, help="float model to compare with (folder, .gguf or 'bundled')")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (CUDA graphs on GPU)")
    p.add_argument("--eval-windows", type=int, default=4, help="512-token windows of held-out text (0: skip)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG plot (needs matplotlib)")
    p.add_argument("--quiet", action="store_true")


def cmd_bench(a) -> int:
    from . import bench
    try:
        batches = [int(b) for b in a.batch.split(",") if b.strip()]
    except ValueError:
        raise GiftError(f"--batch must be comma-separated integers, got {a.batch!r}") from None
    if not batches or min(batches) < 1 or a.prompt_len < 1 or a.new_tokens < 2:
        raise GiftError("--batch, --prompt-len must be >= 1 and --new-tokens >= 2")
    rows = bench.run(a.path, a.baseline, batches, a.prompt_len, a.new_tokens, a.compile, a.device,
                     a.eval_windows, progress=not a.quiet)
    if rows and rows[0]["device"] == "cpu":
        print("(CPU: the PyTorch fallback path; peak memory is the process's peak RSS)")
    print(bench.table(rows, extra=(("linear path", "kernel", "s"),)))
    if a.json:
        bench.write_json(rows, a.json)
    if a.plot:
        bench.plot(rows, a.plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gift-quant", description="GIFT-SW mixed-precision compression for transformers")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_compress(sub)
    _add_eval(sub)
    _add_verify(sub)
    _add_bench(sub)
    return parser


def _config_from_args(a):
    from .config import GiftConfig
    fields = {"bits": a.bits, "group_size": a.group_size, "sym": a.sym, "desc_act": a.desc_act,
              "metric": a.metric, "metric_tau": a.metric_tau, "metric_rho": a.metric_rho,
              "metric_gamma": a.metric_gamma, "metric_weight": a.metric_weight, "method": a.method,
              "calib_samples": a.calib_samples, "seq_len": a.seq_len, "seed": a.seed, "dataset": a.dataset,
              "true_sequential": getattr(a, "true_sequential", None)}
    kw = {k: v for k, v in fields.items() if v is not None}
    if a.salient is not None or a.salient_ratio is not None:
        if a.salient is not None and a.salient < 0:
            raise GiftError(f"--salient must be >= 0, got {a.salient}")
        kw["n_salient"] = a.salient
        kw["salient_ratio"] = a.salient_ratio
    return GiftConfig(recipe=a.recipe, **kw)


def cmd_compress(a) -> int:
    import torch

    from .data import calibration_samples, eval_windows, load_texts
    from .evaluate import perplexity
    from .export import (STORAGE_DTYPE, atomic_output_dir, check_output, round_to_storage, safetensors_mib,
                         save_checkpoint)
    from .model_io import load_model
    from .pipeline import compress_model, decoder_layers, linears

    if a.recipe != "none":  # pre, post, ste, lora or a YAML file: the training recipes
        from .cli_recipes import compress_with_recipe
        return compress_with_recipe(a)
    cfg = _config_from_args(a)
    cfg.resolved_metric()
    partial = check_output(a.output, a.overwrite, a.resume)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    log = (lambda *x: None) if a.quiet else (lambda *x: print(*x, file=sys.stderr, flush=True))
    log(f"gift-quant: loading {a.model or 'bundled SmolLM2-135M-Instruct'}")
    model, tok = load_model(a.model, trust_remote_code=a.trust_remote_code)
    layers, prefix = decoder_layers(model)
    for li, layer in enumerate(layers):  # refuse a too-large k before any long work
        for n, lin in linears(layer, cfg.modules_not_converted).items():
            cfg.salient_for(lin.in_features, f"{prefix}.{li}.{n}")
    log(f"gift-quant: calibration text {a.dataset or 'bundled'}: {cfg.calib_samples} x {cfg.seq_len} tokens")
    samples = calibration_samples(load_texts(a.dataset), tok, cfg.calib_samples, cfg.seq_len, cfg.seed)
    ev = None
    if not a.no_eval:
        ev = eval_windows(load_texts(a.eval_dataset), tok, 512, a.eval_windows)
    with atomic_output_dir(a.output, a.overwrite) as tmp:
        report = compress_model(model, samples, cfg, device=a.device, progress=not a.quiet,
                                state_dir=partial / "compress", resume=a.resume)
        summary = {"model": a.model or "bundled SmolLM2-135M-Instruct", "bits": cfg.bits,
                   "group_size": cfg.group_size, "method": cfg.method, "recipe": cfg.recipe,
                   "metric": cfg.metric, "salient_columns_total": sum(m.k for m in report.modules),
                   "bits_per_weight": round(report.bits_per_weight, 4),
                   "compress_seconds": round(report.seconds, 1),
                   "calibration": f"{a.dataset or 'bundled'}: {cfg.calib_samples} x {cfg.seq_len} tokens",
                   **report.coverage_summary()}
        round_to_storage(model)  # what is evaluated is exactly what the checkpoint stores
        if ev is not None:
            summary[f"perplexity ({a.eval_dataset}, {ev.shape[0]}x512)"] = round(
                perplexity(model, ev, progress=not a.quiet), 3)
        save_checkpoint(model.to(STORAGE_DTYPE), tok, tmp, report, summary)
    shutil.rmtree(partial, ignore_errors=True)  # the checkpoint is complete
    print(f"compressed in {time.time() - t0:.0f}s: {cfg.bits}-bit {cfg.method}, "
          f"{report.bits_per_weight:.3f} bits/weight in decoder Linears, {safetensors_mib(a.output):.1f} MiB on disk "
          f"-> {a.output}")
    print(f"decoder parameters left in float: {report.coverage.float_share:.2%}")
    for k, v in summary.items():
        if k.startswith("perplexity"):
            print(f"{k}: {v}")
    return 0


def cmd_eval(a) -> int:
    from .data import eval_windows, load_texts
    from .evaluate import perplexity
    from .hf import is_gift_checkpoint, load_checkpoint
    from .model_io import load_model

    if is_gift_checkpoint(a.path):
        model, tok = load_checkpoint(a.path)
        if tok is None:
            raise GiftError(f"{a.path} has no tokenizer files; cannot tokenize the evaluation text")
    elif a.path in ("bundled",) or a.path.endswith(".gguf") or (Path(a.path) / "config.json").is_file():
        model, tok = load_model(a.path)
    elif Path(a.path).exists():
        raise GiftError(f"{a.path} is not a checkpoint (no config.json)")
    else:
        raise GiftError(f"checkpoint not found: {a.path}")
    if a.device:
        model.to(a.device)
    ev = eval_windows(load_texts(a.dataset), tok, a.seq_len, a.windows)
    ppl = perplexity(model, ev, progress=not a.quiet)
    print(f"perplexity ({a.dataset}, {ev.shape[0]}x{a.seq_len}): {ppl:.3f}")
    return 0


def main(argv=None) -> int:
    try:
        a = build_parser().parse_args(argv)
        if getattr(a, "quiet", False):
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        return {"compress": cmd_compress, "eval": cmd_eval, "verify": cmd_verify, "bench": cmd_bench}[a.command](a)
    except GiftError as e:
        print(f"gift-quant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gift-quant: interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
