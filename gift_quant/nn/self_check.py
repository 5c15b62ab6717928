"""The backends' self-check: each kernel against a float64 reference on small random layers, once per
(backend, bits, dtype, device), before ``auto`` trusts it. Registers itself with :mod:`.backends`."""
from __future__ import annotations

import torch

from . import backends
from .mixed_linear import MixedPrecisionLinear

_checked: dict = {}


def self_check(backend: str, bits: int, dtype: torch.dtype, device: torch.device) -> float | None:
    """Relative error of ``backend`` against a float64 reference on small random layers (both the decode
    and the prefill path, act-order on and off), once per (backend, bits, dtype, device); None if ok."""
    key = (backend, bits, dtype, str(device))
    if key in _checked:
        return _checked[key]
    worst, bad = 0.0, False
    # 8 unit roundoffs for both 16-bit types (bf16: 3.1e-2): the prefill case runs cuBLAS, whose 16-bit
    # reductions (PyTorch's default) reach ~2.6e-2 here in bf16 when emulated as a 32-way split-K, against
    # <= 7.5e-3 with fp32 reductions; a broken kernel is off by O(1)
    tol = 4 * torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 4e-3
    with torch.no_grad():
        for act, m in ((False, 1), (True, 3), (False, 20)):
            layer = MixedPrecisionLinear.random(200, 132, bits, 64, 7, bias=True, act_order=act,
                                                seed=1234 + m).to(device)
            x = torch.randn(m, 200, device=device).to(dtype)
            ref = x.double() @ layer.dequantize(torch.float64).t() + layer.bias.double()
            y = backends.run(backend, x, layer).double()
            err = ((y - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
            worst = max(worst, err)
            bad = bad or not bool(torch.isfinite(y).all()) or err > tol
    _checked[key] = worst if bad else None
    return _checked[key]


backends.register_self_check(self_check, _checked.clear)
