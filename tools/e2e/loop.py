"""One variant through one mode: build it on the device, profile it (``--profile``), measure each batch
size, then free it. The time budget skips (and marks) what would not fit; OOM and any other error are
caught per configuration, so one failure never loses the run."""
from __future__ import annotations

import contextlib
import time
import traceback

import torch
from _common import free, logger

from gift_quant.eval import bench
from gift_quant.nn.dispatch import prepare_model, unfreeze

from .profile import profile_decode, profile_line
from .report import write_outputs
from .variants import build_b, n_mixed, state_dict_mib

log = logger("bench_e2e")


class Budget:
    def __init__(self, seconds: float | None):
        self.t0, self.limit = time.time(), seconds

    def elapsed(self) -> float:
        return time.time() - self.t0

    def allows(self, predicted: float) -> bool:
        return self.limit is None or self.elapsed() + predicted <= self.limit


def drop_compiled(model):
    """Forget transformers' compiled decode step and the kernel layouts so the memory can go."""
    for attr in ("_compiled_call", "_last_compile_config"):
        model.__dict__.pop(attr, None)
    unfreeze(model)  # prepare_model's frozen records hold the same layouts
    for m in model.modules():
        m.__dict__.pop("_gift_kernel_cache", None)
    with contextlib.suppress(Exception):  # nothing compiled, or no dynamo: nothing to free
        torch._dynamo.reset()  # also frees the CUDA graph pools


def _generate_options(mode: str, device) -> dict:
    if mode != "compile":
        return bench.generate_options(mode)
    from transformers import CompileConfig
    cc = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default", dynamic=False)
    if device.type != "cuda":
        cc._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return {"compile_config": cc}


def _error_status(e: Exception) -> str:
    msg = str(e).strip()
    return f"error: {type(e).__name__}: {msg.splitlines()[0][:160] if msg else ''}"


class Run:
    """A run's state: its rows and profiles so far (written after every configuration), and the cost of
    the slowest finished configuration per (part, mode, batch index) and build per part, which the time
    budget uses to predict the next one."""

    def __init__(self, a, device, dtype, meta: dict, out, budget: Budget):
        self.a, self.device, self.dtype, self.meta, self.out, self.budget = a, device, dtype, meta, out, budget
        self.rows: list[dict] = []
        self.profiles: dict = {}
        self.cost: dict = {}
        self.build_cost: dict = {}

    def save(self, final: bool = False) -> str:
        return write_outputs(self.out, self.meta, self.rows, self.profiles, final=final)

    def skip(self, base: dict, batches, why: str):
        for b in batches:
            self.rows.append({**base, "batch": b, "status": why})
        self.save()

    def variant(self, part: str, v: dict, mode: str):
        a, device = self.a, self.device
        label = f"{part}:{v['name']}:{mode}"
        base = {"part": part, "model": v["name"], "bits": v["bits"], "mode": mode,
                "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "device": str(device),
                "dtype": self.meta["dtype"], "ppl_idle": v.get("ppl"), "size_mib": v.get("size_mib"),
                "size_source": v.get("size_source"), "path": v.get("path")}
        batches = a.compile_batch if mode == "compile" else a.batch
        if v.get("skipped") or (part == "a" and v.get("model") is None):
            return self.skip(base, batches, "skipped")
        if not self.budget.allows(self.build_cost.get(part, 0.0)):
            log(f"{label}: skipped (time budget, {self.budget.elapsed():.0f} s used)")
            return self.skip(base, batches, "skipped")
        model = self._build(part, v, base, label, batches)
        if model is None:
            return
        if a.profile and mode == "eager":
            self._profile(part, v, model)
        gen = _generate_options(mode, device)
        for bi, b in enumerate(batches):
            if not self._batch(part, mode, bi, b, model, base, label, gen):
                self.skip(base, batches[bi:], "skipped")
                break
        drop_compiled(model)
        if part == "a":
            model.to("cpu")
        del model
        free(device)

    def _build(self, part, v, base, label, batches):
        t = time.time()
        try:
            if part == "b":
                model = build_b(self.a, None if v["bits"] == 16 else v["bits"], self.device, self.dtype)
                base["size_mib"], base["size_source"] = state_dict_mib(model), "state_dict"
            else:
                model = v["model"].to(self.device)
            n_kernel = prepare_model(model) if self.device.type == "cuda" else 0
        except Exception as e:  # noqa: BLE001 - report it in the table, go on with the next variant
            oom = bench.is_oom(e)
            if not oom:
                traceback.print_exc()
            log(f"{label}: {'OOM' if oom else type(e).__name__} while building")
            model = None
            free(self.device)
            self.skip(base, batches, "OOM (build)" if oom else f"error (build): {type(e).__name__}")
            return None
        build_s = time.time() - t
        self.build_cost[part] = max(self.build_cost.get(part, 0.0), build_s)
        base.update(build_s=build_s, mixed_layers=n_mixed(model), kernel_layers=n_kernel)
        log(f"{label}: ready in {build_s:.1f} s ({base['mixed_layers']} mixed-precision Linears, "
            f"{n_kernel} on a kernel, {base['size_mib']:.1f} MiB)")
        return model

    def _profile(self, part, v, model):
        name = f"{part}:{v['name']}"
        try:
            p = profile_decode(model, model.config.vocab_size, self.device, self.a.prompt_len)
            self.profiles[name] = p
            log("profile " + profile_line(name, p))
        except Exception as e:  # noqa: BLE001 - a hint only, never fatal
            self.meta["notes"].append(f"profile of {name} failed: {type(e).__name__}: {e}")

    def _batch(self, part, mode, bi, b, model, base, label, gen) -> bool:
        """Measure one batch size; False when the time budget leaves no room for it."""
        a, device, budget = self.a, self.device, self.budget
        guess = self.cost.get((part, mode, bi)) or (
            max(3 * self.cost.get((part, "eager", bi), 0.0), a.compile_estimate) if mode == "compile" else 0.0)
        if not budget.allows(guess):
            log(f"{label} b{b}: skipped (time budget: {budget.elapsed():.0f} s used, ~{guess:.0f} s needed)")
            return False
        t = time.time()
        try:
            r = bench.measure_safe(model, model.config.vocab_size, b, a.prompt_len, a.new_tokens, device,
                                   repeats=a.repeats, **gen)
        except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the run
            traceback.print_exc()
            r = {"status": _error_status(e), "peak_mem_mib": None}
            free(device)
        secs = time.time() - t
        self.cost[(part, mode, bi)] = max(self.cost.get((part, mode, bi), 0.0), secs)
        self.rows.append({**base, "batch": b, **r, "config_s": secs})
        log(f"{label} b{b}: {r['status']}"
            + (f", prefill {r['prefill_ms']:.1f} ms, decode {r['decode_tok_s']:.1f} tok/s"
               if r["status"] == "ok" else "")
            + (f", peak {r['peak_mem_mib']:.0f} MiB" if r["peak_mem_mib"] is not None else "")
            + f" ({secs:.1f} s; {budget.elapsed():.0f} s used)")
        self.save()
        return True
