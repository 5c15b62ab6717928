"""Modules and helpers of the baselines trained with the same data, steps, seeds and loop as GIFT-SW
(methods ``ste`` and ``lora`` in :mod:`gift_quant.train.methods`).

- ``ste``: quantization-aware training with straight-through rounding. It starts from the GPTQ result
  (latent weights = the dequantized codes, the same groups and zero-points), learns the latent
  weights, one scale multiplier per output row, and the FP16 salient columns. Export re-rounds the
  latent weights with the learned scales into the same packed format. Trainable: every weight (dense
  gradients by design: that is what STE costs).
- ``lora``: LoRA (peft) on the GPTQ-quantized model. The rank of each Linear is chosen so that its
  adapter has about as many parameters as GIFT's k * out_features for that Linear (``lora_rank``
  overrides). LoRA cannot merge into integer codes, so the output is the GPTQ checkpoint plus a peft
  adapter folder ``lora_adapter/``; :func:`load_lora` loads both.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from gift_quant.errors import GiftError
from gift_quant.core.gptq import QuantizedWeight
from gift_quant.nn import MixedPrecisionLinear
from gift_quant.core.quantizer import max_code


class SteLinear(nn.Module):
    def __init__(self, mpl: MixedPrecisionLinear):
        super().__init__()
        self.bits, self.group_size = mpl.bits, mpl.group_size
        self.in_features, self.out_features = mpl.in_features, mpl.out_features
        self.weight = nn.Parameter(mpl.dequantize_base(torch.float32))
        self.register_buffer("scales", mpl.scales.float().clone())
        self.register_buffer("zeros", mpl.zeros().float())
        self.register_buffer("g_idx", mpl.g_idx.long().clone())
        self.register_buffer("salient_idx", mpl.salient_idx.long().clone())
        self.log_row_scale = nn.Parameter(torch.zeros(mpl.out_features))
        self.salient_weight = nn.Parameter(mpl.salient_weight.detach().float().clone())
        self.register_buffer("bias", None if mpl.bias is None else mpl.bias.float().clone())

    def _grid(self):
        s = self.scales[self.g_idx].t() * torch.exp(self.log_row_scale)[:, None]
        return s, self.zeros[self.g_idx].t()

    def fake_quant(self):
        s, z = self._grid()
        v = self.weight / s
        q = torch.clamp(v + (torch.round(v) - v).detach() + z, 0, max_code(self.bits))  # straight-through
        w = s * (q - z)
        if self.salient_idx.numel():
            w = w.index_fill(1, self.salient_idx, 0.0)
        return w

    def forward(self, x):
        y = F.linear(x, self.fake_quant().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.salient_idx.numel():
            y = y + F.linear(x[..., self.salient_idx], self.salient_weight.to(x.dtype))
        return y

    @torch.no_grad()
    def to_mixed(self) -> MixedPrecisionLinear:
        mult = torch.exp(self.log_row_scale)
        scales = (self.scales * mult[None, :]).to(torch.float16).float()
        s, z = scales[self.g_idx].t(), self.zeros[self.g_idx].t()
        codes = torch.clamp(torch.round(self.weight / s) + z, 0, max_code(self.bits))
        if self.salient_idx.numel():
            codes[:, self.salient_idx] = z[:, self.salient_idx]
        qw = QuantizedWeight(codes=codes.cpu(), scales=scales.cpu(), zeros=self.zeros.cpu(), g_idx=self.g_idx.cpu(),
                             salient_idx=self.salient_idx.cpu(), salient_weight=self.salient_weight.cpu(), bits=self.bits)
        return MixedPrecisionLinear.from_quantized(qw, None if self.bias is None else self.bias.cpu(), self.group_size)


# ---- LoRA ----------------------------------------------------------------------------------------
def matched_ranks(model) -> dict[str, int]:
    """Per-module rank r with r * (in + out) ~= k * out (GIFT's trainable count), at least 1."""
    return {n: max(1, round(m.n_salient * m.out_features / (m.in_features + m.out_features)))
            for n, m in model.named_modules() if isinstance(m, MixedPrecisionLinear)}


def lora_config(model, rank: int | None = None):
    try:
        from peft import LoraConfig
    except ImportError:
        raise GiftError("the lora recipe needs peft: pip install 'gift-quant[train]'") from None
    ranks = matched_ranks(model)
    if not ranks:
        raise GiftError("no quantized Linear to attach LoRA to")
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in ranks})
    if rank is not None:
        pattern = {}
        default = rank
    else:
        default = max(set(ranks.values()), key=list(ranks.values()).count)
        pattern = {f"^{re.escape(n)}$": v for n, v in ranks.items() if v != default}
    cfg = LoraConfig(r=default, lora_alpha=2 * default, target_modules=suffixes, lora_dropout=0.0, bias="none",
                     rank_pattern=pattern, alpha_pattern={k: 2 * v for k, v in pattern.items()},
                     task_type="CAUSAL_LM")
    from gift_quant.nn.lora import register_peft
    return register_peft(cfg)


def save_lora(pm, tokenizer, out_dir, compress_report, summary):
    """GPTQ checkpoint (the frozen base) + ``lora_adapter/`` (peft)."""
    from gift_quant.io.export import save_checkpoint
    out_dir.mkdir(parents=True, exist_ok=True)
    import copy
    pm.save_pretrained(out_dir / "lora_adapter")
    base = copy.deepcopy(pm).unload()  # keep ``pm`` (the evaluated model) intact
    from gift_quant.io.export import STORAGE_DTYPE
    save_checkpoint(base.to(STORAGE_DTYPE), tokenizer, out_dir, compress_report, {**summary, "lora_adapter": "lora_adapter/"})


def load_lora(path):
    """(PeftModel, tokenizer) from a folder written by the ``lora`` recipe."""
    import warnings
    from pathlib import Path
    from peft import LoraConfig, PeftModel
    from gift_quant.io.checkpoint import load_checkpoint
    base, tok = load_checkpoint(path)
    adir = Path(path) / "lora_adapter"
    if not adir.is_dir():
        raise GiftError(f"{path} has no lora_adapter/ folder")
    c = LoraConfig.from_pretrained(str(adir))
    from gift_quant.nn.lora import register_peft
    register_peft(c)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Unsupported layer type.*")
        pm = PeftModel.from_pretrained(base, str(adir), config=c)
    return pm.eval(), tok
