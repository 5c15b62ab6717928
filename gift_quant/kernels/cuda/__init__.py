"""The opt-in C++ kernel: :mod:`.build` (JIT build of ``csrc/``), :mod:`.layout` (load-time layout),
:mod:`.op` (custom op)."""
