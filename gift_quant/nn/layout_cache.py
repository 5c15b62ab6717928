"""The per-module cache of a layer's load-time layout (kernel layouts, or the PyTorch path's dequantized
base), rebuilt when a weight tensor is replaced or written."""
from __future__ import annotations

import torch

from ..kernels import torch_path

_CACHE_ATTR = "_gift_kernel_cache"


def dequantized_base(layer, dtype: torch.dtype) -> torch.Tensor:
    """[in, out] base in ``dtype`` with the salient rows zeroed (foreign checkpoints may hold codes there)."""
    wt = torch_path.dequantize_t(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits,
                                 layer.in_features, layer.out_features, dtype, getattr(layer, "group_size", 0) or 0)
    if layer.salient_idx.numel():
        wt.index_fill_(0, layer.salient_idx.long(), 0)
    return wt


BASE_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "salient_idx")
KERNEL_TENSORS = BASE_TENSORS + ("salient_weight", "bias")  # the kernels' layouts also hold the FP16 columns and the bias


def module_tensors(layer, names) -> list:
    """The named tensors, read from a module's buffer/parameter dicts when it has them: nn.Module's
    ``__getattr__`` costs ~2 us per name, a third of a decode call's host time (bench_dispatch_overhead)."""
    b, p = getattr(layer, "_buffers", None), getattr(layer, "_parameters", None)
    if b is None or p is None:
        return [getattr(layer, n) for n in names]
    return [b[n] if n in b else p[n] if n in p else getattr(layer, n) for n in names]


def layout_key(layer, backend: str, dtype: torch.dtype) -> list:
    """What the cached layout was built from: identity and data_ptr catch tensors replaced by assignment
    (``.data =``, ``.to()``), ``_version`` catches in-place writes (training, ``load_state_dict``).
    A flat list, ~2x cheaper than per-tensor tuples (it runs on every eager call)."""
    key = []
    for t in module_tensors(layer, BASE_TENSORS if backend == "torch" else KERNEL_TENSORS):
        if t is None:
            key.append(None)
        else:
            key += (id(t), t.data_ptr(), t._version)
    return key


def _cache(layer) -> dict:
    c = layer.__dict__.get(_CACHE_ATTR)
    if c is None:
        c = {}
        layer.__dict__[_CACHE_ATTR] = c
    return c


def _build(layer, backend: str, dtype: torch.dtype):
    if backend == "torch":
        return dequantized_base(layer, dtype)
    if backend == "triton":
        from ..kernels.triton.layout import build_layout
        return build_layout(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.salient_idx,
                            layer.salient_weight, layer.bias, layer.bits, layer.in_features,
                            layer.out_features, dtype, getattr(layer, "group_size", 0) or 0)
    from ..kernels.cuda.layout import prepare
    return prepare(layer, dtype)


def prepared(layer, backend: str, dtype: torch.dtype):
    """The layer's layout for ``backend`` and ``dtype``, rebuilt when any weight tensor changed."""
    cache = _cache(layer)
    if torch.compiler.is_compiling():  # no side effects while tracing: use what eager prepared
        hit = cache.get((backend, dtype))
        if hit is None:
            raise RuntimeError("gift-quant: no kernel layout prepared for this layer; call "
                               "gift_quant.nn.dispatch.prepare_model(model) before torch.compile")
        return hit[1]
    key = layout_key(layer, backend, dtype)
    hit = cache.get((backend, dtype))
    if hit is None or hit[0] != key:
        hit = (key, _build(layer, backend, dtype))
        cache[(backend, dtype)] = hit
    return hit[1]
