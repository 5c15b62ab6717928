"""``gift-quant compress --recipe pre|post|ste|lora|path.yaml``: the training recipes behind the CLI.

Resumable state lives in ``OUTPUT.partial/`` (the compressed stage, per-layer GPTQ state, training
checkpoints every ``--save-every`` steps); it survives a crash or Ctrl-C, ``--resume`` continues from
it, and it is removed once the checkpoint is complete. The output folder itself is written atomically.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time

from .errors import GiftError


def add_training_args(p):
    g = p.add_argument_group("training (recipes pre, post, ste, lora)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (recipe default)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--train-dataset", default=None,
                   help="training text: train (default: bundled topics + stdlib docstrings), a file or a "
                        "chat .jsonl with 'messages' (loss on assistant tokens)")
    g.add_argument("--train-seq-len", type=int, default=None, help="tokens per training window")
    g.add_argument("--batch-size", type=int, default=None, help="windows per micro-batch")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    g.add_argument("--noise", default=None, choices=["gaussian", "uniform", "none"],
                   help="quantization noise on the frozen columns during training (default gaussian)")
    g.add_argument("--save-every", type=int, default=None, help="training checkpoint interval in steps")


def overrides(a) -> dict:
    o = {"bits": a.bits, "group_size": a.group_size, "sym": a.sym, "desc_act": a.desc_act, "metric": a.metric,
         "method": a.method, "calib_dataset": a.dataset, "calib_samples": a.calib_samples,
         "calib_seq_len": a.seq_len, "seed": a.seed, "steps": a.steps, "lr": a.lr,
         "train_dataset": a.train_dataset, "seq_len": a.train_seq_len, "batch_size": a.batch_size,
         "grad_accum": a.grad_accum, "noise": a.noise, "save_every": a.save_every}
    if a.salient is not None or a.salient_ratio is not None:
        if a.salient is not None and a.salient < 0:
            raise GiftError(f"--salient must be >= 0, got {a.salient}")
        o["n_salient"] = a.salient
        o["salient_ratio"] = a.salient_ratio
    for k in ("metric_tau", "metric_rho", "metric_gamma", "metric_weight"):
        if getattr(a, k, None) is not None:
            raise GiftError(f"--{k.replace('_', '-')} is not supported with a training recipe; use --metric")
    if getattr(a, "true_sequential", None):
        raise GiftError("--true-sequential is not supported with a training recipe yet")
    return {k: v for k, v in o.items() if v is not None or k in ("n_salient", "salient_ratio")}  # None clears


def _barrier(world: int):
    """Wait for every rank. accelerate's wait_for_everyone() is a no-op for CPU ranks (distributed type NO),
    so this uses the process group it initializes."""
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            from accelerate import PartialState
            PartialState()
        if dist.is_initialized():
            dist.barrier()


def compress_with_recipe(a) -> int:
    from .data import eval_windows, load_texts
    from .export import atomic_output_dir, check_output, partial_dir, safetensors_mib
    from .model_io import load_model
    from .recipes import load_recipe, run_recipe
    from .train import dist_rank

    r = load_recipe(a.recipe, overrides(a), a.device)  # --salient alone: exactly that many columns (no ratio cap)
    rank, world = dist_rank()
    main = rank == 0
    # multi-process (accelerate launch / torchrun): rank 0 alone checks, owns and renames the output
    if main:
        check_output(a.output, a.overwrite, a.resume)
    _barrier(world)
    partial = partial_dir(a.output)
    t0 = time.time()
    log = (lambda *x: None) if a.quiet or not main else (lambda *x: print(*x, file=sys.stderr, flush=True))
    name = a.model or "bundled SmolLM2-135M-Instruct"
    log(f"gift-quant: recipe {r.recipe} ({a.recipe}), {r.bits}-bit; loading {name}")
    model, tok = load_model(a.model, trust_remote_code=a.trust_remote_code)
    ev = None if a.no_eval else eval_windows(load_texts(a.eval_dataset), tok, 512, a.eval_windows)
    with atomic_output_dir(a.output, a.overwrite) if main else contextlib.nullcontext() as tmp:
        s = run_recipe(r, model, tok, out_dir=tmp, work_dir=partial, resume=a.resume,
                       progress=main and not a.quiet, device=a.device, eval_windows=ev, model_name=name, log=log)
    _barrier(world)  # every rank is done with OUTPUT.partial before it goes
    if not main:
        return 0
    shutil.rmtree(partial, ignore_errors=True)  # the checkpoint is complete
    s.pop("_model", None)
    s.pop("_train_report", None)
    print(f"compressed in {time.time() - t0:.0f}s: recipe {r.recipe}, {r.bits}-bit, "
          f"{s.get('bits_per_weight')} bits/weight in decoder Linears, {safetensors_mib(a.output):.1f} MiB on disk "
          f"-> {a.output}")
    if "steps" in s:
        print(f"trained {s['steps']} steps ({s['trainable_params']} parameters, {s['train_step_seconds']} s/step)")
    if "perplexity" in s:
        print(f"perplexity ({a.eval_dataset}, {ev.shape[0]}x512): {s['perplexity']}")
    return 0
