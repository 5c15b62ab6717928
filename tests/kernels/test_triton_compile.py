"""Compile-only check of the Triton kernels for a Hopper GPU (sm_90), on a machine without one.

CI proves the kernels' math in Triton's interpreter (test_triton.py); this proves the same source also
lowers through Triton's real compiler to a cubin (ptxas ships in the triton wheel), which the
interpreter never exercises. A subprocess, because the interpreter flag is process-wide.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gift_quant.kernels.triton import kernel as tm
PTR = {"x_ptr": "*fp16", "qw_ptr": "*i32", "perm_ptr": "*i32", "gch_ptr": "*i32", "s_ptr": "*fp16",
       "z_ptr": "*u8", "sw_ptr": "*fp16", "si_ptr": "*i32", "b_ptr": "*fp16", "y_ptr": "*fp16", "w_ptr": "*fp16",
       "ws_ptr": "*fp32", "lock_ptr": "*i32"}
SK = dict(BN=64, SPLIT=8, HAS_BIAS=True, STAGES=2, EVEN_K=False)
CASES = [(tm._dequant_kernel, dict(BITS=3, W=4, BN=128, IDENTITY=False, TW=4)),
         (tm._dequant_kernel, dict(BITS=8, W=4, BN=128, IDENTITY=True, TW=8)),
         (tm._splitk_kernel, dict(SK, BITS=3, W=4, MB=1, IDENTITY=False, ATOMIC=False)),
         (tm._splitk_kernel, dict(SK, BITS=2, W=4, MB=4, IDENTITY=True, ATOMIC=True)),
         (tm._splitk_dot_kernel, dict(SK, BITS=4, W=8, MB=16, IDENTITY=True, ATOMIC=False, EVEN_K=True, IEEE=False)),
         (tm._splitk_dot_kernel, dict(SK, BITS=3, W=4, MB=16, IDENTITY=False, ATOMIC=True, IEEE=False)),
         (tm._gemm_kernel, dict(BITS=4, BM=16, BK=64, BN=32, IDENTITY=True, HAS_BIAS=True, IEEE=False, TW=4))]
for fn, const in CASES:
    sig = {n: PTR.get(n, "i32") for n in fn.arg_names}
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert len(k.asm["cubin"]) > 1000, fn.__name__
    print("ok", fn.__name__, const)
'''


@pytest.mark.integration
def test_triton_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("this triton wheel has no ptxas")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ok ") == 7
