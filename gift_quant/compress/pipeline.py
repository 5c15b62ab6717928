"""The one compression pipeline: layer by layer, select the salient columns, quantize the rest with GPTQ
(or RTN), pack, and put the quantized layer in place before calibrating the next.

Every entry point (CLI, :func:`gift_quant.quantize_`, ``GiftQuantizer``, quantize-on-load, every recipe)
ends here. The model stays on CPU; one decoder layer at a time moves to the compute device.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from gift_quant.compress import experts as moe
from gift_quant.compress.layers import (activation_device, capture_inputs, collect_stats, decoder_layers, linears,
                                        run_layer, stages, stat_passes, to_device)
from gift_quant.compress.report import CompressReport, ModuleReport, account
from gift_quant.compress.selection import salient_columns
from gift_quant.compress.state import LayerState
from gift_quant.config import GiftConfig
from gift_quant.core.gptq import gptq_quantize, layer_error, rtn_quantize
from gift_quant.errors import GiftError
from gift_quant.nn import MixedPrecisionLinear
from gift_quant.nn.swap import set_module


@torch.no_grad()
def _quantize_one(lin, st, full: str, config: GiftConfig, metric, fixed, device, storage_dtype, write: bool = True):
    """Select the FP16 columns of one Linear, quantize the rest, and (``write``) put the quantized weight in
    place (so later stages and the next layer see the quantized output). Returns (packed module, report row)."""
    if not torch.isfinite(st.xtx).all():
        raise GiftError(f"{full}: calibration activations contain NaN or Inf")
    W = lin.weight.data.float()
    idx, scores, k = salient_columns(W, st, config, metric, full, fixed)
    H = st.hessian
    if config.method == "gptq":
        qw = gptq_quantize(W, H, config.bits, config.group_size, config.sym, config.desc_act, idx,
                           damp=config.damp_percent, block_size=config.block_size,
                           mse=config.mse_clip, name=full)
    else:
        qw = rtn_quantize(W, config.bits, config.group_size, config.sym, idx, mse=config.mse_clip, name=full)
    mpl = MixedPrecisionLinear.from_quantized(qw, lin.bias, config.group_size, storage_dtype)
    W_eff = mpl.dequantize(torch.float32).to(device)
    Hd = H.to(torch.float64)
    rel = layer_error(W.to(torch.float64), W_eff.to(torch.float64), Hd) / max(
        float(torch.sum((W.to(torch.float64) @ Hd) * W.to(torch.float64))), 1e-30)
    if write:
        lin.weight.data.copy_(W_eff.to(lin.weight.dtype))  # the next layer sees the quantized output
    return mpl, ModuleReport(full, tuple(W.shape), k, idx.cpu(), scores.cpu(), rel)


@torch.no_grad()
def _quantize_in_passes(layer, lins, passes, batches, device, min_tokens: int, quantize, where: str, report):
    """One layer whose Hessians do not fit ``config.stats_memory_gb`` at once: one calibration pass per
    group of Linears, each on the layer's original weights (the caller puts the quantized weights in
    place after the last pass), so every statistic equals the single-pass one. Under-sampled experts wait for their layer's
    pool, kept as a running sum (two Hessians per layer, not one per expert). ``quantize(name, stats,
    write)`` is the layer's quantize-and-record step."""
    pools, low = {}, {}
    for group in passes:
        stats = collect_stats(layer, {n: lins[n] for n in group}, batches, device, stop_early=True)
        pooled = set()  # aliases (one object under two names) within this pass; ids are reused after it
        for n in group:
            key, st = moe.expert_key(n), stats.get(n)
            if key is None:
                quantize(n, st, write=False)
                continue
            if st is not None and st.n > 0 and id(st) not in pooled:
                pooled.add(id(st))
                pools[key] = moe.add_to_pool(pools.get(key), st)
            if st is None or st.n < min_tokens:
                low[n] = st.n if st is not None else 0
            else:
                quantize(n, st, write=False)
        del stats
    for n, tokens in low.items():
        key = moe.expert_key(n)
        if key not in pools:
            raise moe.no_tokens_error(f"{where}.{key[0]}", key[1])
        report.expert_fallbacks[f"{where}.{n}"] = tokens
        quantize(n, pools[key], write=False)


