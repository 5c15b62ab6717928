"""Walking a decoder: its layer list, the Linears it converts, the inputs each layer sees, and the
per-Linear input statistics (the hooks that calibration needs)."""
from __future__ import annotations

import torch
from torch import nn

from gift_quant.core.saliency import ActivationStats
from gift_quant.errors import GiftError


class StopForward(Exception):
    """Raised by a hook once it has what it needs; the rest of the forward is not computed."""


def decoder_layers(model) -> tuple[nn.ModuleList, str]:
    for prefix in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in prefix.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj, prefix
    raise GiftError(f"unsupported architecture {type(model).__name__}: no decoder layer list found")


def linears(module: nn.Module, config, prefix: str = "") -> dict[str, nn.Linear]:
    """The Linears of ``module`` that ``config`` converts (names relative to ``module``; ``prefix`` makes
    them full names for the exclusion rule)."""
    return {n: m for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and config.is_converted(f"{prefix}.{n}" if prefix else n)}


@torch.no_grad()
def capture_inputs(model, samples: torch.Tensor, batch_size: int, device) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments that reach the first decoder layer, per batch."""
    layers, _ = decoder_layers(model)
    captured = []

    def hook(_mod, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append((h.to(device), to_device(kw, device)))
        raise StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, samples.shape[0], batch_size):
            try:
                model(samples[i:i + batch_size].to(model.device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def run_layer(layer, batches):
    """Layer outputs per batch; batches kept off the layer's device (offloaded) move over one at a time."""
    dev = next(layer.parameters()).device
    outs = []
    for h, kw in batches:
        o = layer(h.to(dev), **to_device(kw, dev))
        o = o[0] if isinstance(o, (tuple, list)) else o
        outs.append(o.to(h.device))
    return outs


def activation_device(samples: torch.Tensor, hidden: int, device: torch.device) -> torch.device:
    """Keep calibration activations on the compute device when they fit comfortably, else on CPU."""
    if device.type != "cuda":
        return device
    need = samples.numel() * hidden * 4 * 2  # inputs and outputs of a layer, fp32
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.4 * free else torch.device("cpu")


def stages(layer, lins: dict, batch) -> list[list[str]]:
    """The Linears of ``layer`` in forward order, grouped by shared input (q/k/v, o, gate/up, down)."""
    order: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def fn(_mod, inp, _out):
            order.append((name, inp[0]))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
    try:
        run_layer(layer, [batch])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, x in order:
        if any(name in g for g in groups):
            continue  # a Linear called twice keeps its first position
        if groups and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    order.clear()
    missing = [n for n in lins if not any(n in g for g in groups)]
    return groups + ([missing] if missing else [])


def collect_stats(layer, lins, batches, device, stop_early: bool = False) -> dict:
    """Input statistics per Linear; Linears fed the very same tensor (q/k/v, gate/up) share one.
    With ``stop_early`` the forward stops once every Linear in ``lins`` has fired (later stages'
    compute is not needed for these statistics)."""
    stats, alias, seen = {}, {}, []
    fired: set[str] = set()

    def hook(name):
        def fn(_mod, inp, _out):
            x = inp[0]
            fired.add(name)
            for t, leader in seen:  # identity, not address: the held reference keeps t alive
                if t is x:
                    alias[name] = leader
                    break
            else:
                seen.append((x, name))
                if name not in stats:
                    stats[name] = ActivationStats(x.shape[-1], device=device)
                stats[name].add(x)
            if stop_early and len(fired) == len(lins):
                raise StopForward
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
    try:
        for b in batches:
            seen.clear()
            fired.clear()
            try:
                run_layer(layer, [b])
            except StopForward:
                pass
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    for n, leader in alias.items():
        stats[n] = stats[leader]
    return stats


def stat_passes(lins: dict, memory_gb: float) -> list[list[str]]:
    """The Linears of a layer split into calibration passes whose Hessians (in^2 fp32 each, counted as if
    no two shared an input) fit ``memory_gb``; one pass when they all fit. A Linear that alone exceeds
    the budget gets a pass of its own."""
    budget, passes, cur, used = memory_gb * 2**30, [], [], 0
    for n, m in lins.items():
        need = m.in_features ** 2 * 4 + m.in_features * 8
        if cur and used + need > budget:
            passes.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += need
    return passes + [cur] if cur else passes


def check_fits(model, config, train_seq_len: int | None = None) -> None:
    """Refuse before any long work: k larger than a layer, or windows longer than the model's context."""
    layers, prefix = decoder_layers(model)
    for li, layer in enumerate(layers):
        for n, lin in linears(layer, config, f"{prefix}.{li}").items():
            config.salient_for(lin.in_features, f"{prefix}.{li}.{n}")
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for flag, n in (("--seq-len", config.seq_len), ("--train-seq-len", train_seq_len)):
        if isinstance(ctx, int) and n is not None and n > ctx:
            raise GiftError(f"{flag} {n} is longer than the model's context window ({ctx} tokens)")
