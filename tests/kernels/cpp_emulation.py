"""The C++ kernel's arithmetic (kernels/cuda/csrc/mixed_linear.cu) emulated on CPU, and the rounding bound it must meet.

The bound is what any implementation that accumulates in fp32 and rounds once to fp16/bf16 meets on the
operands the kernel uses (scales, FP16 columns and bias in the activation dtype; on the prefill path W
rounded once more). The GPU test holds the kernel to it; the CPU test holds this emulation to it, so a
change that loses precision (16-bit partial sums, a 16-bit reduction in cuBLAS) fails without a GPU.
"""
from __future__ import annotations

import itertools

import torch

from gift_quant.core.packing import unpack
from gift_quant.nn.mixed_linear import MixedPrecisionLinear

SMS = 132  # H100/H200: sets the gemv split-K, i.e. only the order of the fp32 additions


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _fma(a, b, c):
    """fmaf: fp32 operands, one rounding (the float64 product of two fp32 numbers is exact)."""
    return (a.double() * b.double() + c.double()).float()


def gpu_test_layers(bits: int):
    """The layers of the GPU accuracy test (test_cuda_kernel_matches_float64), in its order and with its
    seeds, as ``(where, layer)``: tools/diag_cublas_bound.py replays the same ones."""
    gen = torch.Generator().manual_seed(bits)
    cases = itertools.product([32, 64, 128, -1], [0, 1, 7, 128, 256], [False, True],
                              [(256, 512), (771, 260), (4096, 1028), (300, 333)])
    for gs, k, act, (K, N) in cases:
        k = min(k, K)
        seed = int(torch.randint(0, 10**6, (1,), generator=gen))
        layer = MixedPrecisionLinear.random(K, N, bits, gs, k, bias=bool(seed % 2), act_order=act, seed=seed)
        yield f"bits={bits} gs={gs} k={k} act={act} K={K} N={N}", layer


def operands(layer, dtype, gemv: bool):
    """(W [N, K], A [N, K], bias) in float64 as the kernel sees them; A bounds the magnitudes its fp32
    sums add up: |s|(|c| + |z|) on the gemv path, which factors s out of (c - z)."""
    g = layer.g_idx.long()
    c = layer.codes().double()
    z = layer.zeros()[g].t().double()
    s = layer.scales.to(dtype)[g].t().double()
    w = s * (c - z)
    if not gemv:  # dequant_kernel: (c - z) * s is exact in fp32, then one rounding to dtype
        w = w.to(dtype).double()
    a = s.abs() * (c.abs() + z.abs()) if gemv else w.abs()
    if layer.n_salient:
        sal = layer.salient_idx.long()
        w[:, sal] = layer.salient_weight.detach().to(dtype).double()
        a[:, sal] = w[:, sal].abs()
    b = None if layer.bias is None else layer.bias.to(dtype).double()
    return w, a, b


def rounding_bound(layer, x, gemv: bool):
    """(y_op, bound): x @ W^T + b in float64 on the kernel's operands, and per element
    u|y_op| + (1 + u) gamma_n (|x| @ A^T + |b|) + (half a subnormal step), u the unit roundoff of x's dtype,
    gamma_n = n u32 / (1 - n u32) for n fp32 roundings in any summation order (Higham, Accuracy and Stability
    of Numerical Algorithms, Sec. 3.1). n is twice the terms: room for tensor cores that truncate."""
    w, a, b = operands(layer, x.dtype, gemv)
    xd = x.double()
    y, mag = xd @ w.t(), xd.abs() @ a.t()
    if b is not None:
        y, mag = y + b, mag + b.abs()
    fi = torch.finfo(x.dtype)
    u = fi.eps / 2
    n = 2 * (layer.in_features + layer.n_salient) + 64  # chunk sums, FMAs, group folds, splits, bias
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    return y, u * y.abs() + (1 + u) * gamma * mag + u * fi.smallest_normal


