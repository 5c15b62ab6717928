"""What the Triton kernel tests share. Import it before any kernel module: without a GPU it sets
``TRITON_INTERPRET=1`` first (the kernels run on CPU tensors in Triton's interpreter), and it skips the
importing test module when triton is missing."""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels module is imported

triton = pytest.importorskip("triton")

DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16, torch.float32]  # the interpreter has no bf16
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 2e-5}
