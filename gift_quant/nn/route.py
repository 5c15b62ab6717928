"""The forward route of a mixed-precision linear: the frozen per-layer route that prepare_model set up,
else autograd (PyTorch path) or the chosen backend. Never imports the layer class, so
:mod:`.mixed_linear` can import this module."""
from __future__ import annotations

import torch

from ..kernels.triton import op as triton_op
from . import backends
from .env import kernel_env
from .layout_cache import KERNEL_TENSORS, module_tensors
from .torch_forward import torch_forward


def needs_autograd(x: torch.Tensor, layer) -> bool:
    return torch.is_grad_enabled() and (module_tensors(layer, ("salient_weight",))[0].requires_grad or x.requires_grad)


FROZEN_ATTR = "_gift_frozen"


class Frozen:
    """What prepare_model fixed for one layer: backend, dtype, layout and the tuned token policy, valid
    while the same weight tensors (identity, ``_version`` and storage) and the same GIFT_QUANT_KERNEL are
    there. ``t.data = new`` keeps identity and version but moves the storage, hence the pointer; a write
    through ``t.data.copy_`` is invisible to every check: call ``unfreeze`` (or prepare again) after it."""
    __slots__ = ("backend", "device", "dtype", "env", "gmt", "layout", "prefill", "sw", "tensors")

    def __init__(self, layer, backend, dtype, layout, gmt, prefill):
        self.backend, self.dtype, self.layout, self.gmt, self.prefill = backend, dtype, layout, gmt, prefill
        self.device = layer.qweight.device
        self.sw = layer.salient_weight
        self.tensors = [(n, t, t._version, t.data_ptr())
                        for n, t in zip(KERNEL_TENSORS, module_tensors(layer, KERNEL_TENSORS)) if t is not None]
        self.env = kernel_env()

    def valid(self, layer) -> bool:
        b, p = layer._buffers, layer._parameters
        for n, t, v, ptr in self.tensors:
            if (b.get(n) if n in b else p.get(n)) is not t or t._version != v or t.data_ptr() != ptr:
                return False
        return self.env == kernel_env()


def mixed_linear_forward(x: torch.Tensor, layer, backend: str | None = None) -> torch.Tensor:
    """y = x @ dequant(base)^T + x[..., salient_idx] @ salient_weight^T (+ bias), on the chosen backend."""
    if not torch.compiler.is_compiling():  # first: tracing never looks at the frozen record
        fz = layer.__dict__.get(FROZEN_ATTR)
        if (fz is not None and backend is None and x.dtype == fz.dtype and x.device == fz.device
                and not (torch.is_grad_enabled() and (x.requires_grad or fz.sw.requires_grad)) and fz.valid(layer)):
            return triton_op.eager_forward(x, fz.layout, fz.gmt, fz.prefill)  # the frozen eager route
    if needs_autograd(x, layer):
        return torch_forward(x, layer)
    return backends.run(backends.resolve(x, layer, backend), x, layer)
