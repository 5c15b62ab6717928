"""Run one recipe: calibrate, then the method's prepare / train / finalize, evaluate, save.

Returns a :class:`RecipeResult` (the model, the summary written as ``gift_report.json``, and the
compression and training reports).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from gift_quant.compress.layers import check_fits
from gift_quant.compress.report import CompressReport, summary
from gift_quant.errors import GiftError
from gift_quant.eval.perplexity import perplexity
from gift_quant.io.atomic import write_json
from gift_quant.train.dist import dist_rank
from gift_quant.train.methods import METHODS, freeze, unfreeze_norms
from gift_quant.train.recipe import Recipe
from gift_quant.train.settings import TrainReport
from gift_quant.train.state import fingerprint


@dataclasses.dataclass
class RecipeResult:
    model: Any
    summary: dict
    compress_report: CompressReport | None = None
    train_report: TrainReport | None = None


@dataclasses.dataclass
class Run:
    """What one recipe run carries from step to step (the methods read and fill it)."""
    recipe: Recipe
    config: Any
    model: Any
    tokenizer: Any
    device: torch.device
    work_dir: Path | None
    resume: bool
    progress: bool
    log: Callable
    fingerprint: str
    eval_windows: torch.Tensor | None = None
    eval_before_training: bool = False
    samples: torch.Tensor | None = None
    train_data: tuple | None = None
    teacher: Any = None   # float copy of the model for loss: kd
    summary: dict = dataclasses.field(default_factory=dict)
    compress_report: CompressReport | None = None
    train_report: TrainReport | None = None
    bits_per_weight: float | None = None
    compress_seconds: float | None = None
    stage_summary: dict = dataclasses.field(default_factory=dict)


def _device(device) -> torch.device:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = dist_rank()
    if world > 1 and device.type == "cuda" and device.index is None:  # each rank on its own GPU, not all on cuda:0
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _train_summary(r: Recipe, tr: TrainReport) -> dict:
    s = r.train
    return {"train_dataset": s.train_dataset, "steps": tr.steps_done, "lr": s.lr,
            "batch": f"{s.batch_size} x {s.grad_accum} x {s.train_seq_len} tokens", "noise": s.noise,
            "loss": s.loss,
            "trainable_params": tr.trainable_params, "train_step_seconds": round(tr.step_seconds, 3),
            "train_tokens_per_second": round(tr.tokens_per_second, 1),
            "train_peak_memory_mb": round(tr.peak_memory_mb, 1),
            "final_train_loss": round(tr.losses[-1], 4) if tr.losses else None,
            "best_step": tr.best_step, "best_heldout_loss": tr.best_val}


def run_recipe(r: Recipe, model, tokenizer, out_dir=None, work_dir=None, resume: bool = False,
               progress: bool = True, device=None, eval_windows=None, model_name: str = "model", log=None,
               eval_before_training: bool = False, eval_name: str | None = None) -> RecipeResult:
    """Compress (and train) ``model`` per recipe ``r``; write a checkpoint into ``out_dir`` if given.

    ``work_dir`` holds resumable state (the compressed stage and training checkpoints); the caller
    removes it after a successful run.
    """
    from gift_quant.compress.calibration import calibration_tensor
    from gift_quant.train.data import training_data
    method = METHODS[r.method]
    r = dataclasses.replace(r, config=copy.deepcopy(r.config), train=dataclasses.replace(r.train, progress=progress))
    cfg = r.config
    method.check(r)
    check_fits(model, cfg, r.train.train_seq_len if method.trains else None)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    run = Run(r, cfg, model, tokenizer, _device(device), Path(work_dir) if work_dir else None, resume, progress,
              log or (lambda *a: None), fingerprint(model, r.fingerprint_fields()), eval_windows, eval_before_training)
    if method.trains:  # fail fast on bad training data, before the long calibration
        run.train_data = training_data(r.train, tokenizer, cfg.seed)
        ids, _, val, _ = run.train_data
        run.log(f"gift-quant: training text {r.train.train_dataset}: {ids.shape[0]} windows of "
                f"{r.train.train_seq_len} tokens" + (f" (+{val.shape[0]} held out)" if val is not None else ""))
    run.samples = calibration_tensor(cfg.dataset, tokenizer, cfg, model=model, progress=progress)
    freeze(model)
    if method.trains and r.train.loss == "kd":
        run.teacher = copy.deepcopy(model).eval()  # before prepare compresses or wraps the model
    method.prepare(run)
    if method.trains and r.train.train_norms:
        unfreeze_norms(run.model)
    if method.trains:
        method.train(run)
    method.finalize(run)
    s = summary(run.config, bits_per_weight=run.bits_per_weight, model=model_name,
                compress_seconds=run.compress_seconds, **run.summary)
    s.update(run.stage_summary)  # k in total, share left in float, MoE fallbacks (kept across a resume)
    if run.train_report is not None:
        s.update(_train_summary(r, run.train_report))
    run.model.eval()
    if eval_windows is not None:
        s["perplexity"] = round(perplexity(run.model, eval_windows, progress=progress), 3)
        s["perplexity_on"] = (f"{eval_name + ', ' if eval_name else ''}{eval_windows.shape[0]} x "
                              f"{eval_windows.shape[1]} tokens")
        if not math.isfinite(s["perplexity"]):
            raise GiftError(f"perplexity is {s['perplexity']}: the compressed model's outputs are not finite; "
                            "nothing was written")
    s["total_seconds"] = round(time.time() - t0, 1)
    run.summary = s
    if out_dir is not None and dist_rank()[0] == 0:  # multi-process: rank 0 alone writes the checkpoint
        out_dir = Path(out_dir)
        method.save(run, out_dir)
        if run.compress_report is None and run.work_dir is not None and (run.work_dir / "saliency.safetensors").is_file():
            shutil.copy(run.work_dir / "saliency.safetensors", out_dir / "saliency.safetensors")
        write_json(out_dir / "recipe.json", r.to_dict(), indent=1)
    return RecipeResult(run.model, s, run.compress_report, run.train_report)
