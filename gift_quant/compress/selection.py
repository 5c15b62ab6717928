"""The one salient-column selection: score every input column with the configured metric, keep the
top k (or the columns a caller fixed, as the ``pre`` recipe does with the columns it trained)."""
from __future__ import annotations

import torch

from gift_quant.compress.experts import split_experts
from gift_quant.compress.layers import decoder_layers, linears
from gift_quant.core.saliency import ActivationStats, select_salient, sensitivity


def salient_columns(W: torch.Tensor, stats: ActivationStats, config, metric, name: str,
                    fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sorted column indices, scores of every column, k) for the Linear ``name`` with weight ``W``."""
    k = config.salient_for(W.shape[1], name)
    scores = sensitivity(W, stats.norm(metric.rho), metric, config.bits, config.group_size, config.sym)
    if fixed is not None:
        idx = fixed.to(device=scores.device, dtype=torch.long).sort().values
        return idx, scores, idx.numel()
    return select_salient(scores, k), scores, k


@torch.no_grad()
def select_fp(model, samples: torch.Tensor, config, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Salient columns of every converted decoder Linear of the float model (one forward with hooks)."""
    layers, prefix = decoder_layers(model)
    split_experts(layers, prefix, config)  # MoE hook: experts are selected (and trained by pre) per expert
    metric = config.resolved_metric()
    stats, handles, lins = {}, [], {}
    dev = next(model.parameters()).device
    for li, layer in enumerate(layers):
        for n, lin in linears(layer, config, f"{prefix}.{li}").items():
            full = f"{prefix}.{li}.{n}"
            lins[full] = lin
            stats[full] = ActivationStats(lin.in_features, device=dev)  # on the model's device (CUDA too)

            def hook(_m, inp, _o, st=stats[full]):
                st.add(inp[0].float())
            handles.append(lin.register_forward_hook(hook))
    try:
        for i in range(0, samples.shape[0], batch_size):
            model(samples[i:i + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {full: salient_columns(lin.weight.detach().float(), stats[full], config, metric, full)[0]
            for full, lin in lins.items()}
