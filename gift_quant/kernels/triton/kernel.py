"""Triton kernels for the mixed-precision linear (layout: :mod:`gift_quant.kernels.triton.layout`).

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

from . import launch
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


@triton.jit
def _split_run(pid_k, T, SPLIT: tl.constexpr):
    """Split k's balanced run of T steps: [k*T/SPLIT, (k+1)*T/SPLIT)."""
    return pid_k * T // SPLIT, (pid_k + 1) * T // SPLIT


@triton.jit
def _group_scale_zero(s_ptr, z_ptr, g, offs_n, nmask, Np):
    """Group g's scale and zero-point + 2^23 (for the mantissa trick) for the columns offs_n."""
    sc = tl.load(s_ptr + g * Np + offs_n, mask=nmask, other=0.0).to(tl.float32)
    zf = tl.load(z_ptr + g * Np + offs_n, mask=nmask, other=0).to(tl.float32) + 8388608.0
    return sc, zf


@triton.jit
def _x_at(xrows, perm_ptr, pos, K, mmask, EVEN_K: tl.constexpr, IDENTITY: tl.constexpr):
    """x of the token rows at layout positions pos: direct (identity order, no padding), masked past K
    (identity order), or through the permutation (-1: a padding position, zero)."""
    if EVEN_K:
        xv = tl.load(xrows + pos[None, :], mask=mmask[:, None], other=0.0)
    elif IDENTITY:
        xv = tl.load(xrows + pos[None, :], mask=mmask[:, None] & (pos < K)[None, :], other=0.0)
    else:
        src = tl.load(perm_ptr + pos)
        xv = tl.load(xrows + src[None, :], mask=mmask[:, None] & (src >= 0)[None, :], other=0.0)
    return xv


@triton.jit
def _fp16_step(si_ptr, sw_ptr, xrows, ks, offs_n, nmask, mmask, Np):
    """FP16-column step ks: the x values of those input columns [MB, len(ks)] and their weights [len(ks), BN]."""
    si = tl.load(si_ptr + ks)
    sw = tl.load(sw_ptr + ks[:, None] * Np + offs_n[None, :], mask=nmask[None, :], other=0.0)
    xs = tl.load(xrows + si[None, :], mask=mmask[:, None], other=0.0)
    return xs, sw