@torch.no_grad()
def compress_model(model, samples: torch.Tensor, config: GiftConfig, device=None, batch_size: int = 8,
                   progress: bool = True, storage_dtype=torch.float16,
                   salient: dict[str, torch.Tensor] | None = None, state_dir=None,
                   resume: bool = False) -> CompressReport:
    """Replace every decoder Linear of ``model`` by a :class:`MixedPrecisionLinear`, in place.

    ``salient`` (full module name -> column indices) fixes the FP16 columns instead of selecting them
    (the ``pre`` recipe keeps the columns it trained). With ``state_dir`` every finished layer is
    saved there; ``resume`` reloads those layers (replaying their forward, no re-quantization) and
    continues, giving a result bit-identical to an uninterrupted run.
    """
    t0 = time.time()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers, prefix = decoder_layers(model)
    metric = config.resolved_metric()
    report = CompressReport()
    # MoE hook (compress/experts.py): fused experts -> one Linear per expert; warn when most stays float
    moe.split_experts(layers, prefix, config)
    moe.warn_if_mostly_float(moe.coverage(layers, prefix, config))
    model_device = next(model.parameters()).device
    batches = capture_inputs(model, samples, batch_size, model_device)
    act_dev = activation_device(samples, getattr(model.config, "hidden_size", 4096), device)
    batches = [(h.to(act_dev), to_device(kw, act_dev)) for h, kw in batches]
    counts = dict(config.salient_counts)
    bar = tqdm(range(len(layers)), desc=f"{config.method} {config.bits}-bit", unit="layer", disable=not progress)
    state = LayerState(state_dir, config, samples, model) if state_dir is not None else None
    if state is not None:
        state.open(resume)
    for li in bar:
        layer = layers[li].to(device)
        lins = linears(layer, config, f"{prefix}.{li}")
        packed = {}
        if state is not None and state.has(li):
            packed = state.load(li, report, counts, storage_dtype)
            for n, lin in lins.items():
                lin.weight.data.copy_(packed[n].dequantize(torch.float32).to(device, lin.weight.dtype))
            lins = {}
        if not lins:
            groups = []  # resumed layer: nothing to quantize
        elif config.true_sequential:
            groups = stages(layer, lins, batches[0])
        else:
            groups = stat_passes(lins, config.stats_memory_gb)

        def quantize(n, st, write=True, where=f"{prefix}.{li}", lins=lins, packed=packed):
            full = f"{where}.{n}"
            packed[n], row = _quantize_one(lins[n], st, full, config, metric, (salient or {}).get(full), device,
                                           storage_dtype, write)
            counts[full] = row.k
            report.modules.append(row)
            account(report, packed[n])

        if len(groups) > 1 and not config.true_sequential:
            _quantize_in_passes(layer, lins, groups, batches, device, config.expert_min_tokens, quantize,
                                f"{prefix}.{li}", report)
            # only now the quantized weights go in place (exactly what _quantize_one writes in one pass;
            # recomputed from the packed codes rather than holding every layer weight twice meanwhile)
            for n, lin in lins.items():
                lin.weight.data.copy_(packed[n].dequantize(torch.float32).to(device).to(lin.weight.dtype))
            groups = []
        layer_stats = {}
        for group in groups:
            stats = collect_stats(layer, {n: lins[n] for n in group}, batches, device,
                                  stop_early=config.true_sequential)
            layer_stats.update(stats)
            for n, tokens in moe.fill_expert_stats(stats, group, config.expert_min_tokens, layer_stats).items():
                report.expert_fallbacks[f"{prefix}.{li}.{n}"] = tokens  # MoE hook: pooled-statistics fallback
            for n in group:
                quantize(n, stats[n])
        if state is not None and lins:
            state.save(li, packed, report.modules[-len(lins):])
        outs = run_layer(layer, batches)
        batches = [(o, kw) for o, (_, kw) in zip(outs, batches)]
        for n, mpl in packed.items():
            set_module(layer, n, mpl)
        layers[li] = layer.to(model_device)
        if progress:
            rel = [m.rel_error for m in report.modules[-len(packed):]] or [0.0]
            bar.set_postfix(rel_err=f"{sum(rel) / len(rel):.4f}")
    config.salient_counts = counts
    model.config.quantization_config = config
    report.coverage = moe.coverage(layers, prefix, config)
    if moe.experts_modules(model):
        moe.keep_module_names(model)
    report.seconds = time.time() - t0
    return report
