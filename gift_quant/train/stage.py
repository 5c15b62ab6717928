"""The compression step of a recipe, with its result cached in the work folder so ``--resume`` skips
calibration and GPTQ once they are done."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from gift_quant.compress.pipeline import compress_model
from gift_quant.config import GiftConfig
from gift_quant.errors import GiftError
from gift_quant.io.atomic import save_tensors, write_json
from gift_quant.nn import MixedPrecisionLinear
from gift_quant.train.dist import is_main_process
from gift_quant.train.state import fingerprint

STAGE = "compressed.safetensors"
STAGE_JSON = "compressed.json"


def stage_summary(report) -> dict:
    """The report's rows a resumed run must still write (it reloads the stage, not the report)."""
    return {"salient_columns_total": sum(m.k for m in report.modules), **report.coverage_summary()}


def _save_stage(model, cfg, report, work_dir: Path, fp: str, seconds: float):
    from gift_quant.io.export import save_saliency
    tensors = {}
    for n, m in model.named_modules():
        if isinstance(m, MixedPrecisionLinear):
            for k, v in [*m.named_buffers(recurse=False), *m.named_parameters(recurse=False)]:
                if v is not None:
                    tensors[f"{n}.{k}"] = v
    save_tensors(work_dir / STAGE, tensors)
    save_saliency(report, work_dir / "saliency.safetensors")
    write_json(work_dir / STAGE_JSON, {"fingerprint": fp, "config": cfg.to_dict(),
                                       "bits_per_weight": report.bits_per_weight, "compress_seconds": seconds,
                                       "summary": stage_summary(report)})


def _load_stage(model, work_dir: Path, fp: str, recipe: str):
    from safetensors.torch import load_file

    from gift_quant.io.checkpoint import replace_linears
    meta_f = work_dir / STAGE_JSON
    if not meta_f.is_file() or not (work_dir / STAGE).is_file():
        return None
    meta = json.loads(meta_f.read_text())
    if meta.get("fingerprint") != fp:
        raise GiftError(f"cannot resume from {work_dir}: it was written for a different model or recipe; "
                        "delete it or change --output")
    cfg = GiftConfig.from_dict({**meta["config"], "recipe": recipe})  # the stage is the same for every recipe
    replace_linears(model, cfg, dtype=torch.float16)
    missing = model.load_state_dict(load_file(str(work_dir / STAGE)), strict=False)
    if any(k.rsplit(".", 1)[-1] in ("qweight", "scales", "salient_weight") for k in missing.missing_keys):
        raise GiftError(f"cannot resume from {work_dir}: {STAGE} is incomplete")
    model.config.quantization_config = cfg
    return cfg, meta.get("bits_per_weight"), {"summary": meta.get("summary", {}),
                                              "compress_seconds": meta.get("compress_seconds")}


def compress_stage(config: GiftConfig, model, samples, work_dir, resume: bool, device, progress: bool,
                   salient=None):
    """(config, report or None when reloaded, bits per weight, {summary rows, compress_seconds}). Every rank
    compresses (deterministically); only rank 0 writes the shared state."""
    # the compressed stage does not depend on the recipe that trains after it (tools/bench_recipes shares it)
    fp = fingerprint(model, {k: v for k, v in config.to_dict().items() if k not in ("salient_counts", "recipe")})
    if resume and work_dir is not None:
        got = _load_stage(model, Path(work_dir), fp, config.recipe)
        if got is not None:
            return got[0], None, got[1], got[2]
    t0 = time.time()
    writer = work_dir is not None and is_main_process()
    state = dict(state_dir=Path(work_dir) / "compress", resume=resume) if writer else {}
    report = compress_model(model, samples, config, device=device, progress=progress, salient=salient, **state)
    seconds = round(time.time() - t0, 1)
    if writer:
        _save_stage(model, config, report, Path(work_dir), fp, seconds)
    return config, report, report.bits_per_weight, {"summary": stage_summary(report), "compress_seconds": seconds}
