"""``GiftConfig``: every setting of a compression run, validated, and JSON round-trippable.

It doubles as the transformers ``quantization_config`` (``quant_method = "gift_sw"``), so the same
object configures the CLI, the Python API and ``from_pretrained``.
"""
from __future__ import annotations

import copy
import math
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import GiftError
from .quant import SUPPORTED_BITS
from .saliency import GAMMAS, PRESETS, WEIGHT_MODES, parse_norm

QUANT_METHOD = "gift_sw"
FORMAT = "gift_sw/1"
METHODS = ("gptq", "rtn")
# the paper's k = 128 on LLaMA-7B (in = 4096) is 1/32 of the columns: the same share caps k on small models
DEFAULT_N_SALIENT = 128
DEFAULT_SALIENT_RATIO = 1 / 32
# Qwen2-MoE's shared_expert_gate is an nn.Linear router (1 output): routers stay float
DEFAULT_NOT_CONVERTED = ("lm_head", "shared_expert_gate")
# an MoE expert with fewer routed calibration tokens uses its layer's pooled statistics (compress/experts.py)
DEFAULT_EXPERT_MIN_TOKENS = 128


def _norm_str(v: float) -> str:
    return "inf" if v == math.inf else str(int(v))


class GiftConfig(QuantizationConfigMixin):
    """Settings of a GIFT-SW compression (and the ``quantization_config`` of a saved checkpoint).

    k per Linear is ``min(n_salient, round(salient_ratio * in_features))``; either may be None.
    """

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, desc_act: bool = True,
                 n_salient: int | None = DEFAULT_N_SALIENT, salient_ratio: float | None = DEFAULT_SALIENT_RATIO,
                 metric: str = "gift", metric_tau=None, metric_rho=None, metric_gamma=None,
                 metric_weight: str | None = None, method: str = "gptq", damp_percent: float = 0.01,
                 block_size: int = 128, mse_clip: bool = True, true_sequential: bool = False, recipe: str = "none",
                 modules_not_converted: list[str] | None = None, dataset: Any = None,
                 calib_samples: int = 64, seq_len: int = 512, seed: int = 0,
                 expert_min_tokens: int = DEFAULT_EXPERT_MIN_TOKENS,
                 salient_counts: dict[str, int] | None = None, format: str = FORMAT,
                 quant_method: str = QUANT_METHOD, **kwargs):
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.desc_act = desc_act
        self.n_salient = n_salient
        self.salient_ratio = salient_ratio
        self.metric = metric
        self.metric_tau = metric_tau
        self.metric_rho = metric_rho
        self.metric_gamma = metric_gamma
        self.metric_weight = metric_weight
        self.method = method
        self.damp_percent = damp_percent
        self.block_size = block_size
        self.mse_clip = mse_clip
        # quantize a layer's Linears stage by stage (q/k/v, o, gate/up, down), each stage calibrated on the
        # outputs of the already-quantized stages before it (as GPTQModel does). Off by default: measured
        # no gain with FP16 columns (3 bits: 40.96 -> 41.01) for 40% more time; it helps at k = 0
        # (BENCHMARKS.md, true-sequential A/B and the GPTQModel head-to-head).
        self.true_sequential = true_sequential
        self.recipe = recipe
        self.modules_not_converted = (list(modules_not_converted) if modules_not_converted is not None
                                      else list(DEFAULT_NOT_CONVERTED))
        self.dataset = dataset
        self.calib_samples = calib_samples
        self.seq_len = seq_len
        self.seed = seed
        self.expert_min_tokens = expert_min_tokens
        # filled in by compression: the k actually used per module name (loading builds shapes from it)
        self.salient_counts = dict(salient_counts) if salient_counts else {}
        self.format = format
        for key, value in kwargs.items():  # keep unknown keys from newer writers instead of dropping them
            setattr(self, key, value)
        self.post_init()

    def post_init(self):
        def bad(field, msg):
            raise GiftError(f"GiftConfig.{field}: {msg}")

        if self.bits not in SUPPORTED_BITS:
            bad("bits", f"must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or \
                not (self.group_size == -1 or self.group_size >= 1):
            bad("group_size", f"must be -1 (per row) or a positive int, got {self.group_size!r}")
        for f in ("sym", "desc_act", "mse_clip", "true_sequential"):
            if not isinstance(getattr(self, f), bool):
                bad(f, f"must be true or false, got {getattr(self, f)!r}")
        if self.n_salient is not None and (not isinstance(self.n_salient, int) or isinstance(self.n_salient, bool)
                                           or self.n_salient < 0):
            bad("n_salient", f"must be a non-negative int or None, got {self.n_salient!r}")
        if self.salient_ratio is not None and (not isinstance(self.salient_ratio, (int, float))
                                               or isinstance(self.salient_ratio, bool)
                                               or not 0 <= self.salient_ratio <= 1):
            bad("salient_ratio", f"must be a number in [0, 1] or None, got {self.salient_ratio!r}")
        if self.metric not in PRESETS:
            bad("metric", f"unknown metric {self.metric!r}; choose one of {', '.join(PRESETS)}")
        for f in ("metric_tau", "metric_rho"):
            v = getattr(self, f)
            if v is not None:
                try:
                    setattr(self, f, _norm_str(parse_norm(v)))
                except GiftError:
                    bad(f, f"must be 1, 2 or inf, got {v!r}")
        if self.metric_gamma is not None and self.metric_gamma not in GAMMAS:
            bad("metric_gamma", f"must be one of {GAMMAS}, got {self.metric_gamma!r}")
        if self.metric_weight is not None and self.metric_weight not in WEIGHT_MODES:
            bad("metric_weight", f"must be one of {WEIGHT_MODES}, got {self.metric_weight!r}")
        if self.method not in METHODS:
            bad("method", f"must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.damp_percent, (int, float)) or not 0 < self.damp_percent < 1:
            bad("damp_percent", f"must be in (0, 1), got {self.damp_percent!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            bad("block_size", f"must be a positive int, got {self.block_size!r}")
        if not isinstance(self.expert_min_tokens, int) or isinstance(self.expert_min_tokens, bool) \
                or self.expert_min_tokens < 0:
            bad("expert_min_tokens", f"must be a non-negative int, got {self.expert_min_tokens!r}")
        for f in ("calib_samples", "seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f, f"must be a positive int, got {v!r}")
        if not isinstance(self.modules_not_converted, list):
            bad("modules_not_converted", "must be a list of module names")
        if self.format != FORMAT:
            bad("format", f"unsupported checkpoint format {self.format!r} (this version reads {FORMAT!r})")

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

    def explicit_exclusions(self) -> list[str]:
        """The entries of ``modules_not_converted`` the user added to the defaults."""
        return [m for m in self.modules_not_converted if m not in DEFAULT_NOT_CONVERTED]

    def resolved_metric(self):
        from .saliency import resolve_metric
        return resolve_metric(self.metric, self.metric_tau, self.metric_rho, self.metric_gamma, self.metric_weight)

    def to_dict(self) -> dict[str, Any]:
        d = copy.deepcopy({k: v for k, v in self.__dict__.items() if not k.startswith("_")})
        if not isinstance(d.get("dataset"), (str, type(None))):
            d["dataset"] = None  # in-memory datasets are not serializable; the checkpoint does not need them
        return d

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        cfg = cls(**{**config_dict, **kwargs})
        return (cfg, {}) if return_unused_kwargs else cfg

    def replace(self, **changes) -> "GiftConfig":
        return GiftConfig(**{**self.to_dict(), **changes})
