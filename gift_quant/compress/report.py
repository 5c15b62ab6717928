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
    coverage: object = None      # compress.experts.Coverage: share of decoder parameters left in float
    expert_fallbacks: dict = field(default_factory=dict)  # expert module -> tokens it got (pooled stats used)

    @property
    def bits_per_weight(self) -> float:
        return self.quantized_bits / max(self.original_params, 1)

    def coverage_summary(self) -> dict:
        """Rows for gift_report.json and the model card: what stayed float, which experts fell back."""
        d = {}
        if self.coverage is not None:
            d["decoder_params_left_in_float"] = f"{self.coverage.float_share:.2%}"
        n_exp = sum(1 for m in self.modules if ".experts." in m.name)
        if n_exp:
            d["expert_projections_quantized"] = n_exp
            d["expert_projections_with_pooled_stats"] = len(self.expert_fallbacks)
        return d


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
        s.update(report.coverage_summary())
    if bits_per_weight is not None:
        s["bits_per_weight"] = round(bits_per_weight, 4)
    return {**s, **extra}
