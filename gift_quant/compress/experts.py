"""Per-expert compression of mixture-of-experts layers, and the share of a model left in float.

Experts: the pipeline splits every supported fused experts module into one nn.Linear per expert and
projection (:func:`gift_quant.nn.experts.split_fused_experts`), so calibration hooks see only the
tokens the router actually sends to each expert, and salient selection and GPTQ with FP16 columns run
per expert with the dense models' code. An expert that receives fewer than
``GiftConfig.expert_min_tokens`` calibration tokens (a Hessian of rank below that is mostly damping)
gets the **pooled statistics of its layer** instead: the token-weighted sum, over all experts of that
layer, of the inputs of the same projection. The fallback is counted in the report.

Coverage: a run must never leave most of a model in float without saying so. :func:`coverage`
measures the share of decoder parameters that stay float, and :func:`warn_if_mostly_float` prints one
warning naming the modules when that share, not counting modules the user excluded explicitly, is
above :data:`FLOAT_SHARE_WARN`.
"""
from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from gift_quant.core.saliency import ActivationStats
from gift_quant.errors import GiftError
from gift_quant.nn.experts import MixedPrecisionExperts, is_fused_experts, split_fused_experts

FLOAT_SHARE_WARN = 0.10
_EXPERT = re.compile(r"^(.*)\.(gate_up_proj|down_proj)\.(\d+)$")


def split_experts(layers: nn.Module, prefix: str, config) -> list[str]:
    """Split the fused experts of the decoder layers that ``config`` converts, for compression."""
    return split_fused_experts(layers, lambda n: config.is_converted(f"{prefix}.{n}"))


def expert_key(name: str) -> tuple[str, str] | None:
    """(experts module, projection) of an expert Linear's name, else None."""
    m = _EXPERT.match(name)
    return (m.group(1), m.group(2)) if m else None


def add_to_pool(pool: ActivationStats | None, st: ActivationStats) -> ActivationStats:
    """``pool`` + ``st`` in place (a fresh pool for None), as :func:`_pooled` sums them."""
    if pool is None:
        pool = ActivationStats(st.xtx.shape[0], device=st.xtx.device, dtype=st.xtx.dtype)
    pool.n += st.n
    pool.xtx += st.xtx
    pool.abs_sum += st.abs_sum
    pool.abs_max = torch.maximum(pool.abs_max, st.abs_max)
    return pool


def no_tokens_error(parent: str, proj: str) -> GiftError:
    return GiftError(f"{parent}.{proj}: no calibration token reached any expert of this layer")


def _pooled(stats: list[ActivationStats]) -> ActivationStats:
    p = None
    for s in stats:
        p = add_to_pool(p, s)
    return p


def fill_expert_stats(stats: dict, names, min_tokens: int, layer_stats: dict | None = None) -> dict[str, int]:
    """Give every under-sampled expert projection in ``names`` its layer's pooled statistics.

    ``stats`` maps module names (relative to the decoder layer) to :class:`ActivationStats`; an expert
    the router never chose has no entry. The pool is built from ``layer_stats`` (every statistic
    collected in this layer so far; default ``stats``). Returns {name: tokens it received} per fallback.
    """
    layer_stats = stats if layer_stats is None else layer_stats
    groups = defaultdict(list)
    for n in names:
        m = _EXPERT.match(n)
        if m:
            groups[(m.group(1), m.group(2))].append(n)
    fallbacks = {}
    for (parent, proj), members in groups.items():
        low = [n for n in members if n not in stats or stats[n].n < min_tokens]
        if not low:
            continue
        # summed in expert order (not firing order), so a layer calibrated in several passes pools alike
        got = [layer_stats[n] for n in members if n in layer_stats and layer_stats[n].n > 0]
        if not got:
            raise no_tokens_error(parent, proj)
        pool = _pooled(got)
        for n in low:
            fallbacks[n] = stats[n].n if n in stats else 0
            stats[n] = pool
    return fallbacks


