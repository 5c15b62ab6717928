"""Sequential layer-by-layer compression: salient selection, then GPTQ (or RTN), then packing.

Each decoder layer sees inputs produced by the already-quantized layers before it. The model stays on
CPU; one decoder layer at a time moves to the compute device.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import GiftConfig
from .errors import GiftError
from .gptq import gptq_quantize, layer_error, rtn_quantize
from .nn import MixedPrecisionLinear
from .saliency import ActivationStats, select_salient, sensitivity


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


class _Stop(Exception):
    pass


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


def linears(module: nn.Module, exclude=()) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and not any(n == e or n.endswith("." + e) for e in exclude)}


@torch.no_grad()
def capture_inputs(model, samples: torch.Tensor, batch_size: int, device) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments that reach the first decoder layer, per batch."""
    layers, _ = decoder_layers(model)
    captured = []

    def hook(_mod, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append((h.to(device), _to(kw, device)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, samples.shape[0], batch_size):
            try:
                model(samples[i:i + batch_size].to(model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _run_layer(layer, batches):
    """Layer outputs per batch; batches kept off the layer's device (offloaded) move over one at a time."""
    dev = next(layer.parameters()).device
    outs = []
    for h, kw in batches:
        o = layer(h.to(dev), **_to(kw, dev))
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


class _StopForward(Exception):
    """Raised by a hook once every Linear of the current stage has seen its input."""


def stages(layer, lins: dict, batch) -> list[list[str]]:
    """The Linears of ``layer`` in forward order, grouped by shared input (q/k/v, o, gate/up, down)."""
    order: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def fn(_mod, inp, _out):
            order.append((name, inp[0]))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
    try:
        _run_layer(layer, [batch])
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


def _collect_stats(layer, lins, batches, device, stop_early: bool = False) -> dict:
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
                raise _StopForward
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
    try:
        for b in batches:
            seen.clear()
            fired.clear()
            try:
                _run_layer(layer, [b])
            except _StopForward:
                pass
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    for n, leader in alias.items():
        stats[n] = stats[leader]
    return stats


def _set_module(root: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _account(report: CompressReport, mpl: MixedPrecisionLinear):
    report.original_params += mpl.in_features * mpl.out_features
    report.quantized_bits += sum(t.numel() * t.element_size() * 8 for t in
                                 [*mpl.buffers(), *mpl.parameters()] if t is not mpl.bias)


def _debug_kill_after(li: int):
    """Test hook: GIFT_QUANT_KILL_AFTER_LAYER=N kills the process (SIGKILL) once layer N is saved."""
    v = os.environ.get("GIFT_QUANT_KILL_AFTER_LAYER")
    if v is not None and int(v) == li:
        os.kill(os.getpid(), signal.SIGKILL)


class LayerState:
    """Per-layer results of an interrupted compression: one safetensors file per finished layer,
    written atomically, plus a fingerprint so a resume never mixes runs."""

    def __init__(self, root, config: GiftConfig, samples: torch.Tensor, model):
        self.root = Path(root)
        cfg = {k: v for k, v in config.to_dict().items() if k != "salient_counts"}
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
        h.update(samples.cpu().numpy().tobytes())
        h.update(str(getattr(model.config, "to_json_string", lambda: "")()).encode())
        self.fingerprint = h.hexdigest()

    def open(self, resume: bool):
        meta = self.root / "meta.json"
        if resume and meta.is_file():
            got = json.loads(meta.read_text()).get("fingerprint")
            if got != self.fingerprint:
                raise GiftError(f"cannot resume from {self.root}: it belongs to a different model, "
                                "calibration data or config")
            return
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        meta.write_text(json.dumps({"fingerprint": self.fingerprint}))

    def _path(self, li: int) -> Path:
        return self.root / f"layer_{li:05d}.safetensors"

    def has(self, li: int) -> bool:
        return self._path(li).is_file()

    def save(self, li: int, packed: dict, rows: list):
        from safetensors.torch import save_file
        t, meta = {}, {}
        for (n, mpl), row in zip(packed.items(), rows):
            for key, v in mpl.state_dict().items():
                t[f"{n}.{key}"] = v.detach().cpu().contiguous()
            t[f"{n}.__scores"] = row.scores.float().contiguous()
            meta[n] = {"name": row.name, "shape": list(row.shape), "k": row.k, "rel_error": row.rel_error,
                       "bits": mpl.bits, "group_size": mpl.group_size, "bias": mpl.bias is not None}
        tmp = self._path(li).with_suffix(".tmp")
        save_file(t, str(tmp), metadata={"modules": json.dumps(meta)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self._path(li))

    def load(self, li, lins, report: CompressReport, counts: dict, prefix: str, storage_dtype) -> dict:
        from safetensors import safe_open
        with safe_open(str(self._path(li)), framework="pt") as f:
            meta = json.loads(f.metadata()["modules"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        packed = {}
        for n, m in meta.items():
            out_f, in_f = m["shape"]
            mpl = MixedPrecisionLinear(in_f, out_f, m["bits"], m["group_size"], m["k"], m["bias"], storage_dtype)
            mpl.load_state_dict({k[len(n) + 1:]: v for k, v in t.items()
                                 if k.startswith(n + ".") and not k.endswith("__scores")})
            packed[n] = mpl
            counts[m["name"]] = m["k"]
            report.modules.append(ModuleReport(m["name"], (out_f, in_f), m["k"], mpl.salient_idx.long(),
                                               t[f"{n}.__scores"], m["rel_error"]))
            _account(report, mpl)
        return packed


@torch.no_grad()
def _quantize_one(n, lin, st, full, config, metric, salient, device, storage_dtype, packed, counts, report):
    """Select the FP16 columns of one Linear, quantize the rest, and put the quantized weight in place
    (so later stages and the next layer see the quantized output)."""
    if not torch.isfinite(st.xtx).all():
        raise GiftError(f"{full}: calibration activations contain NaN or Inf")
    W = lin.weight.data.float()
    k = config.salient_for(lin.in_features, full)
    scores = sensitivity(W, st.norm(metric.rho), metric, config.bits, config.group_size, config.sym)
    if salient is not None and full in salient:
        idx = salient[full].to(device=scores.device, dtype=torch.long).sort().values
        k = idx.numel()
    else:
        idx = select_salient(scores, k)
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
    lin.weight.data.copy_(W_eff.to(lin.weight.dtype))  # the next layer sees the quantized output
    packed[n] = mpl
    counts[full] = k
    report.modules.append(ModuleReport(full, tuple(W.shape), k, idx.cpu(), scores.cpu(), rel))
    _account(report, mpl)


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
    # MoE hook (gift_quant.compress.experts): fused experts -> one Linear per expert; warn when most stays float
    from .compress import experts as moe
    moe.split_experts(layers, config.modules_not_converted)
    moe.warn_if_mostly_float(moe.coverage(layers, prefix, config.modules_not_converted,
                                          config.explicit_exclusions()))
    model_device = next(model.parameters()).device
    batches = capture_inputs(model, samples, batch_size, model_device)
    act_dev = activation_device(samples, getattr(model.config, "hidden_size", 4096), device)
    batches = [(h.to(act_dev), _to(kw, act_dev)) for h, kw in batches]
    counts = dict(config.salient_counts)
    bar = tqdm(range(len(layers)), desc=f"{config.method} {config.bits}-bit", unit="layer", disable=not progress)
    state = LayerState(state_dir, config, samples, model) if state_dir is not None else None
    if state is not None:
        state.open(resume)
    for li in bar:
        layer = layers[li].to(device)
        lins = linears(layer, config.modules_not_converted)
        packed = {}
        if state is not None and state.has(li):
            packed = state.load(li, lins, report, counts, prefix, storage_dtype)
            for n, lin in lins.items():
                lin.weight.data.copy_(packed[n].dequantize(torch.float32).to(device, lin.weight.dtype))
            lins = {}
        if not lins:
            groups = []  # resumed layer: nothing to quantize
        elif config.true_sequential:
            groups = stages(layer, lins, batches[0])
        else:
            groups = [list(lins)]
        layer_stats = {}
        for group in groups:
            stats = _collect_stats(layer, {n: lins[n] for n in group}, batches, device,
                                   stop_early=config.true_sequential)
            layer_stats.update(stats)
            for n, tokens in moe.fill_expert_stats(stats, group, config.expert_min_tokens, layer_stats).items():
                report.expert_fallbacks[f"{prefix}.{li}.{n}"] = tokens  # MoE hook: pooled-statistics fallback
            for n in group:
                _quantize_one(n, lins[n], stats[n], f"{prefix}.{li}.{n}", config, metric, salient, device,
                              storage_dtype, packed, counts, report)
        if state is not None and lins:
            state.save(li, packed, report.modules[-len(lins):])
        outs = _run_layer(layer, batches)
        batches = [(o, kw) for o, (_, kw) in zip(outs, batches)]
        for n, mpl in packed.items():
            _set_module(layer, n, mpl)
        layers[li] = layer.to(model_device)
        if progress:
            rel = [m.rel_error for m in report.modules[-len(packed):]] or [0.0]
            bar.set_postfix(rel_err=f"{sum(rel) / len(rel):.4f}")
        _debug_kill_after(li)
    config.salient_counts = counts
    model.config.quantization_config = config
    report.coverage = moe.coverage(layers, prefix, config.modules_not_converted, config.explicit_exclusions())
    if moe.experts_modules(model):
        moe.keep_module_names(model)
    report.seconds = time.time() - t0
    return report
