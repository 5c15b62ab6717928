"""Kernels of the mixed-precision linear, on tensors only (never imports ``gift_quant.nn``).

- :mod:`.layout` + :mod:`.triton_mixed` + :mod:`.triton_ops`: the Triton kernels (default on CUDA);
- :mod:`.prepare` + :mod:`.ops` + :mod:`.build` + ``csrc/``: the C++ kernel (opt-in, JIT-built);
- :mod:`.torch_path`: the PyTorch dequantization (fallback and training).

Which one runs, and the per-module layout cache, live in :mod:`gift_quant.nn.dispatch`.
"""
