"""Write a compressed model as a ``save_pretrained`` folder, atomically, with an audit trail.

The folder is built beside the target under a temporary name and renamed into place only when
complete, so a crash or a full disk never leaves a checkpoint that looks valid.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from gift_quant.errors import GiftError
from gift_quant.io.atomic import fsync_path, save_tensors


STORAGE_DTYPE = torch.float16


def round_to_storage(model, dtype=STORAGE_DTYPE):
    """Round the float parameters that stay unquantized (embeddings, norms, head) to the storage dtype
    in place, keeping the compute dtype, so in-process evaluation matches the saved checkpoint."""
    from gift_quant.nn import MixedPrecisionLinear
    skip = {id(p) for m in model.modules() if isinstance(m, MixedPrecisionLinear) for p in m.parameters()}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in skip:
            p.data = p.data.to(dtype).to(p.dtype)


def partial_dir(target) -> Path:
    """Where an interrupted run keeps its resumable state (kept on failure, removed on success)."""
    t = Path(target).resolve()
    return t.with_name(t.name + ".partial")


def check_output(target, overwrite: bool, resume: bool) -> Path:
    """Refuse before any long work: an existing output folder (without ``overwrite``) or an interrupted
    run's state (without ``resume``). Returns the run's :func:`partial_dir`."""
    if Path(target).exists() and not overwrite:
        raise GiftError(f"output folder {target} already exists (pass --overwrite to replace it)")
    partial = partial_dir(target)
    if partial.exists() and not resume:
        raise GiftError(f"{partial} holds an interrupted run: pass --resume to continue it, or delete it")
    return partial


def check_not_overlapping(src, dst, what: str = "input"):
    """Refuse an output that is the input, lies inside it, or contains it (replacing it would delete the
    input)."""
    s, d = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    if s == d or s in d.parents or d in s.parents:
        rel = "is" if s == d else ("is inside" if s in d.parents else "contains")
        raise GiftError(f"output {dst} {rel} the {what} {src}: choose another output folder")


def safetensors_mib(folder) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors")) / 2**20


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces ``target``, on failure it is removed."""
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        raise GiftError(f"output folder {target} already exists (pass --overwrite to replace it)")
    if target.exists() and not target.is_dir():
        raise GiftError(f"output path {target} exists and is not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise GiftError(f"cannot write to {target.parent}: {e.strerror or e}") from None
    try:
        yield tmp
        for f in [*tmp.rglob("*"), tmp]:  # every file and folder durable before the rename publishes them
            fsync_path(f)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
        tmp.rename(target)
        fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise GiftError(f"writing {target} failed: {e.strerror or e}; nothing was left behind") from None
        raise


def save_saliency(report, path: Path):
    """Chosen indices and all scores per module, so a run can be audited and reproduced."""
    tensors = {}
    for m in report.modules:
        tensors[f"{m.name}.salient_idx"] = m.salient_idx.to(torch.int32).contiguous()
        tensors[f"{m.name}.scores"] = m.scores.to(torch.float32).contiguous()
    save_tensors(path, tensors, metadata={"what": "gift-quant salient column selection"})


BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_model_id(name) -> str | None:
    """The hub id of the model that was compressed, for the card's ``base_model`` (None: a local file)."""
    import re
    name = str(name or "")
    if name.startswith("bundled"):
        return BUNDLED_HUB_ID
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).expanduser().exists():
        return name
    return None


def model_card(config, summary: dict) -> str:
    rows = []
    for k, v in summary.items():
        if k == "perplexity_on":
            continue
        if k == "perplexity" and "perplexity_on" in summary:
            k = f"perplexity ({summary['perplexity_on']})"
        rows.append(f"| {k} | {v} |")
    rows = "\n".join(rows)
    base = base_model_id(summary.get("model"))
    meta = f"base_model: {base}\nbase_model_relation: quantized\n" if base else ""
    return f"""---
library_name: transformers
{meta}tags: [gift-quant, gift-sw, gptq, quantized]
---
# {summary.get('model', 'model')} compressed with gift-quant (GIFT-SW)

{config.bits}-bit {config.method.upper()} base (group size {config.group_size}, {'sym' if config.sym else 'asym'},
act-order {config.desc_act}) plus FP16 salient input columns per Linear (metric `{config.metric}`), recipe
`{config.recipe}`.

| setting / measurement | value |
|---|---|
{rows}

Load it with `import gift_quant` and then `AutoModelForCausalLM.from_pretrained(path)`.
`saliency.safetensors` holds the chosen columns and their scores; `gift_report.json` the run summary.
"""


def save_checkpoint(model, tokenizer, out_dir: Path, report=None, summary: dict | None = None):
    """``save_pretrained`` plus the audit trail (saliency, summary, model card) and, last, the manifest."""
    out_dir = Path(out_dir)
    model.config.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if report is not None:
        save_saliency(report, out_dir / "saliency.safetensors")
    if summary is not None:
        (out_dir / "gift_report.json").write_text(json.dumps(summary, indent=2, default=str))
        (out_dir / "README.md").write_text(model_card(model.config.quantization_config, summary))
    from gift_quant.io.manifest import write_manifest
    write_manifest(out_dir)
