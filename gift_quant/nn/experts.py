"""Mixture-of-experts: transformers 5's fused experts as one projection module per expert.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 (and every class
decorated with ``use_experts_implementation`` in the standard layout) as two 3-D parameters,
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``. :class:`MixedPrecisionExperts` holds them as
``gate_up_proj[e]`` / ``down_proj[e]`` (an ``nn.ModuleList`` each): plain ``nn.Linear`` views of the
fused tensors while compressing, :class:`MixedPrecisionLinear` once packed. So each expert is exactly a
gift Linear (same tensors, same kernel, same training module), and the checkpoint holds one tensor set
per expert, ``<experts>.gate_up_proj.<e>.qweight`` etc.

The forward has the signature of the fused module, ``(hidden_states, top_k_index, top_k_weights)``,
and runs (dequantizes) only the experts the batch routes to.
"""
from __future__ import annotations

import torch
from torch import nn

from gift_quant.nn.swap import swap_modules

PROJECTIONS = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 fused-experts module with the layout this class reproduces: concatenated
    [gate; up], not transposed, no bias, no post-expert norm, the default gate (act(gate) * up)."""
    if isinstance(module, MixedPrecisionExperts):
        return False
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3):
        return False
    layout = dict(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True,
                  has_post_expert_norm=False)
    if any(getattr(module, k, None) is not v for k, v in layout.items()):
        return False  # not decorated by use_experts_implementation, or another layout (GPT-OSS, Llama 4, ...)
    gate_fn = getattr(type(module), "_apply_gate", None)
    if getattr(gate_fn, "__name__", None) != "_default_apply_gate" or not hasattr(module, "act_fn"):
        return False
    E, two_i, H = gu.shape
    return dn.shape == (E, H, two_i // 2) and two_i % 2 == 0


class MixedPrecisionExperts(nn.Module):
    """Drop-in for a fused experts module; ``gate_up_proj[e]`` maps H -> 2I, ``down_proj[e]`` I -> H."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], act_fn: nn.Module):
        super().__init__()
        if len(gate_up) != len(down):
            raise ValueError("one gate_up and one down projection per expert")
        self.num_experts = len(gate_up)
        self.gate_up_proj = nn.ModuleList(gate_up)
        self.down_proj = nn.ModuleList(down)
        self.act_fn = act_fn

    @classmethod
    def from_fused(cls, module: nn.Module) -> "MixedPrecisionExperts":
        """nn.Linear views of the fused parameters (no copy), for calibration and GPTQ."""
        gu, dn = module.gate_up_proj, module.down_proj

        def lin(w):
            with torch.device("meta"):
                m = nn.Linear(w.shape[1], w.shape[0], bias=False)
            m.weight = nn.Parameter(w, requires_grad=False)
            return m
        return cls([lin(gu.data[e]) for e in range(gu.shape[0])], [lin(dn.data[e]) for e in range(dn.shape[0])],
                   module.act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts + 1)
            hit = (counts[:self.num_experts] > 0).nonzero().flatten().tolist()
        for e in hit:  # an index >= num_experts (expert parallelism's "not here") is skipped
            token_idx, pos = torch.where(top_k_index == e)
            gate, up = self.gate_up_proj[e](hidden_states[token_idx]).chunk(2, dim=-1)
            h = self.down_proj[e](self.act_fn(gate) * up)
            h = h * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


def split_fused_experts(root: nn.Module, converted=lambda name: True) -> list[str]:
    """Replace every supported fused experts module under ``root`` whose name ``converted`` accepts by a
    :class:`MixedPrecisionExperts` of nn.Linear views, in place. Returns the replaced names."""
    fused = {n for n, m in root.named_modules() if is_fused_experts(m) and converted(n)}
    return list(swap_modules(root, lambda n, m: MixedPrecisionExperts.from_fused(m), (nn.Module,),
                             where=fused.__contains__))
