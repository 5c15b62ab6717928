"""Is the C++ prefill path's bf16 bound failure cuBLAS's and not the kernel's? (device check part `cublas`)

Both H200 failures of test_cuda_kernel_matches_float64 (bf16, batch 8, i.e. the prefill path: the kernel's
W^T, then torch.addmm(bias, x, W^T) in cuBLAS) were on layers with a bias; the bias-free layer before them
passed. Rounding x @ W^T to bf16 before adding the bias emulates to ~1.6x the one-rounding bound (CPU),
the H200 measured 1.39x. This runs cuBLAS on the kernel's exact operands (emulated W^T, no C++ build) and
prints max |y - y64| / bound for addmm, for x @ W^T, and for fp32 accumulation with the bias added once.

    python tools/diag_cublas_bound.py          # on a GPU; on CPU it checks itself on 3 layers
"""
import importlib.util
import itertools
import sys
from pathlib import Path

import _common  # noqa: F401  (one clear line when gift_quant is not installed)
import torch


def _emulation():
    """The C++ kernel's CPU emulation, which lives with its tests (tests/kernels/cpp_emulation.py); loaded
    from its file, so neither the checkout nor its tests go onto ``sys.path`` (gift_quant stays the
    installed one)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "kernels" / "cpp_emulation.py"
    if not path.is_file():
        print(f"diag_cublas_bound: error: {path} not found (run it from a gift-quant checkout)", file=sys.stderr)
        raise SystemExit(2)
    spec = importlib.util.spec_from_file_location("cpp_emulation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def main():
    emu = _emulation()
    gpu_test_layers, operands, rounding_bound = emu.gpu_test_layers, emu.operands, emu.rounding_bound
    m = torch.backends.cuda.matmul
    n = 40 if DEV == "cuda" else 3
    print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| dtype | cuBLAS 16-bit reductions | variant | layers | max error / bound |\n|---|---|---|---|---|")
    for dtype, reduced in itertools.product((torch.bfloat16, torch.float16), (False, True)):
        m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = reduced
        worst = {}
        for _, layer in itertools.islice(gpu_test_layers(2), n):  # the GPU test's first 2-bit layers
            wt = operands(layer, dtype, gemv=False)[0].t().to(dtype).contiguous().to(DEV)
            b = None if layer.bias is None else layer.bias.to(dtype).to(DEV)
            for batch in (8, 64):
                x = torch.randn(batch, layer.in_features).to(dtype)
                y64, bound = rounding_bound(layer, x, gemv=False)
                xc = x.to(DEV)
                if b is None:
                    v = {"x @ W^T": xc @ wt, "fp32 GEMM, one rounding": (xc.float() @ wt.float()).to(dtype)}
                else:
                    v = {"addmm(b, x, W^T)": torch.addmm(b, xc, wt),
                         "(x @ W^T) + b, two roundings": ((xc @ wt).float() + b.float()).to(dtype),
                         "fp32 GEMM + b, one rounding": (xc.float() @ wt.float() + b.float()).to(dtype)}
                for name, y in v.items():
                    r = ((y.cpu().double() - y64).abs() / bound).max().item()
                    worst[name] = max(worst.get(name, 0.0), r)
        for name, r in worst.items():
            print(f"| {str(dtype)[6:]} | {'allowed' if reduced else 'off'} | {name} | {n} | {r:.2f} |", flush=True)


if __name__ == "__main__":
    main()
