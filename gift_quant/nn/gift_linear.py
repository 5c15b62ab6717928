"""``GiftLinear``: the GIFT-SW training module.

    y = x @ (base + noise)^T + x[..., idx] @ salient_weight^T (+ bias)

- ``base`` [out, in] is a frozen buffer (no grad, ever): the FP weight for ``pre`` or the dequantized
  codes of a :class:`MixedPrecisionLinear` for ``post``. Its salient columns are zero, so the FP
  columns live only in ``salient_weight``: nothing is stored twice.
- ``salient_weight`` [out, k] is the only trainable tensor (fp32 master copy).
- In training mode each forward adds quantization noise (:mod:`gift_quant.core.noise`) to the non-salient
  columns, std half the quantizer's step of each group (``delta`` [out, G], ``g_idx`` [in]), freshly
  sampled per call from a seed drawn from torch's global RNG. The backward pass
  regenerates the same noise from that seed instead of keeping a perturbed copy of the weight.
- A custom autograd Function computes grad(salient_weight) = grad_out^T @ x[..., idx] and
  grad(x) = grad_out @ (base + noise) (+ the salient part): a dense weight gradient is never formed,
  except for the opt-in ``scale_mult`` [out, G] (post, ``train_scales``): the stored scale of every group
  is multiplied by it, so the codes stay frozen while the quantization grid trains. Its gradient needs the
  dense grad_out^T @ x once per call (about one more forward's worth of matmul).
- In eval mode there is no noise: the output is deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gift_quant.core import noise as qni
from gift_quant.errors import GiftError


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _weight(base, idx, delta, g_idx, kind, seed, dtype, mult=None):
    if mult is not None:
        w = base.to(dtype) * mult.to(dtype)[:, g_idx]  # scaled codes; salient slots of base are 0
    else:  # without noise the buffer itself (no copy when the dtype matches)
        w = base.to(dtype, copy=seed is not None)
    if seed is None:
        return w
    w.add_(qni.sample(w.shape, delta, g_idx, kind, seed, w.device, dtype))
    if idx.numel():
        w[:, idx] = 0
    return w


class _GiftLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, salient_weight, base, idx, delta, g_idx, bias, kind, seed, mult):
        dt = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dt)
            w = _weight(base, idx, delta, g_idx, kind, seed, dt, mult)
            y = F.linear(xc, w, None if bias is None else bias.to(dt))
            del w
            x_sal = xc[..., idx]
            if idx.numel():
                y = y + F.linear(x_sal, salient_weight.to(dt))
        train_mult = mult is not None and ctx.needs_input_grad[9]
        ctx.save_for_backward(x_sal, salient_weight, base, idx, delta, g_idx, mult, x if train_mult else None)
        ctx.kind, ctx.seed, ctx.dt, ctx.x_dtype = kind, seed, dt, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x_sal, salient_weight, base, idx, delta, g_idx, mult, x = ctx.saved_tensors
        dt = ctx.dt
        gy = gy.to(dt)
        gx = gs = gm = None
        if ctx.needs_input_grad[0]:
            w = _weight(base, idx, delta, g_idx, ctx.kind, ctx.seed, dt, mult)
            gx = gy @ w
            del w
            if idx.numel():
                gx.index_add_(-1, idx, gy @ salient_weight.to(dt))
            gx = gx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            out, k = salient_weight.shape
            gs = gy.reshape(-1, out).t().to(salient_weight.dtype) @ x_sal.reshape(-1, k).to(salient_weight.dtype)
        if mult is not None and ctx.needs_input_grad[9]:
            # d w[r, j] / d mult[r, g(j)] = base[r, j]: sum grad_W * base over each group's columns
            out, inf = base.shape
            acc = torch.promote_types(dt, torch.float32)  # fp32 at least: sums over every token
            gw = gy.reshape(-1, out).t().to(acc) @ x.reshape(-1, inf).to(acc)
            gm = torch.zeros_like(mult, dtype=acc).index_add_(1, g_idx, gw.mul_(base.to(acc))).to(mult.dtype)
        return gx, gs, None, None, None, None, None, None, None, gm


class GiftLinear(nn.Module):
    """Frozen base + trainable FP salient columns + training-time quantization noise."""

    def __init__(self, base: torch.Tensor, salient_idx: torch.Tensor, salient_weight: torch.Tensor,
                 bias: torch.Tensor | None = None, bits: int = 4, noise: str = "gaussian",
                 noise_bits: int | None = None, mode: str = "pre", delta: torch.Tensor | None = None,
                 g_idx: torch.Tensor | None = None, group_size: int = 128, sym: bool = False,
                 clip_search: bool = True):
        super().__init__()
        qni.check_kind(noise)
        out_f, in_f = base.shape
        idx = salient_idx.to(device=base.device, dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= in_f or idx.unique().numel() != idx.numel()):
            raise GiftError("salient_idx out of range or repeated")
        if tuple(salient_weight.shape) != (out_f, idx.numel()):
            raise GiftError(f"salient_weight shape {list(salient_weight.shape)} != [{out_f}, {idx.numel()}]")
        self.in_features, self.out_features = in_f, out_f
        self.bits, self.noise, self.noise_bits, self.mode = bits, noise, noise_bits or bits, mode
        base = base.detach().float()
        if idx.numel():
            base[:, idx] = 0
        self.register_buffer("base", base)
        self.register_buffer("salient_idx", idx)
        if delta is None:
            if noise != "none":  # pre: the quantizer's own step per group, at the noise bits
                delta, g_idx = qni.group_step(base, self.noise_bits, group_size, sym, idx, mse=clip_search)
            else:
                delta, g_idx = torch.zeros(out_f, 1), torch.zeros(in_f, dtype=torch.long)
        if g_idx is None or tuple(g_idx.shape) != (in_f,) or delta.ndim != 2 or delta.shape[0] != out_f:
            raise GiftError(f"noise steps must be delta [{out_f}, G] with g_idx [{in_f}]")
        self.register_buffer("delta", delta.detach().float().to(base.device))
        self.register_buffer("g_idx", g_idx.detach().long().to(base.device))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.salient_weight = nn.Parameter(salient_weight.detach().float().clone())
        self.scale_mult = None  # post + train_scales: [out, G] factor on each group's stored scale
        self._packed = None  # the MixedPrecisionLinear a post module writes back into (not a submodule)

    # ---- conversions ---------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, lin: nn.Linear, salient_idx: torch.Tensor, bits: int, noise: str = "gaussian",
                    noise_bits: int | None = None, group_size: int = 128, sym: bool = False,
                    clip_search: bool = True) -> "GiftLinear":
        """``pre``: FP base. Delta per group from the quantizer that will run (bits, groups, sym, clip)."""
        W = lin.weight.detach().float()
        idx = salient_idx.long().to(W.device)
        return cls(W.clone(), idx, W[:, idx], lin.bias, bits, noise, noise_bits, mode="pre",
                   group_size=group_size, sym=sym, clip_search=clip_search)

    @classmethod
    def from_mixed(cls, mpl, noise: str = "none", noise_bits: int | None = None,
                   train_scales: bool = False) -> "GiftLinear":
        """``post``: the frozen dequantized codes of ``mpl`` (salient slots are 0 by construction).
        Delta per group is the stored scale, so sigma = scale / 2: the real step of the codes.
        ``train_scales``: each group's scale trains too, as a factor (init 1) on the stored one."""
        base = mpl.dequantize_base(torch.float32)
        delta, g_idx = qni.stored_step(mpl.scales, mpl.g_idx, mpl.bits, noise_bits)
        m = cls(base, mpl.salient_idx.long(), mpl.salient_weight.detach(), mpl.bias, mpl.bits, noise,
                noise_bits, mode="post", delta=delta, g_idx=g_idx)
        if train_scales:
            m.scale_mult = nn.Parameter(torch.ones(m.out_features, mpl.scales.shape[0], device=base.device))
        m._packed = mpl
        return m

    def to_linear(self) -> nn.Linear:
        """``pre``: the FP weight with the trained columns written in (input to GPTQ)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.base.device, dtype=torch.float32)
        with torch.no_grad():
            w = self.base.clone()
            if self.salient_idx.numel():
                w[:, self.salient_idx] = self.salient_weight.detach()
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def to_mixed(self):
        """``post``: the same packed codes with the trained FP16 columns written back."""
        if self._packed is None:
            raise GiftError("to_mixed needs a GiftLinear made by from_mixed (post); pre modules go through GPTQ")
        mpl = self._packed
        with torch.no_grad():  # in-place copies (not through .data): they bump _version, which the kernel
            # layout cache checks, so a layout built before training is rebuilt
            mpl.salient_weight.copy_(self.salient_weight.detach().to(mpl.salient_weight.dtype))
            if self.scale_mult is not None:
                s = mpl.scales.float() * self.scale_mult.detach().t().float().to(mpl.scales.device)
                mpl.scales.copy_(s.to(mpl.scales.dtype))
        return mpl

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = None
        if self.training and self.noise != "none":
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())  # global RNG: seeded per step by the trainer
        return _GiftLinearFn.apply(x, self.salient_weight, self.base, self.salient_idx, self.delta, self.g_idx,
                                   self.bias, self.noise, seed, self.scale_mult)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.salient_idx.numel()}, "
                f"mode={self.mode}, noise={self.noise}@{self.noise_bits}bit")
