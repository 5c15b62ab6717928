"""Which kernel runs a mixed-precision linear, and the per-module cache of its load-time layout.

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
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from ..kernels import torch_path
from ..kernels.triton_ops import (
    GEMV_MAX_TOKENS,  # GIFT_QUANT_GEMV_MAX_TOKENS (tests patch it here)
)

BACKENDS = ("auto", "triton", "cuda", "torch")
CUDA_GEMV_MAX_TOKENS = 4  # the opt-in C++ kernel's GEMV runs one program per token: prefill path above 4
_ALIASES = {"off": "torch", "0": "torch", "false": "torch", "no": "torch", "": "auto", "pytorch": "torch"}
_CACHE_ATTR = "_gift_kernel_cache"

_warned: set = set()
_checked: dict = {}
_resolved: dict = {}  # (backend arg, env, device, dtype, bits) -> backend that runs (successes only)


def _env_reader(name: str):
    """A per-call read of one environment variable, as raw as possible: ``os.environ.get`` costs ~2 us
    (it encodes the key and decodes the value), a tenth of a decode call's host time. The raw value
    (bytes on POSIX) serves as a cache key; :func:`os.environ.get` decodes it when needed."""
    data, enc = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and enc is not None:
        key = enc(name)
        return lambda: data.get(key)
    return lambda: os.environ.get(name)


_kernel_env, _interp_env, _torch_cache_env = (_env_reader(n) for n in
                                              ("GIFT_QUANT_KERNEL", "TRITON_INTERPRET", "GIFT_QUANT_TORCH_CACHE"))


def requested_backend() -> str:
    raw = os.environ.get("GIFT_QUANT_KERNEL", "auto").strip().lower()
    name = _ALIASES.get(raw, raw)
    if name not in BACKENDS:
        raise ValueError(f"GIFT_QUANT_KERNEL={raw!r}: expected one of {', '.join(BACKENDS)}")
    return name


# --------------------------------------------------------------------------------------- torch path

def torch_cache_enabled() -> bool:
    """``GIFT_QUANT_TORCH_CACHE=1``: the PyTorch path keeps each layer's dequantized base (dense memory,
    dense speed); off by default, so a compressed model stays compressed in memory."""
    raw = _torch_cache_env()
    return raw is not None and os.environ.get("GIFT_QUANT_TORCH_CACHE", "0").strip() not in ("", "0", "false", "no")


def _dequantized_base(layer, dtype: torch.dtype) -> torch.Tensor:
    """[in, out] base in ``dtype`` with the salient rows zeroed (foreign checkpoints may hold codes there)."""
    wt = torch_path.dequantize_t(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits,
                                 layer.in_features, layer.out_features, dtype, getattr(layer, "group_size", 0) or 0)
    if layer.salient_idx.numel():
        wt.index_fill_(0, layer.salient_idx.long(), 0)
    return wt


def torch_forward(x: torch.Tensor, layer) -> torch.Tensor:
    """The PyTorch path (any device, autograd to ``salient_weight`` and x, never a dense weight grad)."""
    if torch_cache_enabled():
        wt = prepared(layer, "torch", x.dtype)
    else:
        wt = _dequantized_base(layer, x.dtype)
    y = x @ wt
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    if layer.salient_idx.numel():
        y = y + F.linear(x[..., layer.salient_idx.long()], layer.salient_weight.to(x.dtype))
    return y


# ------------------------------------------------------------------------------------ layout cache

_BASE = ("qweight", "qzeros", "scales", "g_idx", "salient_idx")
_KERNEL = _BASE + ("salient_weight", "bias")  # the kernels' layouts also hold the FP16 columns and the bias


def _tensors(layer, names) -> list:
    """The named tensors, read from a module's buffer/parameter dicts when it has them: nn.Module's
    ``__getattr__`` costs ~2 us per name, a third of a decode call's host time (bench_dispatch_overhead)."""
    b, p = getattr(layer, "_buffers", None), getattr(layer, "_parameters", None)
    if b is None or p is None:
        return [getattr(layer, n) for n in names]
    return [b[n] if n in b else p[n] if n in p else getattr(layer, n) for n in names]


def _key(layer, backend: str, dtype: torch.dtype) -> list:
    """What the cached layout was built from: identity and data_ptr catch tensors replaced by assignment
    (``.data =``, ``.to()``), ``_version`` catches in-place writes (training, ``load_state_dict``).
    A flat list, ~2x cheaper than per-tensor tuples (it runs on every eager call)."""
    key = []
    for t in _tensors(layer, _BASE if backend == "torch" else _KERNEL):
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
        return _dequantized_base(layer, dtype)
    if backend == "triton":
        from ..kernels.layout import build_layout
        return build_layout(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.salient_idx,
                            layer.salient_weight, layer.bias, layer.bits, layer.in_features,
                            layer.out_features, dtype, getattr(layer, "group_size", 0) or 0)
    from ..kernels.prepare import prepare
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
    key = _key(layer, backend, dtype)
    hit = cache.get((backend, dtype))
    if hit is None or hit[0] != key:
        hit = (key, _build(layer, backend, dtype))
        cache[(backend, dtype)] = hit
    return hit[1]