# ------------------------------------------------------------------------------------------ coverage
@dataclass
class Coverage:
    decoder_params: int = 0          # every parameter of the decoder layers (a packed Linear counts in*out)
    float_params: int = 0            # those that stay float (norms, routers, unsupported modules, excluded)
    excluded_params: int = 0         # of float_params: in modules the user excluded explicitly
    float_modules: dict = field(default_factory=dict)  # name with layer index as '*' -> (class, params)

    @property
    def float_share(self) -> float:
        return self.float_params / max(self.decoder_params, 1)

    @property
    def unexplained_share(self) -> float:
        return (self.float_params - self.excluded_params) / max(self.decoder_params, 1)


def coverage(layers: nn.ModuleList, prefix: str, config) -> Coverage:
    """Share of decoder parameters that a compression with ``config`` leaves in float.

    Works before and after compression: an nn.Linear that ``config`` converts and a supported fused
    experts module count as converted.
    """
    from gift_quant.nn import GiftLinear, MixedPrecisionLinear
    cov = Coverage()
    for li, layer in enumerate(layers):
        converted: set[int] = set()
        for n, m in layer.named_modules():
            if isinstance(m, (MixedPrecisionLinear, GiftLinear)):
                cov.decoder_params += m.in_features * m.out_features
                converted.update(id(p) for p in m.parameters(recurse=False))
                converted.update(id(b) for b in m.buffers(recurse=False))
            elif (isinstance(m, nn.Linear) or is_fused_experts(m)) and config.is_converted(f"{prefix}.{li}.{n}"):
                for p in m.parameters(recurse=False):
                    if p.dim() >= 2:  # the weight; a bias stays float
                        cov.decoder_params += p.numel()
                        converted.add(id(p))
        for n, p in layer.named_parameters():
            if id(p) in converted:
                continue
            cov.decoder_params += p.numel()
            cov.float_params += p.numel()
            owner = n.rpartition(".")[0]
            if any(config.is_excluded_explicitly(f"{prefix}.{li}.{o}") for o in _ancestors(owner)):
                cov.excluded_params += p.numel()
            key = f"{prefix}.*.{owner}" if owner else f"{prefix}.*"
            cls, count = cov.float_modules.get(key, (type(layer.get_submodule(owner)).__name__, 0))
            cov.float_modules[key] = (cls, count + p.numel())
    return cov


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def describe(cov: Coverage, top: int = 4) -> str:
    """The largest float modules, e.g. ``model.layers.*.mlp.experts (MixtralExperts, 1.6M params)``."""
    rows = sorted(cov.float_modules.items(), key=lambda kv: -kv[1][1])
    rows = [r for r in rows if r[1][1] >= 0.01 * cov.decoder_params][:top] or rows[:1]  # not every bias
    return ", ".join(f"{n} ({cls}, {_human(c)} params)" for n, (cls, c) in rows)


def _human(n: int) -> str:
    for unit, d in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= d:
            return f"{n / d:.1f}{unit}"
    return str(n)


def warn_if_mostly_float(cov: Coverage) -> bool:
    """One warning when more than FLOAT_SHARE_WARN of the decoder stays float without explicit exclusion."""
    if cov.unexplained_share <= FLOAT_SHARE_WARN:
        return False
    warnings.warn(f"{cov.float_share:.1%} of the decoder parameters will stay in floating point and were not "
                  f"excluded explicitly (modules_not_converted); gift-quant converts nn.Linear and transformers' "
                  f"fused experts with the standard layout only. Largest float modules: {describe(cov)}")
    return True


def experts_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, MixedPrecisionExperts)]


def keep_module_names(model: nn.Module):
    """Save per-expert tensors under their module names: transformers would otherwise apply the reverse of
    its MoE checkpoint conversion (fused -> per-expert ``w1/w3``) to our keys on ``save_pretrained``."""
    model._weight_conversions = []
