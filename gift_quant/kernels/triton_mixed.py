"""Triton kernels for the mixed-precision linear (layout: :mod:`gift_quant.kernels.layout`).

- ``gemv``: decode. One program per token and ``BN`` output columns walks all of K (no split-K, no
  atomics; more tokens re-read the packed tile from L2): for each tile of ``W`` chunks it loads each word plane once as a [W, BN] tile (16-byte loads
  along N), extracts codes with shift/mask, turns them into floats with the 2^23 mantissa trick (OR +
  FSUB instead of a slow int-to-float), subtracts the chunk's zero-point and FMAs with x in fp32;
  the chunk's scale is applied once per 32 codes. The FP16 columns are more rows of the same walk.
- ``dequant``: prefill (the default). One pass writes W^T in the activation dtype, then cuBLAS: the
  bytes of one fp16 weight written and read again, against the ``gemm`` kernel's 6-12x fp16 time at 16-64
  tokens on an H200 (BENCHMARKS.md).
- ``gemm``: prefill, opt-in. ``tl.dot`` on a [BM, BK] x [BK, BN] tile whose weights are dequantized in
  registers (rounded to the activation dtype, like the PyTorch path), plus the FP16 columns.

Both run under ``TRITON_INTERPRET=1`` on CPU tensors (fp16/fp32; the interpreter has no bf16), which is
how CI checks them against a float64 reference. Set ``TRITON_INTERPRET`` before this module is imported.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import TritonLayout

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRET and type(tl.zeros).__name__ != "InterpretedFunction":
    raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; set it before (for example in "
                       "the environment of the process)")


@triton.jit
def _codes(BITS: tl.constexpr, P: tl.constexpr, J: tl.constexpr, wl, wh):
    """Codes of sub-row s = P*ppw + J of chunks ``ch`` from preloaded word tiles (wl: plane P, wh: 3-bit hi)."""
    if BITS == 3:
        lo = (wl >> (2 * J)) & 3
        S: tl.constexpr = P * 16 + J
        if S >= 2:
            hi = (wh >> (S - 2)) & 4
        else:
            hi = (wh << (2 - S)) & 4
        return lo | hi
    else:
        return (wl >> (BITS * J)) & ((1 << BITS) - 1)


@triton.jit
def _chunk_params(qw_ptr, gch_ptr, s_ptr, z_ptr, ch, cmask, offs_n, mask2, Np, BITS: tl.constexpr):
    """Per chunk and column: scale, zero-point + 2^23 (for the mantissa trick) and the 3-bit high plane."""
    g = tl.load(gch_ptr + ch, mask=cmask, other=0)
    sc = tl.load(s_ptr + g[:, None] * Np + offs_n[None, :], mask=mask2, other=0.0).to(tl.float32)
    zf = tl.load(z_ptr + g[:, None] * Np + offs_n[None, :], mask=mask2, other=0).to(tl.float32) + 8388608.0
    if BITS == 3:
        wh = tl.load(qw_ptr + (ch[:, None] * 3 + 2) * Np + offs_n[None, :], mask=mask2, other=0)
    else:
        wh = tl.zeros_like(sc).to(tl.int32)
    return sc, zf, wh


@triton.jit(do_not_specialize=["M", "K", "N", "C", "KS", "stride_xm", "stride_ym"])
def _gemv_kernel(x_ptr, qw_ptr, perm_ptr, gch_ptr, s_ptr, z_ptr, sw_ptr, si_ptr, b_ptr, y_ptr,
                 M, K, N, Np, C, KS, stride_xm, stride_ym,
                 BITS: tl.constexpr, W: tl.constexpr, BN: tl.constexpr,
                 IDENTITY: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One token (program_id 1) x BN columns (program_id 0), the whole K walk; 2-D tiles only, so x is
    loaded straight into the row layout of the weight tile."""
    PPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    NPL: tl.constexpr = 2 if BITS == 3 else BITS
    pid = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid * BN + tl.arange(0, BN)
    nmask = offs_n < Np
    offs_w = tl.arange(0, W)
    xrow = x_ptr + m * stride_xm
    acc = tl.zeros((W, BN), dtype=tl.float32)
    for c0 in range(0, C, W):
        ch = c0 + offs_w
        cmask = ch < C
        mask2 = cmask[:, None] & nmask[None, :]
        sc, zf, wh = _chunk_params(qw_ptr, gch_ptr, s_ptr, z_ptr, ch, cmask, offs_n, mask2, Np, BITS)
        part = tl.zeros((W, BN), dtype=tl.float32)
        for p in tl.static_range(NPL):
            wl = tl.load(qw_ptr + (ch[:, None] * BITS + p) * Np + offs_n[None, :], mask=mask2, other=0)
            for j in tl.static_range(PPW):
                code = _codes(BITS, p, j, wl, wh)
                f = (code | 0x4B000000).to(tl.float32, bitcast=True) - zf  # 2**23 + code - (2**23 + z), exact
                rows = ch * 32 + (p * PPW + j)
                if IDENTITY:
                    xv = tl.load(xrow + rows, mask=cmask & (rows < K), other=0.0)
                else:
                    src = tl.load(perm_ptr + rows, mask=cmask, other=-1)
                    xv = tl.load(xrow + src, mask=src >= 0, other=0.0)
                part += f * xv.to(tl.float32)[:, None]
        acc += part * sc
    for k0 in range(0, KS, W):  # FP16 columns (KS: k padded to 32 with zero weights)
        offs_k = k0 + offs_w
        kmask = offs_k < KS
        si = tl.load(si_ptr + offs_k, mask=kmask, other=0)
        sw = tl.load(sw_ptr + offs_k[:, None] * Np + offs_n[None, :], mask=kmask[:, None] & nmask[None, :],
                     other=0.0)
        xs = tl.load(xrow + si)
        acc += sw.to(tl.float32) * xs.to(tl.float32)[:, None]
    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit(do_not_specialize=["M", "K", "N", "C", "KS", "stride_xm", "stride_ym"])
