"""Kernels of the mixed-precision linear, on tensors only (never imports ``gift_quant.nn``).

- :mod:`.triton` (layout, kernel, launch, op): the Triton kernels (default on CUDA);
- :mod:`.cuda` (build, layout, op, ``csrc/``): the C++ kernel (opt-in, JIT-built);
- :mod:`.torch_path`: the PyTorch dequantization (fallback and training); :mod:`.torch_int4`: aten's
  4-bit kernel on the Triton layout; :mod:`.tuned` + ``tuned_tables/``: the per-GPU tuned choices.

Which one runs, and the per-module layout cache, live in :mod:`gift_quant.nn.dispatch`.
"""
