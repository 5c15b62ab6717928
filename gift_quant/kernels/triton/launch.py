"""Direct launches of already-compiled Triton kernels, skipping ``JITFunction.run`` per call.

``kernel[grid](...)`` binds and specializes every argument and hashes a cache key on each call (~46 us of
host time for the split-K kernel's 23 arguments on the device machine). Within one layer only x, y, the
token count and the strides change, and none of those is specialized on except the 16-byte alignment of
x and y. So the first call per (layer, kernel, constants, alignment) goes through Triton, which returns
the compiled kernel, and later calls hand the argument list straight to its launcher. The first direct
launch of each entry is checked bit for bit against Triton's own launch (the kernels are deterministic
in their default reduction); a mismatch or an error switches direct launches off for the process with one
warning. ``GIFT_QUANT_DIRECT_LAUNCH=0`` switches them off; the interpreter never uses them.
"""
from __future__ import annotations

import os
import warnings

import torch

ENABLED = os.environ.get("GIFT_QUANT_DIRECT_LAUNCH", "1").strip() not in ("0", "false", "no")
_state = {"ok": True}


def _hooks():
    try:
        from triton import knobs
        return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    except Exception:  # noqa: BLE001 - older triton: hooks on CompiledKernel
        from triton.compiler import CompiledKernel
        return getattr(CompiledKernel, "launch_enter_hook", None), getattr(CompiledKernel, "launch_exit_hook", None)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class Entry:
    __slots__ = ("checked", "kernel", "names")

    def __init__(self, kernel, names):
        self.kernel, self.names, self.checked = kernel, names, False

    def launch(self, grid, values, device):
        k = self.kernel
        enter, leave = _hooks()
        meta = k.launch_metadata(grid, _stream(device), *values) if enter is not None else None
        k.run(grid[0], grid[1], grid[2], _stream(device), k.function, k.packed_metadata, meta, enter, leave, *values)


def launch(fn, grid, args: tuple, const: dict, cache: dict, key, out: torch.Tensor, check: bool = True):
    """``fn[grid](*args, **const)``, directly when ``cache[key]`` holds the compiled kernel. ``out`` is the
    tensor the kernel writes (for the first-use check); ``check`` False where results are not bitwise
    repeatable (atomic reductions)."""
    device = out.device
    if not (ENABLED and _state["ok"] and device.type == "cuda"):
        fn[grid](*args, **const)
        return
    e = cache.get(key)
    capturing = torch.cuda.is_current_stream_capturing()
    if e is None:
        k = fn[grid](*args, **const)
        if k is not None and hasattr(k, "run") and not capturing:
            cache[key] = Entry(k, fn.arg_names)
        return
    values = list(args) + [const[n] for n in e.names[len(args):]]
    if e.checked:
        e.launch(grid, values, device)
        return
    if capturing:  # an entry never checked yet: Triton's own launch, which captures as well
        fn[grid](*args, **const)
        return
    fn[grid](*args, **const)  # the entry's first direct use: Triton's launch, then the direct one, compared
    want = out.clone()
    try:
        e.launch(grid, values, device)
        torch.cuda.synchronize(device)
        same = (not check) or torch.equal(out, want)
    except Exception as err:  # noqa: BLE001
        same, want = False, f"{type(err).__name__}: {err}"
    if not same:
        _state["ok"] = False
        cache.clear()
        warnings.warn("gift-quant: direct Triton launch disagreed with Triton's launcher "
                      f"({want if isinstance(want, str) else 'different output'}); using Triton's launcher",
                      stacklevel=3)
        fn[grid](*args, **const)
        return
    e.checked = True
    if not check:  # no bitwise check possible: keep Triton's result
        out.copy_(want)
