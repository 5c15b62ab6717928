"""Where an eager decode step's time goes: the decoder Linears against the rest, under torch.profiler (a
hint beside the timings, never one of them)."""
from __future__ import annotations

import time

import torch
from _common import DECODER_LINEARS, sync


@torch.no_grad()
def profile_decode(model, vocab: int, device, prompt_len: int, steps: int = 4) -> dict:
    """Eager decode steps (batch 1) under torch.profiler: the share of time in the decoder Linears
    (``MixedPrecisionLinear`` = ``gift_quant::mixed_linear``, or ``nn.Linear`` for FP16) against the
    rest (attention, norms, lm_head, launch gaps)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    handles = []
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in DECODER_LINEARS:
            def pre(mod, _args):
                mod._bench_rf = record_function("bench::decoder_linear")
                mod._bench_rf.__enter__()

            def post(mod, _args, _out):
                mod._bench_rf.__exit__(None, None, None)
                del mod._bench_rf
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(3, vocab, (1, prompt_len), generator=g).to(device)
        out = model(ids, use_cache=True)
        state = [out.past_key_values, out.logits[:, -1:].argmax(-1)]

        def decode(n: int):
            for _ in range(n):
                out = model(state[1], past_key_values=state[0], use_cache=True)
                state[:] = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync(device)

        decode(2)  # warm-up
        t = time.perf_counter()
        decode(steps)
        plain_ms = (time.perf_counter() - t) / steps * 1e3
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            decode(steps)
            wall = time.perf_counter() - t
    finally:
        for h in handles:
            h.remove()
    ev = prof.events()
    lin = [e for e in ev if e.name == "bench::decoder_linear"]
    res = {"step_ms": plain_ms, "profiled_step_ms": wall / steps * 1e3}
    if device.type == "cuda":
        total = sum(e.self_device_time_total for e in ev)  # us of kernels
        lin_dev = sum(e.device_time_total for e in lin)
        res.update(linear_share=lin_dev / total if total else None,
                   gpu_busy=total / 1e6 / wall if wall else None,
                   kernel_ms_per_step=total / 1e3 / steps, linear_kernel_ms_per_step=lin_dev / 1e3 / steps)
    else:
        lin_cpu = sum(e.cpu_time_total for e in lin)
        res.update(linear_share=lin_cpu / 1e6 / wall if wall else None, gpu_busy=None)
    return res


def profile_line(name: str, p: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.0%}"
    busy = "" if p.get("gpu_busy") is None else f", GPU busy {f(p['gpu_busy'])} of wall (rest: launch/CPU)"
    return (f"{name}: eager decode step {p['step_ms']:.2f} ms; decoder Linears {f(p['linear_share'])} of "
            f"{'kernel' if p.get('gpu_busy') is not None else 'CPU'} time, the rest attention/norms/lm_head{busy}")
