"""The ``gift_sw`` vLLM quantization method: config, linear method, weight loading.

Weights stay packed. vLLM hands each checkpoint tensor to the weight loaders below whole (with a
``shard_id`` for the parts of merged layers: q/k/v, gate/up); after loading, each part is cut to this
rank's tensor-parallel slice by the pure functions of :mod:`.sharding`, the parts are merged into one
layer when they share ``g_idx`` (else each part keeps its own layout and runs on its own), and
``apply`` runs the project's mixed-precision op on them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.utils import set_weight_attrs

from ._deps import (
    QUANT_METHOD,
    GiftConfig,
    GiftError,
    mixed_linear_forward,
    n_groups,
    packed_len,
    skip_module,
)
from .sharding import GiftTensors, merge_outputs, shard_inputs, shard_outputs

TENSORS = ("qweight", "qzeros", "scales", "g_idx", "salient_idx", "salient_weight")
_QKV = {"q": 0, "k": 1, "v": 2}


class GiftVllmConfig(QuantizationConfig):
    """``quantization_config`` of a gift checkpoint, validated by the project's own :class:`GiftConfig`."""

    def __init__(self, gift: GiftConfig):
        super().__init__()
        self.gift = gift
        self.modules_not_converted = list(gift.modules_not_converted)

    def __repr__(self) -> str:
        return f"GiftVllmConfig(bits={self.gift.bits}, group_size={self.gift.group_size}, desc_act={self.gift.desc_act})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GiftVllmConfig:
        return cls(GiftConfig.from_dict(dict(config)))

    @staticmethod
    def get_checkpoint_weight_mapper() -> WeightsMapper:
        return WeightsMapper()  # the default drops ".g_idx", which act-order needs

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper):
        self.modules_not_converted = hf_to_vllm_mapper.apply_list(self.modules_not_converted)

    def is_skipped(self, prefix: str) -> bool:
        """Whether the layer at ``prefix`` stayed a float Linear. A merged layer (qkv_proj, gate_up_proj)
        is checked under the checkpoint names of its parts, which must agree."""
        last = prefix.rsplit(".", 1)[-1]
        parts = self.packed_modules_mapping.get(last)
        names = [prefix[: len(prefix) - len(last)] + p for p in parts] if parts else [prefix]
        skipped = {skip_module(n, self.modules_not_converted) for n in names}
        if len(skipped) > 1:
            raise GiftError(f"{prefix}: vLLM merges {', '.join(names)}, but the checkpoint converted only some of "
                            "them (modules_not_converted)")
        return skipped.pop()

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod() if self.is_skipped(prefix) else GiftLinearMethod(self)
        return None  # embeddings and lm_head: float, as in the checkpoint


class GiftShard(nn.Module):
    """One packed gift layer (or one part of a merged layer) on this rank; the op's ``layer``."""

    def __init__(self, t: GiftTensors, device):
        super().__init__()
        for name in TENSORS:
            self.register_buffer(name, getattr(t, name).to(device).contiguous())
        self.bias = None  # vLLM adds the layer's bias (rank 0 only for row-parallel layers)
        self.bits, self.group_size = t.bits, t.group_size
        self.in_features, self.out_features = t.in_features, t.out_features

    @property
    def n_salient(self) -> int:
        return self.salient_idx.numel()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, k={self.n_salient}"