def _gemm_kernel(x_ptr, qw_ptr, perm_ptr, gch_ptr, s_ptr, z_ptr, sw_ptr, si_ptr, b_ptr, y_ptr,
                 M, K, N, Np, C, KS, stride_xm, stride_ym,
                 BITS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                 IDENTITY: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    PPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mmask = offs_m < M
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < Np
    offs_r = tl.arange(0, BK)
    sub = offs_r % 32
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    xdt = x_ptr.dtype.element_ty
    for r0 in range(0, C * 32, BK):
        rows = r0 + offs_r
        ch = rows // 32
        cmask = ch < C
        mask2 = cmask[:, None] & nmask[None, :]
        g = tl.load(gch_ptr + ch, mask=cmask, other=0)
        sc = tl.load(s_ptr + g[:, None] * Np + offs_n[None, :], mask=mask2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g[:, None] * Np + offs_n[None, :], mask=mask2, other=0).to(tl.float32)
        wl = tl.load(qw_ptr + (ch[:, None] * BITS + (sub // PPW)[:, None]) * Np + offs_n[None, :], mask=mask2,
                     other=0)
        if BITS == 3:
            wh = tl.load(qw_ptr + (ch[:, None] * 3 + 2) * Np + offs_n[None, :], mask=mask2, other=0)
            code = ((wl >> (2 * (sub % 16))[:, None]) & 3) | (((wh >> sub[:, None]) & 1) << 2)
        else:
            code = (wl >> (BITS * (sub % PPW))[:, None]) & ((1 << BITS) - 1)
        w = ((code.to(tl.float32) - z) * sc).to(xdt)
        if IDENTITY:
            src = rows
            xm = rows < K
        else:
            src = tl.load(perm_ptr + rows, mask=cmask, other=-1)
            xm = src >= 0
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + src[None, :], mask=mmask[:, None] & xm[None, :],
                     other=0.0)
        if IEEE:
            acc += tl.dot(xt, w, input_precision="ieee")
        else:
            acc += tl.dot(xt, w)
    offs_s = tl.arange(0, 16)
    for k0 in range(0, KS, 16):
        ks = k0 + offs_s
        si = tl.load(si_ptr + ks)
        sw = tl.load(sw_ptr + ks[:, None] * Np + offs_n[None, :], mask=nmask[None, :], other=0.0)
        xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + si[None, :], mask=mmask[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(xs, sw, input_precision="ieee")
        else:
            acc += tl.dot(xs, sw)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=["K", "C"])
def _dequant_kernel(qw_ptr, perm_ptr, gch_ptr, s_ptr, z_ptr, w_ptr, K, Np, C,
                    BITS: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, IDENTITY: tl.constexpr):
    """W^T [K, Np] in the activation dtype: W chunks x BN columns per program, each packed row written to
    its input feature (padding rows dropped). Salient rows come out 0 (their codes are the zero-point)."""
    PPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    NPL: tl.constexpr = 2 if BITS == 3 else BITS
    ch = tl.program_id(0) * W + tl.arange(0, W)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = ch < C
    mask2 = cmask[:, None] & (offs_n < Np)[None, :]
    sc, zf, wh = _chunk_params(qw_ptr, gch_ptr, s_ptr, z_ptr, ch, cmask, offs_n, mask2, Np, BITS)
    for p in tl.static_range(NPL):
        wl = tl.load(qw_ptr + (ch[:, None] * BITS + p) * Np + offs_n[None, :], mask=mask2, other=0)
        for j in tl.static_range(PPW):
            code = _codes(BITS, p, j, wl, wh)
            v = ((code | 0x4B000000).to(tl.float32, bitcast=True) - zf) * sc
            rows = ch * 32 + (p * PPW + j)
            if IDENTITY:
                dst = rows
                ok = cmask & (rows < K)
            else:
                dst = tl.load(perm_ptr + rows, mask=cmask, other=-1)
                ok = dst >= 0
            tl.store(w_ptr + dst[:, None] * Np + offs_n[None, :], v.to(w_ptr.dtype.element_ty),
                     mask=ok[:, None] & (offs_n < Np)[None, :])


_alloc = torch.empty  # tests swap in a NaN-filled allocator: an unwritten output cannot pass


def dequantize_t(L: TritonLayout, dtype: torch.dtype) -> torch.Tensor:
    """The layer's full weight, transposed: W^T [K, Np] in ``dtype`` (FP16 columns included)."""
    K, Np = L.in_features, L.qweight.shape[1]
    w = _alloc(K, Np, dtype=dtype, device=L.qweight.device)
    if K == 0:
        return w
    W = 8 if INTERPRET else 4
    BN = min(64, max(16, _next_pow2(Np))) if INTERPRET else 128
    grid = (triton.cdiv(L.chunks, W), triton.cdiv(Np, BN))
    _dequant_kernel[grid](L.qweight, L.perm, L.gchunk, L.scales, L.zeros, w, K, Np, L.chunks,
                          BITS=L.bits, W=W, BN=BN, IDENTITY=L.identity_rows, num_warps=4)
    if L.sal_w.shape[0]:
        w.index_add_(0, L.sal_idx, L.sal_w.to(dtype))  # padding entries add 0 to feature 0
    return w


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gemv_config(M: int, N: int, C: int) -> dict:
    """(W, BN, warps) for the decode kernel: W chunks (32*W rows) x BN columns per tile."""
    W = min(32, max(4, _next_pow2(C))) if INTERPRET else 32 if C >= 64 else 8  # each variant is a compile
    BN = min(64, max(16, _next_pow2(N))) if INTERPRET else 16  # the interpreter pays per program, not per lane
    return dict(W=W, BN=BN, num_warps=4)


def gemm_config(M: int, N: int) -> dict:
    BM = 16 if M <= 16 else 32 if M <= 32 else 64
    BN = 32 if M <= 64 else 64
    return dict(BM=BM, BK=64, BN=BN, num_warps=4)


def _check(x: torch.Tensor, L: TritonLayout):
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("the Triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 set before "
                           "gift_quant's Triton kernels are imported (CPU check mode)")
    if x.device != L.qweight.device:
        raise RuntimeError(f"input on {x.device}, weights on {L.qweight.device}")


def mixed_linear(x2d: torch.Tensor, L: TritonLayout, path: str = "gemv", config: dict | None = None) -> torch.Tensor:
    """y [M, N] = x2d [M, K] @ W^T (+ bias) with the layout's weights; ``path`` is 'gemv', 'gemm' or
    'dequant' (W^T written once in the activation dtype, then the library GEMM); ``config`` overrides the
    tile choice (benchmark sweeps)."""
    _check(x2d, L)
    M, K = x2d.shape
    N, Np = L.out_features, L.qweight.shape[1]
    if path == "dequant":
        if M == 0:
            return _alloc(M, N, dtype=x2d.dtype, device=x2d.device)
        wt = dequantize_t(L, x2d.dtype)[:, :N]
        return torch.addmm(L.bias, x2d, wt) if L.bias is not None else x2d @ wt
    y = _alloc(M, N, dtype=x2d.dtype, device=x2d.device)
    if M == 0:
        return y
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    bias = L.bias if L.bias is not None else L.scales
    args = (x2d, L.qweight, L.perm, L.gchunk, L.scales, L.zeros, L.sal_w, L.sal_idx, bias, y,
            M, K, N, Np, L.chunks, L.sal_w.shape[0], x2d.stride(0), y.stride(0))
    if path == "gemv":
        cfg = {**gemv_config(M, N, L.chunks), **(config or {})}
        grid = (triton.cdiv(Np, cfg["BN"]), M)
        _gemv_kernel[grid](*args, BITS=L.bits, W=cfg["W"], BN=cfg["BN"],
                           IDENTITY=L.identity_rows, HAS_BIAS=L.bias is not None, num_warps=cfg["num_warps"])
    elif path == "gemm":
        cfg = {**gemm_config(M, N), **(config or {})}
        grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(Np, cfg["BN"]))
        _gemm_kernel[grid](*args, BITS=L.bits, BM=cfg["BM"], BK=cfg["BK"], BN=cfg["BN"],
                           IDENTITY=L.identity_rows, HAS_BIAS=L.bias is not None,
                           IEEE=x2d.dtype == torch.float32, num_warps=cfg["num_warps"])
    else:
        raise ValueError(f"path must be 'gemv', 'gemm' or 'dequant', got {path!r}")
    return y
