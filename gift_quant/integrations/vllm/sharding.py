"""Tensor-parallel sharding and shard merging of gift layers, as pure functions on tensors.

vLLM splits a column-parallel Linear by output and a row-parallel one by input, then sums the
row-parallel partial outputs across ranks. A gift layer is ``y = x @ dequant(base)^T + x[:, idx] @ W_s^T``,
so each split is exact when:

- by output (:func:`shard_outputs`): every per-output tensor (``qweight`` columns, ``scales``,
  ``qzeros``, ``salient_weight`` rows, ``bias``) takes its slice; ``g_idx`` and ``salient_idx`` stay;
- by input (:func:`shard_inputs`): ``qweight`` keeps the rows of the slice (repacked from its first
  row), ``g_idx`` is re-indexed to the groups the slice uses (so act-order slices keep only their own
  groups), and only the salient columns inside the slice stay, re-indexed locally.

No vLLM import here: the tests check these against the unsharded layer in the main venv.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ._deps import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros


@dataclass
class GiftTensors:
    """One gift Linear's checkpoint tensors; what ``mixed_linear_forward`` takes as ``layer``."""
    qweight: torch.Tensor          # int32 [ceil(in/32)*bits, out]
    qzeros: torch.Tensor           # int32 [G, ceil(out/32)*bits]
    scales: torch.Tensor           # [G, out]
    g_idx: torch.Tensor            # int32 [in]
    salient_idx: torch.Tensor      # int32 [k]
    salient_weight: torch.Tensor   # [out, k]
    bias: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int

    @property
    def n_salient(self) -> int:
        return self.salient_idx.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        d = {k: getattr(self, k) for k in ("qweight", "qzeros", "scales", "g_idx", "salient_idx", "salient_weight")}
        if self.bias is not None:
            d["bias"] = self.bias
        return d


def codes_of(t: GiftTensors) -> torch.Tensor:
    """Integer codes [in, out]."""
    return unpack_qweight(t.qweight, t.bits, t.in_features)


def zeros_of(t: GiftTensors) -> torch.Tensor:
    """Integer zero-points [G, out]."""
    return unpack_qzeros(t.qzeros, t.bits, t.out_features)


def dequantize(t: GiftTensors, dtype=torch.float64) -> torch.Tensor:
    """The full effective weight [out, in] (reference for tests)."""
    g = t.g_idx.long()
    w = ((codes_of(t).to(dtype) - zeros_of(t)[g].to(dtype)) * t.scales[g].to(dtype)).t().contiguous()
    if t.n_salient:
        w[:, t.salient_idx.long()] = t.salient_weight.to(dtype)
    return w


def shard_outputs(t: GiftTensors, start: int, size: int) -> GiftTensors:
    """The layer restricted to outputs [start, start + size) (column parallel)."""
    if not 0 <= start <= start + size <= t.out_features:
        raise ValueError(f"output slice [{start}, {start + size}) outside 0..{t.out_features}")
    end = start + size
    zeros = zeros_of(t)[:, start:end]
    return replace(
        t, qweight=t.qweight[:, start:end].contiguous(), qzeros=pack_qzeros(zeros.contiguous(), t.bits),
        scales=t.scales[:, start:end].contiguous(), salient_weight=t.salient_weight[start:end].contiguous(),
        bias=None if t.bias is None else t.bias[start:end].contiguous(), out_features=size)


def shard_inputs(t: GiftTensors, start: int, size: int) -> GiftTensors:
    """The layer restricted to inputs [start, start + size) (row parallel; the bias is left out, since
    it is added once after the partial outputs are summed)."""
    if not 0 <= start <= start + size <= t.in_features:
        raise ValueError(f"input slice [{start}, {start + size}) outside 0..{t.in_features}")
    end = start + size
    codes = codes_of(t)[start:end]
    g = t.g_idx.long()[start:end]
    used, local_g = torch.unique(g, sorted=True, return_inverse=True)
    zeros = zeros_of(t)[used]
    sal = t.salient_idx.long()
    keep = (sal >= start) & (sal < end)
    return replace(
        t, qweight=pack_qweight(codes.t().contiguous(), t.bits), qzeros=pack_qzeros(zeros, t.bits),
        scales=t.scales[used].contiguous(), g_idx=local_g.to(torch.int32),
        salient_idx=(sal[keep] - start).to(torch.int32), salient_weight=t.salient_weight[:, keep].contiguous(),
        bias=None, in_features=size)


def even_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, size) of ``rank``'s part of ``n`` split evenly over ``world`` (vLLM's rule)."""
    if n % world:
        raise ValueError(f"{n} is not divisible by the tensor-parallel size {world}")
    size = n // world
    return rank * size, size


def merge_outputs(parts: list[GiftTensors]) -> GiftTensors | None:
    """One layer computing the concatenated outputs of ``parts`` (merged q/k/v or gate/up), or None
    when they cannot share one ``g_idx`` (act-order with different salient columns per part).

    The merged salient set is the union of the parts' sets. Where a column is salient in one part but
    not in another, the other part's base value moves into ``salient_weight`` (computed in float32;
    exact for fp32 storage) and its code becomes the zero-point, so the base still dequantizes to 0
    on every salient column.
    """
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if any(p.bits != first.bits or p.in_features != first.in_features or not torch.equal(p.g_idx, first.g_idx)
           or p.scales.shape[0] != first.scales.shape[0] or (p.bias is None) != (first.bias is None)
           for p in parts):
        return None
    union = torch.unique(torch.cat([p.salient_idx.long() for p in parts]), sorted=True)
    g = first.g_idx.long()
    codes, zeros, weights = [], [], []
    wdtype = first.salient_weight.dtype
    for p in parts:
        c, z = codes_of(p), zeros_of(p)
        extra = union[~torch.isin(union, p.salient_idx.long())]
        w = torch.zeros(p.out_features, union.numel(), dtype=torch.float32, device=p.scales.device)
        pos = torch.searchsorted(union, p.salient_idx.long())
        w[:, pos] = p.salient_weight.float()
        if extra.numel():
            ge = g[extra]
            base = (c[extra].float() - z[ge].float()) * p.scales[ge].float()  # [e, out]
            w[:, torch.searchsorted(union, extra)] = base.t()
            c[extra] = z[ge]
        codes.append(c)
        zeros.append(z)
        weights.append(w.to(wdtype))
    out = sum(p.out_features for p in parts)
    return replace(
        first, qweight=pack_qweight(torch.cat(codes, 1).t().contiguous(), first.bits),
        qzeros=pack_qzeros(torch.cat(zeros, 1), first.bits), scales=torch.cat([p.scales for p in parts], 1),
        salient_idx=union.to(torch.int32), salient_weight=torch.cat(weights, 0),
        bias=None if first.bias is None else torch.cat([p.bias for p in parts]), out_features=out)
