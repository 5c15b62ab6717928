"""Which kernel runs a mixed-precision linear: the public names, by concern in their own modules.

``GIFT_QUANT_KERNEL`` picks the backend:

- ``auto`` (default): the Triton kernels on CUDA; the PyTorch path on CPU. If Triton cannot run (not
  installed, unsupported dtype, failed self-check) it falls back to the PyTorch path with ONE warning
  naming the reason;
- ``triton`` / ``cuda`` (the C++ kernel, JIT-built, opt-in until measured faster) / ``torch``: that
  backend or a clear error, never a silent fallback. ``off`` is an alias of ``torch``.

Anything that needs gradients (training the FP16 columns, LoRA on top) takes the PyTorch autograd
path: the kernels are inference-only. :func:`mixed_linear_forward` accepts any object with the layer's
attributes (qweight, qzeros, scales, g_idx, salient_idx, salient_weight, bias, bits, group_size,
in_features, out_features), so other integrations (vLLM) reuse it.

Modules: :mod:`.env` (environment switches), :mod:`.torch_forward` (the PyTorch path),
:mod:`.layout_cache` (per-module layouts), :mod:`.backends` (choice and running), :mod:`.self_check`,
:mod:`.route` (the forward, frozen or not), :mod:`.prepare` (``prepare_model``). Patch names in those
modules, not here: this module only re-exports them.
"""
from .backends import (  # noqa: F401
    GEMV_MAX_TOKENS,
    cuda_unavailable,
    reset,
    resolve,
    run,
    self_check,
    triton_unavailable,
    warn_once,
)
from .env import BACKENDS, CUDA_GEMV_MAX_TOKENS, requested_backend  # noqa: F401
from .layout_cache import (  # noqa: F401
    BASE_TENSORS,
    KERNEL_TENSORS,
    layout_key,
    module_tensors,
    prepared,
)
from .prepare import prepare_model, token_policy, unfreeze  # noqa: F401
from .route import FROZEN_ATTR, Frozen, mixed_linear_forward, needs_autograd  # noqa: F401
from .torch_forward import torch_cache_enabled, torch_forward  # noqa: F401
