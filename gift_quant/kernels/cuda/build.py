"""Build the CUDA extension on first use (torch.utils.cpp_extension, cached), or say once why not.

Only used with ``GIFT_QUANT_KERNEL=cuda`` (opt-in; ``auto`` runs the Triton kernels). Needs ``ninja``
(``pip install 'gift-quant[cuda]'``) and an nvcc whose major version matches torch's CUDA. The build
lands in torch's extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and is
reused while the source and toolchain stay the same. A failure is remembered with its reason; the
dispatcher (``gift_quant.nn.dispatch``) turns it into a clear error.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

log = logging.getLogger("gift_quant")

SOURCE = Path(__file__).parent / "csrc" / "mixed_linear.cu"
NAME = "gift_quant_mixed_linear_v1"

_ext = None
_reason: str | None = None
_tried = False


def _nvcc_version(home: Path) -> tuple[int, int] | None:
    """(major, minor) of the toolkit at ``home``: version.json, else the directory name (cuda-12.4)."""
    import json
    import re
    try:
        v = json.loads((home / "version.json").read_text())["cuda"]["version"]
        return tuple(int(p) for p in v.split(".")[:2])  # type: ignore[return-value]
    except Exception:  # noqa: BLE001
        pass
    m = re.search(r"(\d+)\.(\d+)", home.name)
    if m:
        return int(m.group(1)), int(m.group(2))
    try:
        out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
        m = re.search(r"release (\d+)\.(\d+)", out)
        return (int(m.group(1)), int(m.group(2))) if m else None
    except Exception:  # noqa: BLE001
        return None


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists()


def find_cuda_home(torch_cuda: str | None = None) -> str | None:
    """The CUDA toolkit root to build with.

    ``CUDA_HOME`` (or ``CUDA_PATH``) wins when set and holds a toolkit. Otherwise the candidates (nvcc on
    PATH, /usr/local/cuda*) are ranked: same major version as torch's CUDA first, then newest by numeric
    version (so cuda-13.0 ranks above cuda-9.2).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(var)
        if v and _is_toolkit(Path(v)):
            return v
    torch_cuda = torch_cuda if torch_cuda is not None else torch.version.cuda
    want = int(torch_cuda.split(".")[0]) if torch_cuda else None
    cands: list[Path] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent)
    cands += [p for p in Path("/usr/local").glob("cuda*") if p.is_dir()]
    seen, ranked = set(), []
    for c in cands:
        r = c.resolve()
        if r in seen or not _is_toolkit(r):
            continue
        seen.add(r)
        ver = _nvcc_version(r) or (0, 0)
        ranked.append(((want is not None and ver[0] == want), ver, str(c)))
    if not ranked:
        return None
    ranked.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return ranked[0][2]


def compile_extension(arch_list: str | None = None, verbose: bool = False):
    """Compile and import the extension. Raises on failure (callers decide how to report)."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install 'gift-quant[cuda]')")
    home = find_cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    os.environ["CUDA_HOME"] = home  # the toolkit chosen above, also for the ninja build's nvcc
    cpp_extension.CUDA_HOME = home
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


def extension(warn: bool = True):
    """The compiled module, or None (with one warning saying why, unless ``warn`` is False)."""
    global _ext, _reason, _tried
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
        if warn:
            warnings.warn(f"gift-quant: CUDA kernel unavailable ({_reason})", stacklevel=3)
        _ext = None
    return _ext


def unavailable_reason() -> str | None:
    return _reason


def reset():
    """Forget the build result (tests)."""
    global _ext, _reason, _tried
    _ext, _reason, _tried = None, None, False
