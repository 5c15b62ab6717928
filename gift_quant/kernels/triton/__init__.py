"""The Triton kernels (default on CUDA): :mod:`.layout` (load-time layout), :mod:`.kernel` (the kernels),
:mod:`.launch` (direct launch of the cached compiled kernel), :mod:`.op` (custom op, eager route)."""
