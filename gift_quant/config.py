"""``GiftConfig``: every setting of a compression, declared once (type, default, range, help).

It doubles as the transformers ``quantization_config`` (``quant_method = "gift_sw"``), so the same
object configures the CLI, the Python API, the recipes and ``from_pretrained``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from gift_quant.core.quantizer import SUPPORTED_BITS
from gift_quant.core.saliency import GAMMAS, PRESETS, WEIGHT_MODES, parse_norm
from gift_quant.errors import GiftError
from gift_quant.settings import saved_fields, setting, specs, validate

QUANT_METHOD = "gift_sw"
FORMAT = "gift_sw/1"
METHODS = ("gptq", "rtn")
# Qwen2-MoE's shared_expert_gate is an nn.Linear router (1 output): routers stay float
DEFAULT_NOT_CONVERTED = ("lm_head", "shared_expert_gate")


def _group_size(v):
    return None if v == -1 or v >= 1 else f"must be -1 (per row) or a positive int, got {v!r}"


def _metric(v):
    return None if v in PRESETS else f"unknown metric {v!r}; choose one of {', '.join(PRESETS)}"


def _norm(v):
    try:
        parse_norm(v)
    except GiftError:
        return f"must be 1, 2 or inf, got {v!r}"
    return None


def _format(v):
    return None if v == FORMAT else f"unsupported checkpoint format {v!r} (this version reads {FORMAT!r})"


def is_excluded(name: str, modules_not_converted) -> bool:
    """The one exclusion rule: a module stays float when ``modules_not_converted`` names it, one of its
    parents (a prefix), or its last components (a suffix after a dot)."""
    return any(name == m or name.endswith("." + m) or name.startswith(m + ".") for m in modules_not_converted)


@dataclasses.dataclass(repr=False)
class GiftConfig(QuantizationConfigMixin):
    """Settings of a GIFT-SW compression (and the ``quantization_config`` of a saved checkpoint).

    k per Linear is ``min(n_salient, round(salient_ratio * in_features))``; either may be None.
    """

    quant_method: str = setting(QUANT_METHOD, "transformers quantization method", recipe=False)
    bits: int = setting(4, "bits of the quantized base", choices=SUPPORTED_BITS, flag="--bits")
    group_size: int = setting(128, "columns per scale group, -1 for per row", check=_group_size, flag="--group-size")
    sym: bool = setting(False, "symmetric quantization (default asym)", flag="--sym")
    desc_act: bool = setting(True, "act-order: quantize columns by descending Hessian diagonal",
                             flag="--no-act-order")
    # the paper's k = 128 on LLaMA-7B (in = 4096) is 1/32 of the columns: the same share caps k on small models
    n_salient: int = setting(128, "FP16 columns per Linear (0: plain GPTQ)", lo=0, nullable=True,
                             flag="--salient")
    salient_ratio: float = setting(1 / 32, "FP16 columns as a share of in_features", lo=0, hi=1,
                                   nullable=True, flag="--salient-ratio")
    metric: str = setting("gift", "salient-column metric: gift, owq, wanda or quik", check=_metric, flag="--metric")
    metric_tau: str | int | float = setting(None, "norm over rows of D: 1, 2 or inf", nullable=True,
                              check=_norm, flag="--metric-tau")
    metric_rho: str | int | float = setting(None, "norm over tokens of X: 1, 2 or inf", nullable=True,
                              check=_norm, flag="--metric-rho")
    metric_gamma: float = setting(None, "power of the activation norm: 0.5, 1 or 2", nullable=True,
                                  choices=GAMMAS, flag="--metric-gamma")
    metric_weight: str = setting(None, "D = W - Q(W) (error), W (raw), or 1 (none)", nullable=True,
                                 choices=WEIGHT_MODES, flag="--metric-weight")
    method: str = setting("gptq", "gptq or rtn", choices=METHODS, flag="--method")
    damp_percent: float = setting(0.01, "GPTQ damping, a share of the mean Hessian diagonal", lo=0, hi=1,
                                  lo_open=True, hi_open=True, flag="--damp-percent")
    block_size: int = setting(128, "GPTQ columns per lazy-update block", lo=1, flag="--block-size")
    mse_clip: bool = setting(True, "search the clipping range per row (MSE)", flag="--no-mse-clip")
    # off by default: with FP16 columns it gains nothing for about 40% more time; it helps at k = 0
    # (BENCHMARKS.md, true-sequential A/B and the GPTQModel head-to-head)
    true_sequential: bool = setting(False, "quantize q/k/v, o, gate/up, down in turn, each calibrated on the "
                                           "quantized stages before it (as GPTQModel; slower)",
                                    flag="--true-sequential")
    recipe: str = setting("none", "the recipe that produced the checkpoint (recorded, not read)", recipe=False)
    modules_not_converted: list = setting(list(DEFAULT_NOT_CONVERTED), "module names (or prefixes, or suffixes "
                                                                       "after a dot) kept in float")
    dataset: Any = setting(None, "calibration text: bundled (default), generated (written by the model), "
                                 "a .txt/.jsonl/.json/.parquet file, a folder or a hub name; a+b takes an equal "
                                 "share of the windows from each", flag="--dataset")
    calib_samples: int = setting(64, "calibration windows", lo=1, flag="--calib-samples")
    seq_len: int = setting(512, "tokens per calibration window", lo=1, flag="--seq-len")
    seed: int = setting(0, "seed of the calibration sample and of training", flag="--seed")
    # a Hessian from fewer tokens than this is mostly damping (MoE fallback: gift_quant/compress/experts.py)
    expert_min_tokens: int = setting(128, "MoE: an expert routed fewer calibration tokens uses its layer's "
                                          "pooled statistics", lo=0, flag="--expert-min-tokens")
    # the whole layer's Hessians at once: ~7 GB for a Mixtral layer, >50 GB for a DeepSeek-V3 one (fp32 in^2 per expert)
    stats_memory_gb: float = setting(8.0, "most memory for one calibration pass's Hessians; a layer that "
                                          "needs more is calibrated in several passes (same result)", lo=0,
                                     lo_open=True, flag="--stats-memory-gb", runtime=True)
    salient_counts: dict = setting({}, "filled by compression: k per module (loading builds shapes from it)",
                                   recipe=False)
    format: str = setting(FORMAT, "checkpoint format", check=_format, recipe=False)
    tokenizer: Any = setting(None, "quantize-on-load: a tokenizer or its path (default: the model's)",
                             runtime=True, recipe=False)
    progress: bool = setting(False, "quantize-on-load: show progress bars", runtime=True, recipe=False)

    def __post_init__(self):
        self.quant_method = QUANT_METHOD
        self.modules_not_converted = list(self.modules_not_converted)
        self.salient_counts = dict(self.salient_counts or {})
        self.post_init()

    def post_init(self):
        validate(self, "GiftConfig")
        for f in ("metric_tau", "metric_rho"):  # one spelling in saved configs
            v = getattr(self, f)
            if v is not None:
                p = parse_norm(v)
                setattr(self, f, "inf" if p == math.inf else str(int(p)))
        if self.metric_gamma is not None:
            self.metric_gamma = float(self.metric_gamma)

    def is_converted(self, name: str) -> bool:
        return not is_excluded(name, self.modules_not_converted)

    def is_excluded_explicitly(self, name: str) -> bool:
        """Excluded by an entry the user added to the default ``modules_not_converted``."""
        return is_excluded(name, [m for m in self.modules_not_converted if m not in DEFAULT_NOT_CONVERTED])

    def salient_for(self, in_features: int, name: str | None = None) -> int:
        """Number of FP16 columns for a Linear with ``in_features`` inputs."""
        if name is not None and name in self.salient_counts:
            return int(self.salient_counts[name])
        caps = []
        if self.n_salient is not None:
            caps.append(self.n_salient)
        if self.salient_ratio is not None:
            caps.append(int(round(self.salient_ratio * in_features)))
        k = min(caps) if caps else 0
        if k > in_features:
            raise GiftError(f"salient count {k} is larger than the layer's {in_features} input columns"
                            + (f" ({name})" if name else ""))
        return k

    def resolved_metric(self):
        from gift_quant.core.saliency import resolve_metric
        return resolve_metric(self.metric, self.metric_tau, self.metric_rho, self.metric_gamma, self.metric_weight)

    def to_dict(self) -> dict[str, Any]:
        extra = {k: v for k, v in self.__dict__.items() if k not in specs(type(self)) and not k.startswith("_")}
        d = copy.deepcopy({**saved_fields(self), **extra})
        if not isinstance(d.get("dataset"), (str, type(None))):
            d["dataset"] = None  # in-memory datasets are not serializable; the checkpoint does not need them
        return d

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """Keys this version does not know (from a newer writer) are kept as attributes, not dropped."""
        d = {**config_dict, **kwargs}
        known = specs(cls)
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        for k, v in d.items():
            if k not in known:
                setattr(cfg, k, v)
        return (cfg, {}) if return_unused_kwargs else cfg