@triton.jit(do_not_specialize=["M", "N", "T", "TPG", "TS", "stride_xm", "stride_ym"])
def _splitk_kernel(x_ptr, qw_ptr, perm_ptr, s_ptr, z_ptr, sw_ptr, si_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
                   M, K, N, Np, T, TPG, TS, stride_xm, stride_ym,
                   BITS: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, MB: tl.constexpr, SPLIT: tl.constexpr,
                   IDENTITY: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                   STAGES: tl.constexpr):
    """Split-K decode: program (n, k) takes BN columns, the k-th of SPLIT balanced runs of weight tiles (W chunks, 32*W
    rows, one group) and the k-th run of FP16-column steps, and applies each weight to all MB
    token slots. Sub-row s of a tile covers positions t*32*W + s*W + [0, W): W contiguous x values.
    The partial sums meet in ``ws``: ATOMIC adds into [MB, Np] (order of arrival: not deterministic),
    otherwise each split stores its own slice [SPLIT, MB, Np] and the last program of the column block
    (an arrival counter in ``lock``) sums them in split order (deterministic). The last program also
    writes y, re-zeroes what it read (ATOMIC) and resets the counter, so the next call (or graph replay) starts clean."""
    PPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    NPL: tl.constexpr = 2 if BITS == 3 else BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < Np
    offs_w = tl.arange(0, W)
    offs_m = tl.arange(0, MB)
    mmask = offs_m < M
    xrows = x_ptr + offs_m[:, None] * stride_xm                                   # [MB, 1]
    acc = tl.zeros((MB, W, BN), dtype=tl.float32)
    t0, t1 = _split_run(pid_k, T, SPLIT)  # balanced runs of weight tiles
    for t in tl.range(t0, t1, num_stages=STAGES):
        sc, zf = _group_scale_zero(s_ptr, z_ptr, t // TPG, offs_n, nmask, Np)
        wp = qw_ptr + (t * W + offs_w)[:, None] * (BITS * Np) + offs_n[None, :]   # plane 0 of each chunk
        if BITS == 3:
            wh = tl.load(wp + 2 * Np, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True)
        else:
            wh = tl.zeros((W, BN), dtype=tl.uint32)
        if MB == 1:  # one accumulator more, one FMUL per code less: the scale once per 32 codes
            part = tl.zeros((MB, W, BN), dtype=tl.float32)
        for p in tl.static_range(NPL):
            wl = tl.load(wp + p * Np, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True)  # logical shifts
            for j in tl.static_range(PPW):
                code = _codes(BITS, p, j, wl, wh)
                f = (code | 0x4B000000).to(tl.float32, bitcast=True) - zf[None, :]  # code - z, exact
                pos = t * (32 * W) + (p * PPW + j) * W + offs_w
                xv = _x_at(xrows, perm_ptr, pos, K, mmask, EVEN_K, IDENTITY)
                if MB == 1:
                    part += xv.to(tl.float32)[:, :, None] * f[None, :, :]
                else:  # the scale on the weight, so registers stay one accumulator per token
                    acc += xv.to(tl.float32)[:, :, None] * (f * sc[None, :])[None, :, :]
        if MB == 1:
            acc += part * sc[None, None, :]
    u0, u1 = _split_run(pid_k, TS, SPLIT)
    for u in range(u0, u1):  # FP16 columns: W of them per step (k padded with zero weights)
        xs, sw = _fp16_step(si_ptr, sw_ptr, xrows, u * W + offs_w, offs_n, nmask, mmask, Np)
        acc += xs.to(tl.float32)[:, :, None] * sw.to(tl.float32)[None, :, :]
    _splitk_finish(tl.sum(acc, axis=1), b_ptr, y_ptr, ws_ptr, lock_ptr, pid_n, pid_k, offs_n, offs_m, M, N, Np,
                   stride_ym, MB, BN, SPLIT, HAS_BIAS, ATOMIC)


@triton.jit(do_not_specialize=["M", "N", "T", "TPG", "TS", "stride_xm", "stride_ym"])
def _splitk_dot_kernel(x_ptr, qw_ptr, perm_ptr, s_ptr, z_ptr, sw_ptr, si_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
                       M, K, N, Np, T, TPG, TS, stride_xm, stride_ym,
                       BITS: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, MB: tl.constexpr,
                       SPLIT: tl.constexpr, IDENTITY: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ATOMIC: tl.constexpr, STAGES: tl.constexpr, IEEE: tl.constexpr):
    """Split-K for 2-16 tokens on tensor cores: the same work split as ``_splitk_kernel``, but each tile is
    dequantized to (code - zero) in the activation dtype (exact: |code - zero| <= 255) as a [32*W, BN]
    operand of one ``tl.dot`` with the [MB >= 16, 32*W] x tile (W contiguous x values per sub-row, so
    the x tile is one contiguous run); the group's scale multiplies the [MB, BN] product once."""
    PPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    BK: tl.constexpr = 32 * W
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < Np
    offs_m = tl.arange(0, MB)
    mmask = offs_m < M
    q = tl.arange(0, BK)                       # position in the tile: sub-row q // W of chunk q % W
    sub = q // W
    word = (q % W) * BITS + sub // PPW         # word of the tile (chunk-major, plane-minor)
    if BITS == 3:
        shift = (2 * (sub % 16)).to(tl.uint32)
    else:
        shift = (BITS * (sub % PPW)).to(tl.uint32)
    xrows = x_ptr + offs_m[:, None] * stride_xm
    xdt = x_ptr.dtype.element_ty
    acc = tl.zeros((MB, BN), dtype=tl.float32)
    t0, t1 = _split_run(pid_k, T, SPLIT)  # balanced runs of weight tiles
    for t in tl.range(t0, t1, num_stages=STAGES):
        sc, zf = _group_scale_zero(s_ptr, z_ptr, t // TPG, offs_n, nmask, Np)
        wp = qw_ptr + (t * (W * BITS) + word)[:, None] * Np + offs_n[None, :]
        wv = tl.load(wp, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True)
        if BITS == 3:
            hp = qw_ptr + (t * (W * 3) + (q % W) * 3 + 2)[:, None] * Np + offs_n[None, :]
            wh = tl.load(hp, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True)
            code = ((wv >> shift[:, None]) & 3) | (((wh >> sub.to(tl.uint32)[:, None]) & 1) << 2)
        else:
            code = (wv >> shift[:, None]) & ((1 << BITS) - 1)
        f = ((code | 0x4B000000).to(tl.float32, bitcast=True) - zf[None, :]).to(xdt)
        pos = t * BK + q
        xt = _x_at(xrows, perm_ptr, pos, K, mmask, EVEN_K, IDENTITY)
        if IEEE:
            part = tl.dot(xt, f, input_precision="ieee")
        else:
            part = tl.dot(xt, f)
        acc += part * sc[None, :]
    offs_k = tl.arange(0, 32)
    u0, u1 = _split_run(pid_k, TS, SPLIT)
    for u in range(u0, u1):  # FP16 columns, 32 per step (k padded with zero weights)
        xs, sw = _fp16_step(si_ptr, sw_ptr, xrows, u * 32 + offs_k, offs_n, nmask, mmask, Np)
        if IEEE:
            acc += tl.dot(xs, sw.to(xdt), input_precision="ieee")
        else:
            acc += tl.dot(xs, sw.to(xdt))
    _splitk_finish(acc, b_ptr, y_ptr, ws_ptr, lock_ptr, pid_n, pid_k, offs_n, offs_m, M, N, Np, stride_ym,
                   MB, BN, SPLIT, HAS_BIAS, ATOMIC)


@triton.jit
def _splitk_finish(y, b_ptr, y_ptr, ws_ptr, lock_ptr, pid_n, pid_k, offs_n, offs_m, M, N, Np, stride_ym,
                   MB: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ATOMIC: tl.constexpr):
    """The cross-split reduction of a [MB, BN] fp32 partial, then bias and the store of y."""
    mmask = offs_m < M
    nmask = offs_n < Np
    omask = mmask[:, None] & (offs_n < N)[None, :]
    offs_mn = offs_m[:, None] * Np + offs_n[None, :]
    if SPLIT > 1:
        wmask = mmask[:, None] & nmask[None, :]
        if ATOMIC:
            tl.atomic_add(ws_ptr + offs_mn, y, mask=wmask, sem="relaxed")  # ordered by the counter below
        else:
            tl.store(ws_ptr + pid_k * (MB * Np) + offs_mn, y, mask=wmask)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + pid_n, 1)  # acq_rel: orders this program's partials before it
        if arrived == SPLIT - 1:
            if ATOMIC:
                wsi = ws_ptr.to(tl.pointer_type(tl.int32))  # exchange the bits: read and re-zero at L2
                y = tl.atomic_xchg(wsi + offs_mn, tl.zeros((MB, BN), dtype=tl.int32), mask=wmask, sem="relaxed")
                y = y.to(tl.float32, bitcast=True)
            else:
                y = tl.zeros((MB, BN), dtype=tl.float32)
                for k in range(SPLIT):
                    y += tl.load(ws_ptr + k * (MB * Np) + offs_mn, mask=wmask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(lock_ptr + pid_n, 0)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["M", "K", "N", "C", "KS", "stride_xm", "stride_ym"])
def _gemm_kernel(x_ptr, qw_ptr, perm_ptr, gch_ptr, s_ptr, z_ptr, sw_ptr, si_ptr, b_ptr, y_ptr,
                 M, K, N, Np, C, KS, stride_xm, stride_ym,
                 BITS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                 IDENTITY: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, TW: tl.constexpr):
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
        if IDENTITY:  # identity positions: slot (chunk, sub-row) -> position, no perm load
            src = (ch // TW) * (32 * TW) + sub * TW + ch % TW
            xm = src < K
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
                    BITS: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, IDENTITY: tl.constexpr,
                    TW: tl.constexpr):
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
            if IDENTITY:  # slot (chunk, sub-row) -> position
                dst = (ch // TW) * (32 * TW) + (p * PPW + j) * TW + ch % TW
                ok = cmask & (dst < K)
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
                          BITS=L.bits, W=W, BN=BN, IDENTITY=L.identity_rows, TW=L.tile, num_warps=4)
    if L.sal_w.shape[0]:
        w.index_add_(0, L.sal_idx, L.sal_w.to(dtype))  # padding entries add 0 to feature 0
    return w


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


SPLITK_MAX_TOKENS = 16
PROGRAMS_PER_SM = 8
_sm_count: dict = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _sm_count:
        _sm_count[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _sm_count[key]


def splitk_config(M: int, Np: int, tiles: int, tile: int, device: torch.device) -> dict:
    """Kernel, tile and split for the split-K decode: 'fma' (CUDA cores, 1 token) or 'dot' (tensor cores,
    2-16 tokens in a 16-row x tile); BN columns per program and as many K splits as give PROGRAMS_PER_SM
    programs per SM, at least one tile each."""
    kernel = "fma" if M == 1 else "dot"
    MB = 1 if kernel == "fma" else 16
    if INTERPRET:  # programs run one by one: few, but more than one split so the reduction is exercised
        BN = min(64, max(16, _next_pow2(Np)))
        split = min(3, max(1, tiles))
        return dict(KERNEL=kernel, BN=BN, MB=MB, SPLIT=split, num_warps=4, STAGES=1, ATOMIC=False)
    warps = 4
    BN = 256 if kernel == "fma" else 128  # fma: 8 columns per thread share each x value; dot: 8.1 vs 11.1
    # SASS instructions per code at 4 bits than BN 64 (triton 3.6, sm_90a)
    target = PROGRAMS_PER_SM * sm_count(device)
    if kernel == "fma" and -(-Np // BN) * tiles < target:
        BN = 128  # too few tiles to split further (4096x4096): narrower column blocks instead
    blocks = -(-Np // BN)
    split = max(1, min(tiles, -(-target // blocks)))
    return dict(KERNEL=kernel, BN=BN, MB=MB, SPLIT=split, num_warps=warps, STAGES=2, ATOMIC=False)


def gemm_config(M: int, N: int) -> dict:
    BM = 16 if M <= 16 else 32 if M <= 32 else 64
    BN = 32 if M <= 64 else 64
    return dict(BM=BM, BK=64, BN=BN, num_warps=4)


class _Workspace:
    """fp32 partial sums and per-column-block arrival counters of the split-K kernel, per device and
    reduction (the atomic one must start at zero; the ordered one overwrites its slices).

    The kernel leaves the counters (and the atomic sums) as it found them, zeros, so one buffer serves
    every layer and every graph replay on a stream. It only grows outside graph capture, and a grown-out buffer is kept alive, since
    a captured graph may still point at it.

    Eager calls on a second CUDA stream get buffers of their own (two streams sharing counters would mix
    their partial sums); graph capture uses the first stream's, which prepare_model warmed up."""

    def __init__(self):
        self.bufs: dict = {}
        self.retired: list = []
        self.primary: dict = {}

    def get(self, device: torch.device, floats: int, counters: int, atomic: bool):
        stream = None
        if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            s = torch.cuda.current_stream(device).cuda_stream
            stream = None if self.primary.setdefault((device, atomic), s) == s else s
        key = (device, atomic, stream)
        ws, lock = self.bufs.get(key, (None, None))
        if ws is None or ws.numel() < floats or lock.numel() < counters:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("gift-quant: the split-K workspace must grow during CUDA-graph capture; "
                                   "call gift_quant.nn.dispatch.prepare_model(model) first")
            if ws is not None:
                self.retired.append((ws, lock))
            floats = max(floats, 0 if ws is None else ws.numel(), 1 << 16)
            counters = max(counters, 0 if lock is None else lock.numel(), 1024)
            ws = torch.zeros(floats, dtype=torch.float32, device=device)
            lock = torch.zeros(counters, dtype=torch.int32, device=device)
            self.bufs[key] = (ws, lock)
        return ws, lock


WORKSPACE = _Workspace()


def _check(x: torch.Tensor, L: TritonLayout):
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("the Triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 set before "
                           "gift_quant's Triton kernels are imported (CPU check mode)")
    if x.device != L.qweight.device:
        raise RuntimeError(f"input on {x.device}, weights on {L.qweight.device}")


def _outputs(x2d: torch.Tensor, L: TritonLayout):
    """y (allocated), x with unit column stride, and the bias argument (the scales stand in without a bias:
    HAS_BIAS leaves it unread)."""
    y = _alloc(x2d.shape[0], L.out_features, dtype=x2d.dtype, device=x2d.device)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    return y, x2d, L.bias if L.bias is not None else L.scales


def splitk(x2d: torch.Tensor, L: TritonLayout, config: dict | None = None) -> torch.Tensor:
    """The split-K decode kernels on up to SPLITK_MAX_TOKENS tokens (more: split into such calls)."""
    M, K = x2d.shape
    N, Np = L.out_features, L.qweight.shape[1]
    y, x2d, bias = _outputs(x2d, L)
    if M == 0:
        return y
    T, KS = L.tiles, L.sal_w.shape[0]
    even = L.identity_rows and K == L.chunks * 32
    for m0 in range(0, M, SPLITK_MAX_TOKENS):
        xs, ys = x2d[m0:m0 + SPLITK_MAX_TOKENS], y[m0:m0 + SPLITK_MAX_TOKENS]
        m = xs.shape[0]
        cfg = {**splitk_config(m, Np, T, L.tile, x2d.device), **(config or {})}
        BN, MB, split, atomic = cfg["BN"], cfg["MB"], cfg["SPLIT"], cfg["ATOMIC"]
        if cfg["KERNEL"] == "dot":
            MB = max(16, MB)
        blocks = triton.cdiv(Np, BN)
        ws, lock = WORKSPACE.get(x2d.device, (1 if atomic else split) * MB * Np, blocks, atomic)
        TS = KS // (L.tile if cfg["KERNEL"] == "fma" else 32)
        args = (xs, L.qweight, L.perm_pos, L.scales, L.zeros, L.sal_w, L.sal_idx, bias, ys, ws, lock,
                m, K, N, Np, T, L.group_rows // (32 * L.tile), TS, xs.stride(0), ys.stride(0))
        const = dict(BITS=L.bits, W=L.tile, BN=BN, MB=MB, SPLIT=split, IDENTITY=L.identity_rows, EVEN_K=even,
                     HAS_BIAS=L.bias is not None, ATOMIC=atomic, STAGES=cfg["STAGES"], num_warps=cfg["num_warps"])
        if cfg["KERNEL"] == "dot":
            fn = _splitk_dot_kernel
            const["IEEE"] = x2d.dtype == torch.float32
        else:
            fn = _splitk_kernel
        if INTERPRET:
            fn[(blocks, split)](*args, **const)
        else:
            key = (fn.__name__, tuple(const.items()), xs.dtype, xs.data_ptr() % 16 == 0, ys.data_ptr() % 16 == 0)
            launch.launch(fn, (blocks, split, 1), args, const, _direct_cache(L), key, ys, check=not atomic)
    return y


def _direct_cache(L: TritonLayout) -> dict:
    c = L.__dict__.get("_direct")
    if c is None:
        c = L.__dict__["_direct"] = {}
    return c


def mixed_linear(x2d: torch.Tensor, L: TritonLayout, path: str = "gemv", config: dict | None = None) -> torch.Tensor:
    """y [M, N] = x2d [M, K] @ W^T (+ bias) with the layout's weights; ``path`` is 'gemv' (the split-K
    decode kernel), 'gemm' or 'dequant' (W^T written once in the activation dtype, then the library GEMM);
    ``config`` overrides the tile choice (benchmark sweeps)."""
    _check(x2d, L)
    M, K = x2d.shape
    N, Np = L.out_features, L.qweight.shape[1]
    if path == "gemv":
        return splitk(x2d, L, config)
    if path == "dequant":
        if M == 0:
            return _alloc(M, N, dtype=x2d.dtype, device=x2d.device)
        wt = dequantize_t(L, x2d.dtype)[:, :N]
        return torch.addmm(L.bias, x2d, wt) if L.bias is not None else x2d @ wt
    if path != "gemm":
        raise ValueError(f"path must be 'gemv', 'gemm' or 'dequant', got {path!r}")
    y, x2d, bias = _outputs(x2d, L)
    if M == 0:
        return y
    cfg = {**gemm_config(M, N), **(config or {})}
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(Np, cfg["BN"]))
    _gemm_kernel[grid](x2d, L.qweight, L.perm, L.gchunk, L.scales, L.zeros, L.sal_w, L.sal_idx, bias, y,
                       M, K, N, Np, L.chunks, L.sal_w.shape[0], x2d.stride(0), y.stride(0),
                       BITS=L.bits, BM=cfg["BM"], BK=cfg["BK"], BN=cfg["BN"],
                       IDENTITY=L.identity_rows, TW=L.tile, HAS_BIAS=L.bias is not None,
                       IEEE=x2d.dtype == torch.float32, num_warps=cfg["num_warps"])
    return y