# --------------------------------------------------------------------------------------- backends

def triton_unavailable(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take x, or None."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"triton is not importable ({type(e).__name__}: {e})"
    from ..kernels import triton_ops
    if x.device.type != "cuda" and not triton_ops.interpreting():
        return f"input on {x.device.type}: the Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"
    ok = (torch.float16, torch.bfloat16, torch.float32)
    if triton_ops.interpreting() and x.device.type == "cpu":
        ok = (torch.float16, torch.float32)  # the interpreter has no bf16
    if x.dtype not in ok:
        return f"activation dtype {x.dtype} is not supported by the Triton kernels"
    return None


def cuda_unavailable(x: torch.Tensor) -> str | None:
    from ..kernels import build
    if not x.is_cuda:
        return f"input on {x.device.type}: the C++ kernel needs CUDA"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"activation dtype {x.dtype} is not supported by the C++ kernel (fp16/bf16)"
    if build.extension(warn=False) is None:
        return f"the C++ kernel is unavailable ({build.unavailable_reason()})"
    return None


def self_check(backend: str, bits: int, dtype: torch.dtype, device: torch.device) -> float | None:
    """Relative error of ``backend`` against a float64 reference on small random layers (both the decode
    and the prefill path, act-order on and off), once per (backend, bits, dtype, device); None if ok."""
    key = (backend, bits, dtype, str(device))
    if key in _checked:
        return _checked[key]
    from .mixed_linear import MixedPrecisionLinear
    worst, bad = 0.0, False
    # 8 unit roundoffs for both 16-bit types (bf16: 3.1e-2): the prefill case runs cuBLAS, whose 16-bit
    # reductions (PyTorch's default) reach ~2.6e-2 here in bf16 when emulated as a 32-way split-K, against
    # <= 7.5e-3 with fp32 reductions; a broken kernel is off by O(1)
    tol = 4 * torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 4e-3
    with torch.no_grad():
        for act, m in ((False, 1), (True, 3), (False, 20)):
            layer = MixedPrecisionLinear.random(200, 132, bits, 64, 7, bias=True, act_order=act,
                                                seed=1234 + m).to(device)
            x = torch.randn(m, 200, device=device).to(dtype)
            ref = x.double() @ layer.dequantize(torch.float64).t() + layer.bias.double()
            y = _run(backend, x, layer).double()
            err = ((y - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
            worst = max(worst, err)
            bad = bad or not bool(torch.isfinite(y).all()) or err > tol
    _checked[key] = worst if bad else None
    return _checked[key]


def _run(backend: str, x: torch.Tensor, layer, gemv_max_tokens: int | None = None,
         prefill: str | None = None) -> torch.Tensor:
    gmt = GEMV_MAX_TOKENS if gemv_max_tokens is None else gemv_max_tokens
    if backend == "triton":
        from ..kernels import triton_ops
        return triton_ops.run(x, prepared(layer, "triton", x.dtype), gmt, prefill)
    if backend == "cuda":
        from ..kernels import ops
        return ops.run_op(x, layer, prepared(layer, "cuda", x.dtype),
                          CUDA_GEMV_MAX_TOKENS if gemv_max_tokens is None else gemv_max_tokens)
    return torch_forward(x, layer)


def _warn_once(reason: str):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"gift-quant: GIFT_QUANT_KERNEL=auto: {reason}; using the PyTorch path (correct, "
                      "slower)", stacklevel=4)


def resolve(x: torch.Tensor, layer, backend: str | None = None) -> str:
    """The backend that will run x through layer: 'triton', 'cuda' or 'torch' (raises for a named backend
    that cannot run)."""
    memo = (backend, _kernel_env(), _interp_env(), x.device, x.dtype, layer.bits)
    hit = _resolved.get(memo)
    if hit is not None:
        return hit
    name = _resolve(x, layer, backend)
    if not torch.compiler.is_compiling():
        _resolved[memo] = name
    return name


def _resolve(x: torch.Tensor, layer, backend: str | None) -> str:
    name = backend or requested_backend()
    if name == "torch":
        return "torch"
    if name == "auto":
        if not _wants_kernel(x):
            return "torch"  # CPU: the PyTorch path is the intended one, no warning
        reason = triton_unavailable(x)
        if reason is None and not torch.compiler.is_compiling():
            err = self_check("triton", layer.bits, x.dtype, x.device)
            if err is not None:
                reason = f"the Triton kernel failed its self-check (bits={layer.bits}, {x.dtype}, rel. error {err:.1e})"
        if reason is not None:
            _warn_once(reason)
            return "torch"
        return "triton"
    reason = triton_unavailable(x) if name == "triton" else cuda_unavailable(x)
    if reason is None and name == "cuda" and not torch.compiler.is_compiling():
        err = self_check("cuda", layer.bits, x.dtype, x.device)
        if err is not None:
            reason = f"the C++ kernel failed its self-check (bits={layer.bits}, {x.dtype}, rel. error {err:.1e})"
    if reason is not None:
        raise RuntimeError(f"gift-quant: GIFT_QUANT_KERNEL={name}: {reason}")
    return name


def _interpreting() -> bool:
    raw = _interp_env()
    return raw is not None and raw.strip() not in (b"", b"0", "", "0")


def _wants_kernel(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def needs_autograd(x: torch.Tensor, layer) -> bool:
    return torch.is_grad_enabled() and (_tensors(layer, ("salient_weight",))[0].requires_grad or x.requires_grad)


_FROZEN_ATTR = "_gift_frozen"


class _Frozen:
    """What prepare_model fixed for one layer: backend, dtype, layout and the tuned token policy, valid
    while the same weight tensors (identity and ``_version``) and the same GIFT_QUANT_KERNEL are there."""
    __slots__ = ("backend", "dtype", "device", "layout", "gmt", "prefill", "tensors", "env", "sw")

    def __init__(self, layer, backend, dtype, layout, gmt, prefill):
        self.backend, self.dtype, self.layout, self.gmt, self.prefill = backend, dtype, layout, gmt, prefill
        self.device = layer.qweight.device
        self.sw = layer.salient_weight
        self.tensors = [(n, t, t._version) for n, t in zip(_KERNEL, _tensors(layer, _KERNEL)) if t is not None]
        self.env = _kernel_env()

    def valid(self, layer) -> bool:
        b, p = layer._buffers, layer._parameters
        for n, t, v in self.tensors:
            if (b.get(n) if n in b else p.get(n)) is not t or t._version != v:
                return False
        return self.env == _kernel_env()


def mixed_linear_forward(x: torch.Tensor, layer, backend: str | None = None) -> torch.Tensor:
    """y = x @ dequant(base)^T + x[..., salient_idx] @ salient_weight^T (+ bias), on the chosen backend."""
    fz = layer.__dict__.get(_FROZEN_ATTR)
    if (fz is not None and backend is None and x.dtype == fz.dtype and x.device == fz.device
            and not (torch.is_grad_enabled() and (x.requires_grad or fz.sw.requires_grad))
            and not torch.compiler.is_compiling() and fz.valid(layer)):
        from ..kernels import triton_ops
        return triton_ops._forward(x, fz.layout, fz.gmt, fz.prefill)  # the frozen eager route
    if needs_autograd(x, layer):
        return torch_forward(x, layer)
    return _run(resolve(x, layer, backend), x, layer)


def prepare_model(model: torch.nn.Module, dtype: torch.dtype | None = None,
                  warmup_tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 64)) -> int:
    """Build every MixedPrecisionLinear's kernel layout and compile/run its kernels once per token bucket,
    so that torch.compile and CUDA-graph capture never build or compile anything. Each such layer's backend,
    layout and token policy (the GPU's tuned table, :mod:`gift_quant.kernels.tuned`) are then frozen: an
    eager call skips the backend choice and the layout-cache key; replacing or writing a weight tensor, or
    changing GIFT_QUANT_KERNEL, falls back to the full route. Returns the number of layers on a kernel
    backend."""
    from .mixed_linear import MixedPrecisionLinear
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, MixedPrecisionLinear) or not (m.qweight.is_cuda or _interpreting()):
                continue
            dt = dtype or m.scales.dtype
            probe = torch.zeros(1, m.in_features, device=m.qweight.device, dtype=dt)
            backend = resolve(probe, m)
            if backend == "torch":
                continue
            n += 1
            gmt = prefill = None
            if backend == "triton":
                gmt, prefill = _policy(m)
            for t in warmup_tokens:
                _run(backend, torch.randn(t, m.in_features, device=m.qweight.device).to(dt), m, gmt, prefill)
            if backend == "triton":
                m.__dict__[_FROZEN_ATTR] = _Frozen(m, backend, dt, prepared(m, backend, dt), gmt, prefill)
    return n


def _policy(layer) -> tuple[int, str]:
    """(gemv_max_tokens, prefill path) for a layer: the GPU's tuned table (gift_quant.kernels.tuned), unless
    GIFT_QUANT_GEMV_MAX_TOKENS / GIFT_QUANT_TRITON_PREFILL are set, which win."""
    from ..kernels import triton_ops, tuned
    gmt, prefill = tuned.choice(layer.qweight.device, layer.bits, layer.in_features, layer.out_features)
    if os.environ.get("GIFT_QUANT_GEMV_MAX_TOKENS"):
        gmt = GEMV_MAX_TOKENS
    if os.environ.get("GIFT_QUANT_TRITON_PREFILL"):
        prefill = triton_ops.PREFILL_PATH
    return gmt, prefill


def unfreeze(model: torch.nn.Module):
    """Drop what prepare_model froze (the next calls choose and look up again)."""
    for m in model.modules():
        m.__dict__.pop(_FROZEN_ATTR, None)


def reset():
    """Forget self-check results and warnings (tests)."""
    _checked.clear()
    _warned.clear()
    _resolved.clear()
