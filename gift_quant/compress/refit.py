"""Refit of the FP16 columns towards the float model's outputs (asymmetric calibration).

GPTQ leaves the FP16 columns at the least-squares optimum for the quantized model's own inputs X_q:
min ||X_q W^T - X_q W_hat^T||. But the float model computes X_fp W^T, and X_q has drifted from X_fp through the
quantized layers before. With the base B (quantized codes, zero at the FP16 columns) fixed, the columns S
that best reproduce the float output are the ridge least-squares solution

    min_S || X_fp W^T - X_q B^T - X_q[:, idx] S^T ||^2 + lambda ||S - S_0||^2
      ->  S^T = S_0^T + (A + lambda I)^-1 (R - A S_0^T),
    A = X_s^T X_s,  R = (X_s^T X_fp) W^T - (X_s^T X_q) B^T,  X_s = X_q[:, idx],

S_0 being GPTQ's columns: a ridge towards zero would shrink the columns that carry the largest products
(they are salient because of it), which cost 8% perplexity at 3 bits in a first version.

one k x k solve per Linear, no gradient steps (GPTAQ, Li et al. 2025, applies the same target to GPTQ itself).
Per batch, one forward of the float layer (its Linears' inputs and its output, the next layer's X_fp) and one
of the quantized layer; as GPTQ's own statistics, the inputs within a layer are taken before its refit.
"""
from __future__ import annotations

import torch

from gift_quant.compress import experts as moe
from gift_quant.compress.layers import run_layer


def _inputs(layer, names, batch):
    """(layer output, {name: input [T, in]}) for one batch."""
    x, mods = {}, dict(layer.named_modules())

    def hook(name):
        def fn(_mod, inp, _out):
            x.setdefault(name, inp[0].reshape(-1, inp[0].shape[-1]))
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        out = run_layer(layer, [batch])[0]
    finally:
        for h in handles:
            h.remove()
    return out, x


@torch.no_grad()
def refit_layer(layer, fp_layer, lins: dict, packed: dict, batches_q, batches_fp, damp: float,
                alpha: float = 1.0) -> list:
    """Refit the FP16 columns of ``packed`` (name -> MixedPrecisionLinear, in place, and the weight of the
    Linear in ``lins`` that the layer's forward uses). ``fp_layer`` is the layer with its float weights.
    ``alpha`` blends the targets: 1 the float model's X_fp W^T, 0 the quantized inputs' X_q W^T (GPTQ's own
    optimum). Returns the float layer's outputs (the next layer's ``batches_fp``). MoE experts are not refit: the two
    models route tokens differently, so their inputs do not pair."""
    names = [n for n in lins if n in packed and packed[n].n_salient > 0 and moe.expert_key(n) is None]
    fp_mods = dict(fp_layer.named_modules())
    A, Cf, Cq, outs = {}, {}, {}, []  # X_s^T X_s, X_s^T X_fp, X_s^T X_q per Linear
    for bq, bf in zip(batches_q, batches_fp):
        out, xf = _inputs(fp_layer, names, bf)
        outs.append(out)
        if not names:
            continue
        _, xq = _inputs(layer, names, bq)
        for n in names:
            q, f = xq[n].float(), xf[n].float()
            xs = q[:, packed[n].salient_idx.long().to(q.device)]
            for acc, other in ((A, xs), (Cf, f), (Cq, q)):
                acc[n] = acc.get(n, 0) + (xs.t() @ other).double()
    for n in names:
        a = A[n] + damp * A[n].diagonal().mean().clamp_min(1e-12) * torch.eye(A[n].shape[0], dtype=torch.float64,
                                                                             device=A[n].device)
        mpl, lin, W = packed[n], lins[n], fp_mods[n].weight.double()
        B = mpl.dequantize_base(torch.float64).to(W.device)
        S0 = mpl.salient_weight.to(W.device, torch.float64)  # GPTQ's columns: the ridge pulls towards them
        R = (alpha * Cf[n] + (1 - alpha) * Cq[n]) @ W.t() - Cq[n] @ B.t()  # [k, out]
        S = S0 + torch.linalg.solve(a, R - A[n] @ S0.t()).t()  # [out, k]
        mpl.salient_weight.data.copy_(S.to(mpl.salient_weight.dtype).cpu())
        idx = mpl.salient_idx.long().to(lin.weight.device)
        lin.weight.data[:, idx] = mpl.salient_weight.data.to(lin.weight.device, lin.weight.dtype)
    return outs
