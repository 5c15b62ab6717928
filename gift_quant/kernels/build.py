"""Build the CUDA extension on first use (torch.utils.cpp_extension, cached), or say once why not.

The build lands in torch's extension cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) and is reused while the source and toolchain stay the same. Any failure
(no GPU, no nvcc, a compile error) gives one warning and the PyTorch path; it never raises.
``GIFT_QUANT_KERNEL=off`` forces the PyTorch path.
"""
from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

log = logging.getLogger("gift_quant")

SOURCE = Path(__file__).parent / "csrc" / "mixed_linear.cu"
NAME = "gift_quant_mixed_linear_v1"

_ext = None
_reason: str | None = None
_tried = False


def disabled_by_env() -> bool:
    return os.environ.get("GIFT_QUANT_KERNEL", "").strip().lower() in {"off", "0", "false", "no"}


def find_cuda_home() -> str | None:
    """A CUDA toolkit root that has bin/nvcc (CUDA_HOME, then nvcc on PATH, then /usr/local/cuda*)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        cands.append(str(real.parent.parent))
    cands += sorted((str(p) for p in Path("/usr/local").glob("cuda*")), reverse=True)
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    return None


def compile_extension(arch_list: str | None = None, verbose: bool = False):
    """Compile and import the extension. Raises on failure (callers decide how to report)."""
    from torch.utils import cpp_extension

    home = find_cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    os.environ.setdefault("CUDA_HOME", home)
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    if arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    elif "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    return cpp_extension.load(
        name=NAME, sources=[str(SOURCE)], verbose=verbose,
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
    )


def extension():
    """The compiled module, or None (with one warning saying why) when the PyTorch path must be used."""
    global _ext, _reason, _tried
    if disabled_by_env():
        return None
    if _tried:
        return _ext
    _tried = True
    if not torch.cuda.is_available():
        _reason = "no CUDA device"
        return None
    log.warning("gift-quant: building the CUDA mixed-precision kernel (first use only, about a minute; "
                "cached under %s)", os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions"))
    try:
        _ext = compile_extension()
    except Exception as e:  # noqa: BLE001 - any build failure means: use the PyTorch path
        _reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
        warnings.warn(f"gift-quant: CUDA kernel unavailable ({_reason}); using the PyTorch path "
                      "(correct, slower). Set GIFT_QUANT_KERNEL=off to silence.", stacklevel=3)
        _ext = None
    return _ext


def unavailable_reason() -> str | None:
    return "GIFT_QUANT_KERNEL=off" if disabled_by_env() else _reason


def reset():
    """Forget the build result (tests)."""
    global _ext, _reason, _tried
    _ext, _reason, _tried = None, None, False
