"""``gift-quant compress``: every run is a recipe (``none`` by default), run by the one recipe runner.

Resumable state lives in ``OUTPUT.partial/`` (the compressed stage, per-layer GPTQ state, training
checkpoints every ``--save-every`` steps); it survives a crash or Ctrl-C, ``--resume`` continues from
it, and it is removed once the checkpoint is complete. The output folder itself is written atomically.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time
import warnings
from pathlib import Path

from gift_quant.cli.flags import add_setting_flags, overrides, positive, resolve_device
from gift_quant.config import GiftConfig
from gift_quant.errors import GiftError
from gift_quant.train.settings import TrainSettings

BUNDLED_NAME = "bundled SmolLM2-135M-Instruct"


def add_parser(sub):
    p = sub.add_parser("compress", help="select salient columns, quantize the rest (and train), write a checkpoint")
    p.add_argument("--model", default=None, help=f"local HF folder, .gguf file or hub name (default: {BUNDLED_NAME})")
    p.add_argument("--output", "-o", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder atomically")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUTPUT.partial/ (finished layers, training checkpoints)")
    p.add_argument("--recipe", default="none",
                   help="none (GPTQ + FP16 columns, no training; the default), post (GIFT-SW: train the FP16 "
                        "columns on the frozen codes), pre, ste, lora, or a recipe .yaml (flags override its fields)")
    p.add_argument("--eval-dataset", default="idle", help="held-out text for the final perplexity (default: idle)")
    p.add_argument("--eval-windows", type=positive, default=20,
                   help="512-token windows of held-out text (default 20; --no-eval skips the evaluation)")
    p.add_argument("--no-eval", action="store_true", help="skip the final perplexity")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_setting_flags(p.add_argument_group("compression"), GiftConfig)
    add_setting_flags(p.add_argument_group("training (recipes pre, post, ste, lora)"), TrainSettings)


def _quant_method(q) -> str:
    m = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return f"quant_method {m!r}"


def _refuse_quantized_source(model):
    """A checkpoint that is already quantized (gift-quant's own, GPTQ, ...) would fail only at the end."""
    import json

    from gift_quant.io.checkpoint import is_gift_dict
    cfg = Path(model).expanduser() / "config.json" if model else None
    if cfg is None or not cfg.is_file():
        return
    try:
        q = json.loads(cfg.read_text()).get("quantization_config")
    except ValueError:
        return
    if q:
        what = "a gift-quant checkpoint" if is_gift_dict(q) else "already quantized"
        raise GiftError(f"--model {model} is {what} ({_quant_method(q)}); compress needs the float model it was "
                        "made from")


def run(a) -> int:
    from gift_quant.io.data import eval_windows, load_texts
    from gift_quant.io.export import (atomic_output_dir, check_not_overlapping, check_output, partial_dir,
                                      safetensors_mib)
    from gift_quant.io.model_io import load_model
    from gift_quant.train.dist import barrier, dist_rank
    from gift_quant.train.recipe import load_recipe
    from gift_quant.train.methods import METHODS
    from gift_quant.train.runner import run_recipe

    device = resolve_device(a.device)
    train_flags = overrides(a, TrainSettings)
    r = load_recipe(a.recipe, {**overrides(a, GiftConfig), **train_flags}, device)
    if train_flags and not METHODS[r.method].trains:
        warnings.warn(f"gift-quant: recipe {r.method} does not train; ignoring {', '.join(sorted(train_flags))}",
                      stacklevel=1)
    gs, bits = r.config.group_size, r.config.bits
    if 0 < gs < 32:
        warnings.warn(f"gift-quant: --group-size {gs} stores an fp16 scale and a {bits}-bit zero per {gs} weights: "
                      f"{(16 + bits) / gs:.2f} extra bits per weight on top of the {bits} bits (group size 128: "
                      f"{(16 + bits) / 128:.2f})", stacklevel=1)
    _refuse_quantized_source(a.model)
    if a.model and Path(a.model).expanduser().exists():
        check_not_overlapping(a.model, a.output, "model")
    rank, world = dist_rank()
    main = rank == 0
    # multi-process (accelerate launch / torchrun): rank 0 alone checks, owns and renames the output
    if main:
        check_output(a.output, a.overwrite, a.resume)
    barrier(world)
    eval_texts = None if a.no_eval else load_texts(a.eval_dataset)  # a missing eval file fails before loading
    partial = partial_dir(a.output)
    t0 = time.time()
    log = (lambda *x: None) if a.quiet or not main else (lambda *x: print(*x, file=sys.stderr, flush=True))
    name = a.model or BUNDLED_NAME
    log(f"gift-quant: recipe {r.method} ({a.recipe}), {r.config.bits}-bit; loading {name}")
    model, tok = load_model(a.model, trust_remote_code=a.trust_remote_code)
    q = getattr(model.config, "quantization_config", None)
    if q is not None:  # a hub name, known only once loaded
        raise GiftError(f"{name} is already quantized ({_quant_method(q)}); compress needs its float model")
    ev = None if a.no_eval else eval_windows(eval_texts, tok, 512, a.eval_windows)
    with atomic_output_dir(a.output, a.overwrite) if main else contextlib.nullcontext() as tmp:
        res = run_recipe(r, model, tok, out_dir=tmp, work_dir=partial, resume=a.resume,
                         progress=main and not a.quiet, device=device, eval_windows=ev, model_name=name, log=log,
                         eval_name=a.eval_dataset)
    barrier(world)  # every rank is done with OUTPUT.partial before it goes
    if not main:
        return 0
    shutil.rmtree(partial, ignore_errors=True)  # the checkpoint is complete
    s = res.summary
    print(f"compressed in {time.time() - t0:.0f}s: recipe {r.method}, {r.config.bits}-bit {r.config.method}, "
          f"{s.get('bits_per_weight')} bits/weight in decoder Linears, {safetensors_mib(a.output):.1f} MiB on disk "
          f"-> {a.output}")
    if "decoder_params_left_in_float" in s:
        print(f"decoder parameters left in float: {s['decoder_params_left_in_float']}")
    if "steps" in s:
        print(f"trained {s['steps']} steps ({s['trainable_params']} parameters, {s['train_step_seconds']} s/step)")
    if "perplexity" in s:
        print(f"perplexity ({a.eval_dataset}, {ev.shape[0]}x512): {s['perplexity']}")
    return 0
