#!/usr/bin/env python3
"""MoE coverage and quality on tiny random models (no download; CPU, seconds).

For a tiny dense Llama and tiny Mixtral / Qwen3-MoE built from their configs: the share of decoder
parameters left in float with experts left fused (what gift-quant did before per-expert support, and
what ``modules_not_converted=["experts"]`` still does) and with per-expert GPTQ, and the relative logit
error ||q - fp|| / ||fp|| at 4/3/2 bits on held-out random tokens. Random weights: compare models with
each other, not with real-model numbers.

    python tools/bench_moe.py [--bits 4,3,2]
"""
from __future__ import annotations

import argparse
import warnings

import torch
from _common import ints, tiny_llama, tiny_moe

from gift_quant import GiftConfig
from gift_quant.compress import quantize_


def run(build, bits: int, exclude_experts: bool = False):
    torch.set_num_threads(1)
    m = build()
    g = torch.Generator().manual_seed(1)
    calib, x = torch.randint(0, 128, (16, 64), generator=g), torch.randint(0, 128, (4, 64), generator=g)
    with torch.no_grad():
        ref = m(x).logits
    cfg = GiftConfig(bits=bits, group_size=32, n_salient=4, salient_ratio=None, calib_samples=16, seq_len=64)
    if exclude_experts:
        cfg = GiftConfig(**{**cfg.to_dict(), "modules_not_converted": [*cfg.modules_not_converted, "experts"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = quantize_(m, cfg, dataset=calib, progress=False)
    with torch.no_grad():
        q = m(x).logits
    return float((q - ref).norm() / ref.norm()), rep.coverage.float_share


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=ints, default=[4, 3, 2], help="comma-separated bit widths")
    a = ap.parse_args(argv)
    models = {"llama (dense)": tiny_llama, "mixtral": lambda: tiny_moe("mixtral"),
              "qwen3_moe": lambda: tiny_moe("qwen3_moe")}
    print("| model | bits | float share, experts fused | float share, per-expert | rel. logit error, per-expert |")
    print("|---|---|---|---|---|")
    for name, build in models.items():
        for bits in a.bits:
            _, share_fused = run(build, bits, exclude_experts=True)
            err, share = run(build, bits)
            print(f"| {name} | {bits} | {share_fused:.1%} | {share:.2%} | {err:.4f} |")


if __name__ == "__main__":
    main()
