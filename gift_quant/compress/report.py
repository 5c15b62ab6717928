"""What a compression produced, per module and in total, and the one run summary built from it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModuleReport:
    name: str
    shape: tuple
    k: int
    salient_idx: torch.Tensor
    scores: torch.Tensor
    rel_error: float  # tr(D H D^T) / tr(W H W^T)


@dataclass
class CompressReport:
    modules: list = field(default_factory=list)
    seconds: float = 0.0
    quantized_bits: int = 0      # bits of every tensor that replaced a Linear
    original_params: int = 0     # weights of the Linears that were replaced

    @property
    def bits_per_weight(self) -> float:
        return self.quantized_bits / max(self.original_params, 1)


def account(report: CompressReport, mpl) -> None:
    """Add one converted Linear to the size totals (bias excluded: it is not quantized)."""
    report.original_params += mpl.in_features * mpl.out_features
    report.quantized_bits += sum(t.numel() * t.element_size() * 8 for t in
                                 [*mpl.buffers(), *mpl.parameters()] if t is not mpl.bias)


def summary(config, report: CompressReport | None = None, bits_per_weight: float | None = None, **extra) -> dict:
    """The run summary (``gift_report.json`` and the model card): settings, sizes, then ``extra``."""
    data = config.dataset if isinstance(config.dataset, str) else ("bundled" if config.dataset is None else "in memory")
    s = {"bits": config.bits, "group_size": config.group_size, "method": config.method, "metric": config.metric,
         "recipe": config.recipe, "calibration": f"{data}: {config.calib_samples} x {config.seq_len} tokens"}
    if report is not None:
        s["salient_columns_total"] = sum(m.k for m in report.modules)
        bits_per_weight = report.bits_per_weight
        s["compress_seconds"] = round(report.seconds, 1)
    if bits_per_weight is not None:
        s["bits_per_weight"] = round(bits_per_weight, 4)
    return {**s, **extra}