class GiftLinearMethod(LinearMethodBase):
    def __init__(self, config: GiftVllmConfig):
        self.config = config

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        # Placeholders with the checkpoint names: loading keeps each tensor whole, sharding happens after.
        layer.__dict__["_gift_parts"] = [{} for _ in output_partition_sizes]
        layer.__dict__["_gift_partition"] = (input_size_per_partition, list(output_partition_sizes))
        for name in TENSORS:
            p = nn.Parameter(torch.empty(0, dtype=torch.int32 if name in ("qweight", "qzeros", "g_idx", "salient_idx")
                                         else params_dtype), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": _loader(layer, name)})
            layer.register_parameter(name, p)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if "gift_shards" in layer._modules:
            return
        device = layer.qweight.device
        in_part, out_parts = layer.__dict__["_gift_partition"]
        tp_rank, tp_size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
        parts = []
        for i, (d, out_part) in enumerate(zip(layer.__dict__["_gift_parts"], out_parts)):
            t = _checked(layer.prefix, i, d, self.config.gift)
            if in_part != t.in_features:  # row parallel: this rank's input slice
                t = shard_inputs(t, tp_rank * in_part, in_part)
            if out_part != t.out_features:  # column parallel; k/v heads may be replicated over ranks
                slices = t.out_features // out_part
                t = shard_outputs(t, (tp_rank * slices // tp_size) * out_part, out_part)
            parts.append(t)
        merged = merge_outputs(parts)
        for name in TENSORS:
            delattr(layer, name)
        layer.gift_shards = nn.ModuleList(GiftShard(t, device) for t in ([merged] if merged is not None else parts))
        layer.__dict__.pop("_gift_parts")
        _warm_up(layer.gift_shards, layer.params_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shards = layer.gift_shards
        y = mixed_linear_forward(x, shards[0]) if len(shards) == 1 else \
            torch.cat([mixed_linear_forward(x, s) for s in shards], dim=-1)
        return y if bias is None else y + bias.to(y.dtype)


@torch.no_grad()
def _warm_up(shards, dtype: torch.dtype):
    """Build each part's kernel layout and compile its kernels now, per token bucket, so that vLLM's
    torch.compile and CUDA-graph capture never build or compile anything (as ``prepare_model`` does)."""
    for s in shards:
        for t in (1, 2, 4, 8, 16, 64) if s.qweight.is_cuda else (1,):
            mixed_linear_forward(torch.randn(t, s.in_features, device=s.qweight.device).to(dtype), s)


def _loader(layer: nn.Module, name: str):
    def load(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        parts = layer.__dict__["_gift_parts"]
        if shard_id is None:
            if len(parts) != 1:
                raise GiftError(f"{layer.prefix}.{name}: a fused checkpoint tensor for a merged layer; gift "
                                "checkpoints store q/k/v and gate/up separately")
            i = 0
        else:
            i = _QKV[shard_id] if isinstance(shard_id, str) else shard_id
            if not isinstance(i, int):
                raise GiftError(f"{layer.prefix}.{name}: fused shards {shard_id} are not supported")
        parts[i][name] = loaded_weight.detach().clone()
    return load


def _checked(prefix: str, i: int, d: dict, cfg: GiftConfig) -> GiftTensors:
    """The part's tensors as loaded, with every shape checked against the config (one clear error)."""
    where = f"{prefix}" + (f" (part {i})" if i else "")
    missing = [n for n in TENSORS if n not in d]
    if missing:
        raise GiftError(f"checkpoint has no {', '.join(missing)} for {where}")
    K, N, k = d["g_idx"].numel(), d["scales"].shape[-1], d["salient_idx"].numel()
    G = n_groups(K, cfg.group_size)
    want = {"qweight": (packed_len(K, cfg.bits), N), "qzeros": (G, packed_len(N, cfg.bits)), "scales": (G, N),
            "g_idx": (K,), "salient_idx": (k,), "salient_weight": (N, k)}
    for n, shape in want.items():
        if tuple(d[n].shape) != shape:
            raise GiftError(f"checkpoint disagrees with its config at {where}: {n} has shape {list(d[n].shape)}, "
                            f"config (bits={cfg.bits}, group_size={cfg.group_size}, k={k}) implies {list(shape)}")
    sal = d["salient_idx"].long()
    g = d["g_idx"].long()
    if k and (sal.min() < 0 or sal.max() >= K or sal.unique().numel() != k):
        raise GiftError(f"checkpoint has invalid salient_idx at {where} (out of range or repeated)")
    if K and (g.min() < 0 or g.max() >= G):
        raise GiftError(f"checkpoint has invalid g_idx at {where} (groups outside 0..{G - 1})")
    return GiftTensors(qweight=d["qweight"].to(torch.int32), qzeros=d["qzeros"].to(torch.int32), scales=d["scales"],
                       g_idx=d["g_idx"].to(torch.int32), salient_idx=d["salient_idx"].to(torch.int32),
                       salient_weight=d["salient_weight"], bias=None, bits=cfg.bits, group_size=cfg.group_size,
                       in_features=K, out_features=N)