def emulate_prefill(x, layer, p, reduce_splits: int = 0):
    """dequant_kernel's W^T, then a GEMM that accumulates in fp32 and rounds once (cuBLAS with reduced-
    precision reductions disallowed). reduce_splits > 0 models them allowed: a split-K whose partial sums
    and their reduction are rounded to the output dtype."""
    dt = x.dtype
    w = operands(layer, dt, gemv=False)[0].t().float()  # [K, N], values exact in dt
    b = None if layer.bias is None else layer.bias.to(dt).float()
    xf = x.float()
    if reduce_splits <= 1:
        y = xf @ w
        return (y if b is None else y + b).to(dt)
    kc, y = _ceil(xf.shape[1], reduce_splits), None
    for k0 in range(0, xf.shape[1], kc):
        part = (xf[:, k0:k0 + kc] @ w[k0:k0 + kc]).to(dt).float()
        y = part if y is None else (y + part).to(dt).float()
    return (y if b is None else y + b).to(dt)


def gemv_splits(chunks: int, k: int, N: int, MT: int, smem: int = 40 * 1024):
    """launch_gemv's split-K: (splits, chunks per split, salient rows per split)."""
    splits = min(max(1, _ceil(4 * SMS, _ceil(N, 512))), max(chunks, 1))
    cps = min(_ceil(chunks, splits), max(1, smem // 2 // ((32 * (MT + 1) + MT) * 4))) if chunks else 0
    if cps:
        splits = _ceil(chunks, cps)
    if k and _ceil(k, splits) > max(1, smem // 2 // (MT * 4)):
        splits = _ceil(k, max(1, smem // 2 // (MT * 4)))
        cps = _ceil(chunks, splits) if chunks else 0
    return splits, cps, (_ceil(k, splits) if k else 0)


def emulate_gemv(x, layer, p, round_partials: bool = False):
    """gemv_kernel in its order of fp32 operations: per split, codes FMA'd into part, sum x from chunk sums
    (or per row), the group folded as fmaf(s, fmaf(-z, xsum, part), acc), salient FMAs, bias, then the splits
    added (atomicAdd) and one rounding. round_partials rounds part and xsum to x's dtype before each fold."""
    dt, (M, _) = x.dtype, x.shape
    codes = unpack(p.qweight, p.bits, p.perm.numel()).float()  # [R, N]
    R, N = codes.shape
    k = layer.n_salient
    MT = 1 if M == 1 else 2 if M == 2 else 4 if M <= 4 else 8
    splits, cps, sps = gemv_splits(R // 32, k, N, MT)
    perm, gidx = p.perm.long(), p.gidx.long()
    xr = torch.where(perm[:, None] >= 0, x.float()[:, perm.clamp(min=0)].t(), torch.zeros(()))  # [R, M]
    scales, zeros = p.scales.float(), p.zeros.float()
    sw = layer.salient_weight.detach().to(dt).float()
    xsal = x.float()[:, layer.salient_idx.long()]
    out = torch.zeros(M, N)
    for sp in range(splits):
        acc, part, xsum, cur = torch.zeros(M, N), torch.zeros(M, N), torch.zeros(M, 1), -1

        def flush(g):
            nonlocal acc, part, xsum
            pt, xs = (part.to(dt).float(), xsum.to(dt).float()) if round_partials else (part, xsum)
            acc = _fma(scales[g].expand(M, N), _fma(-zeros[g].expand(M, N), xs.expand(M, N), pt), acc)
            part, xsum = torch.zeros(M, N), torch.zeros(M, 1)

        for c in range(sp * cps, min(sp * cps + cps, R // 32)):
            rows = range(c * 32, c * 32 + 32)
            if p.chunk_uniform:
                if int(gidx[c * 32]) != cur:
                    if cur >= 0:
                        flush(cur)
                    cur = int(gidx[c * 32])
                chunk_sum = torch.zeros(M)
                for r in rows:
                    chunk_sum = chunk_sum + xr[r]
                xsum = xsum + chunk_sum[:, None]
            for r in rows:
                if not p.chunk_uniform:
                    if int(gidx[r]) != cur:
                        if cur >= 0:
                            flush(cur)
                        cur = int(gidx[r])
                    xsum = xsum + xr[r][:, None]
                part = _fma(codes[r].expand(M, N), xr[r][:, None].expand(M, N), part)
        if cur >= 0:
            flush(cur)
        for j in range(sp * sps, min(sp * sps + sps, k)):
            acc = _fma(sw[:, j].expand(M, N), xsal[:, j:j + 1].expand(M, N), acc)
        if layer.bias is not None and sp == 0:
            acc = acc + layer.bias.to(dt).float()
        out = out + acc
    return out.to(dt)
