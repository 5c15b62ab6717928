"""Block-wise tuning of the FP16 columns during compression (experimental).

After GPTQ has quantized one decoder layer, its FP16 columns S take a few Adam steps on

    min_S || layer_q(X_q; S) - layer_fp(X_q) ||^2

over the calibration windows: the layer with its quantized codes and trainable columns should reproduce
the float layer on the same (already drifted) inputs, as in BRECQ or OmniQuant, but only the columns move.
GPTQ leaves S at the per-Linear least-squares optimum; this objective sees the whole layer (attention,
the MLP's nonlinearity, the residual), so its optimum differs. The codes and scales stay fixed, so the
checkpoint format is unchanged.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from gift_quant.compress import experts as moe


def _cut(obj, n: int, j: int, size: int):
    if torch.is_tensor(obj):
        return obj[j:j + size] if obj.dim() and obj.shape[0] == n and n > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cut(o, n, j, size) for o in obj)
    if isinstance(obj, dict):
        return {k: _cut(v, n, j, size) for k, v in obj.items()}
    return obj


def _windows(batches, size: int):
    """(hidden, kwargs) minibatches of ``size`` windows cut from the calibration batches."""
    return [(h[j:j + size], _cut(kw, h.shape[0], j, size)) for h, kw in batches for j in range(0, h.shape[0], size)]


def tune_layer(layer, lins: dict, packed: dict, batches, targets, steps: int, lr: float, windows: int = 4,
               seed: int = 0) -> list[float]:
    """Adam on the FP16 columns of ``packed`` (name -> MixedPrecisionLinear), in place, and on the matching
    columns of the Linears in ``lins`` that the layer's forward uses. ``targets`` are the float layer's outputs
    on ``batches``. Returns the relative loss before and after (||out - target||^2 / ||target - input||^2)."""
    names = [n for n in lins if n in packed and packed[n].n_salient > 0 and moe.expert_key(n) is None]
    if not names or steps <= 0:
        return []
    dev = lins[names[0]].weight.device
    base = {n: lins[n].weight.detach().float().clone() for n in names}
    idx = {n: packed[n].salient_idx.long().to(dev) for n in names}
    cols = {n: base[n][:, idx[n]].clone().requires_grad_(True) for n in names}
    opt = torch.optim.Adam(cols.values(), lr=lr)
    mb = _windows(batches, windows)
    tg = [t for t, _ in _windows([(t, {}) for t in targets], windows)]
    g = torch.Generator().manual_seed(seed)
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)

    def rel(i):
        h, kw = mb[i]
        t = tg[i].to(h.device)
        w = {f"{n}.weight": base[n].index_copy(1, idx[n], cols[n]).to(lins[n].weight.dtype) for n in names}
        out = functional_call(layer, w, (h.to(dev),), {k: v for k, v in kw.items()})
        out = out[0] if isinstance(out, (tuple, list)) else out
        return ((out.float() - t.to(dev).float()) ** 2).sum() / ((t.to(dev).float() - h.to(dev).float()) ** 2).sum()

    losses = []
    try:
        with torch.enable_grad():
            for s in range(steps):
                i = int(torch.randint(len(mb), (1,), generator=g))
                loss = rel(i)
                if s == 0:
                    losses.append(float(loss.detach()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p, r in flags:
            p.requires_grad_(r)
    with torch.no_grad():
        for n in names:
            mpl = packed[n]
            mpl.salient_weight.data.copy_(cols[n].detach().to(mpl.salient_weight.device, mpl.salient_weight.dtype))
            lins[n].weight.data[:, idx[n]] = mpl.salient_weight.data.to(dev, lins[n].weight.dtype)
    return losses
