"""The split-K decode kernel and the equal-group layout against a float64 reference.

CPU: Triton's interpreter (fp16/fp32), programs one after another, so the shapes are small. Outputs
are NaN-filled before the launch: an element the kernel never writes fails. The reduction is checked
both ways (a deterministic ordered sum, and fp32 atomics) and for leaving its workspace as it found it.
"""
import itertools  # noqa: I001  (triton_env must come before the kernels)

import pytest
import torch

from tests.kernels.triton_env import CUDA, DEV, DTYPES, TOL  # first: sets TRITON_INTERPRET on CPU

from gift_quant.kernels.triton import kernel as tm
from gift_quant.kernels.triton import layout as lay
from gift_quant.nn.mixed_linear import MixedPrecisionLinear


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(tm, "_alloc", lambda *s, **kw: torch.full(s, float("nan"), **kw))


def _layout(K, N, bits, gs, k, act, seed, dtype, bias=True):
    layer = MixedPrecisionLinear.random(K, N, bits, gs, min(k, K), bias=bias, act_order=act, seed=seed).to(DEV)
    L = lay.build_layout(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.salient_idx,
                         layer.salient_weight, layer.bias, bits, K, N, dtype, gs)
    return layer, L


def _ref(layer, x):
    y = x.double() @ layer.dequantize(torch.float64).t()
    return y if layer.bias is None else y + layer.bias.double()


def _err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


_KS = [0, 1, 7, 128]
_SHAPES = [(67, 37), (300, 45), (161, 16), (288, 131)]
_TOKENS = [1, 3, 8, 17, 64]
CASES = [dict(bits=b, gs=g, act=bool(i % 2), k=_KS[(i + i // 4) % 4], shape=_SHAPES[(i // 2) % 4],
              tokens=_TOKENS[i % 5], dtype=DTYPES[(i + i // 4) % 2])
         for i, (b, g) in enumerate(itertools.product([2, 3, 4, 8], [32, 64, 128, -1]))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c['bits']}-g{c['gs']}-act{int(c['act'])}-k{c['k']}-"
                         f"{c['shape'][0]}x{c['shape'][1]}-t{c['tokens']}-{str(c['dtype'])[6:]}")
def test_splitk_matches_float64(case):
    K, N = case["shape"]
    layer, L = _layout(K, N, case["bits"], case["gs"], case["k"], case["act"], 7 + K + case["bits"], case["dtype"])
    x = torch.randn(case["tokens"], K, device=DEV).to(case["dtype"])
    y = tm.mixed_linear(x, L, "gemv")
    assert y.shape == (case["tokens"], N) and y.dtype == case["dtype"]
    assert _err(y, _ref(layer, x)) < TOL[case["dtype"]], case


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_splitk_every_split_count_and_both_reductions(bits):
    """1 split (direct store), splits that leave the last one short, more splits than tiles, on both
    kernels; ordered sum
    and atomics agree with the reference, and the ordered sum is bit-identical from call to call."""
    layer, L = _layout(300, 45, bits, 32, 7, True, 3 + bits, torch.float32)
    for tokens in (1, 3):  # the CUDA-core kernel (1 token) and the tensor-core one
        x = torch.randn(tokens, 300, device=DEV)
        ref = _ref(layer, x)
        for split, atomic in [(1, False), (2, True), (4, False), (L.tiles + 2, True)]:
            cfg = dict(SPLIT=split, ATOMIC=atomic)
            y = tm.mixed_linear(x, L, "gemv", cfg)
            assert _err(y, ref) < TOL[torch.float32], (tokens, cfg)
            if not atomic:
                assert torch.equal(y, tm.mixed_linear(x, L, "gemv", cfg)), "ordered reduction is deterministic"
    for atomic in (False, True):
        ws, lock = tm.WORKSPACE.bufs[(x.device, atomic, None)]
        assert not lock.any() and (not atomic or not ws.any()), "the kernel leaves its workspace zeroed"


@pytest.mark.skipif(not CUDA, reason="CUDA streams")
def test_a_second_stream_gets_a_workspace_of_its_own():
    """Two streams sharing arrival counters would mix their partial sums: eager calls on a second stream
    use buffers of their own, and both streams' results equal the reference."""
    layer, L = _layout(512, 200, 4, 128, 7, False, 1, torch.float16)
    x = torch.randn(1, 512, device=DEV).to(torch.float16)
    ref = _ref(layer, x)
    a = tm.mixed_linear(x, L, "gemv")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        b = tm.mixed_linear(x, L, "gemv")
    torch.cuda.current_stream().wait_stream(side)
    keys = [k for k in tm.WORKSPACE.bufs if k[0] == x.device and not k[1]]
    assert (x.device, False, None) in keys and any(k[2] == side.cuda_stream for k in keys)
    assert _err(a, ref) < TOL[torch.float16] and torch.equal(a, b)


def test_splitk_applies_one_tile_to_every_token():
    """Each token's row equals that token run alone (no cross-token leakage), up to fp32 rounding."""
    _, L = _layout(256, 40, 4, 64, 7, False, 5, torch.float32)
    x = torch.randn(5, 256, device=DEV)
    y = tm.mixed_linear(x, L, "gemv")
    for m in range(5):
        torch.testing.assert_close(y[m:m + 1], tm.mixed_linear(x[m:m + 1], L, "gemv"), rtol=1e-5, atol=1e-5)


def test_layout_groups_are_equal_and_contiguous():
    """Act-order with all salient rows on group 0 (GIFT's convention): group 0 would hold gs + k rows;
    the layout drops the salient ones, so every group is group_rows positions and the math is unchanged."""
    K, N, gs, k = 256, 24, 64, 9
    layer = MixedPrecisionLinear.random(K, N, 3, gs, 0, bias=False, act_order=True, seed=2)
    sal = torch.randperm(K)[:k].sort().values
    g = layer.g_idx.clone()
    perm = torch.randperm(K)
    rest = perm[~torch.isin(perm, sal)]
    g[rest] = (torch.arange(rest.numel()) // gs).to(torch.int32)
    g[sal] = 0
    layer.g_idx.copy_(g)
    L = lay.build_layout(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, sal.to(torch.int32),
                         torch.randn(N, k), None, 3, K, N, torch.float64, gs)
    assert L.group_rows == gs and L.chunks * 32 == layer.scales.shape[0] * gs
    pos = L.perm_pos.long()
    assert not torch.isin(pos[pos >= 0], sal).any(), "salient rows left the base"
    assert torch.equal(pos[pos >= 0].sort().values, rest.sort().values)
    grp = torch.arange(pos.numel()) // L.group_rows
    assert torch.equal(g[pos[pos >= 0]].long(), grp[pos >= 0]), "group = position // group_rows"
    x = torch.randn(2, K, dtype=torch.float64)
    base = layer.dequantize_base(torch.float64)
    base[:, sal] = 0  # the layout zeroes salient slots whatever their codes
    want = x @ base.t() + x[:, sal] @ L.sal_w[:k, :N].double()
    torch.testing.assert_close(lay.layout_reference(x, L), want, rtol=1e-10, atol=1e-10)


def test_prepare_model_freezes_and_a_weight_write_unfreezes(monkeypatch):
    """After prepare_model an eager call takes the frozen route (no backend choice, no layout key); an
    in-place write to a weight, a replaced tensor, or new storage under the same parameter (``.data =``)
    is seen on the next call."""
    from gift_quant.nn import backends, dispatch
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "triton")
    dispatch.reset()
    layer = MixedPrecisionLinear.random(96, 40, 3, 32, 5, bias=True, seed=9).to(DEV)
    assert dispatch.prepare_model(layer, torch.float16, warmup_tokens=(1, 3)) == 1
    assert layer.__dict__[dispatch.FROZEN_ATTR].valid(layer)
    calls = []
    monkeypatch.setattr(backends, "resolve", lambda *a, **k: calls.append(a) or "triton")
    x = torch.randn(3, 96, device=DEV).to(torch.float16)
    with torch.no_grad():
        assert _err(layer(x), _ref(layer, x)) < TOL[torch.float16] and not calls
        layer.scales.mul_(2)
        assert _err(layer(x), _ref(layer, x)) < TOL[torch.float16] and calls
        layer.scales = layer.scales / 2
        assert _err(layer(x), _ref(layer, x)) < TOL[torch.float16]
        dispatch.prepare_model(layer, torch.float16, warmup_tokens=(3,))
        layer.salient_weight.data = torch.randn_like(layer.salient_weight)  # same object and version, new storage
        assert _err(layer(x), _ref(layer, x)) < TOL[torch.float16]
    dispatch.unfreeze(layer)
    assert dispatch.FROZEN_ATTR not in layer.__dict__
    dispatch.reset()


def test_tuned_policy_reads_a_table_and_defaults_without_one(tmp_path):
    from gift_quant.kernels import tuned
    assert tuned.policy(None, 4, 4096, 4096) == (tuned.DEFAULT_GEMV_MAX_TOKENS, tuned.DEFAULT_PREFILL)
    rows = [{"bits": 4, "K": 4096, "N": 4096, "batch": b, "us_fp16": 10.0, "us_triton_gemv": g,
             "us_triton_dequant": d, "us_triton_gemm": 99.0} for b, g, d in
            [(1, 3.0, 9.0), (2, 3.0, 9.0), (4, 4.0, 9.0), (8, 9.5, 9.0), (16, 20.0, 9.0), (64, None, 9.0)]]
    path = tuned.write(tmp_path / "t.json", "Some GPU", (9, 0), rows, "test", "now")
    import json
    table = json.loads(path.read_text())
    assert tuned.policy(table, 4, 4096, 4096) == (4, "dequant")   # split-K up to 4 tokens, then dequant
    assert tuned.policy(table, 4, 4096, 11008) == (4, "dequant")  # nearest measured shape
    assert tuned.policy(table, 2, 4096, 4096) == (tuned.DEFAULT_GEMV_MAX_TOKENS, tuned.DEFAULT_PREFILL)
    assert tuned.table_name("NVIDIA H200", (9, 0)) == "nvidia-h200-sm90.json"


@pytest.mark.skipif(not CUDA, reason="direct launches are for compiled kernels on a GPU")
def test_direct_launch_matches_tritons_launcher():
    """The first call compiles through Triton, the second checks the direct launch against Triton's
    bit for bit, later calls launch directly; all equal, and direct launches stay on."""
    from gift_quant.kernels.triton import launch
    _, L = _layout(512, 200, 4, 128, 7, False, 1, torch.float16)
    for tokens in (1, 5):
        x = torch.randn(tokens, 512, device=DEV).to(torch.float16)
        ys = [tm.mixed_linear(x, L, "gemv") for _ in range(4)]
        assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert launch._state["ok"], "direct launch was switched off"
    assert L.__dict__["_direct"] and all(e.checked for e in L.__dict__["_direct"].values())


@pytest.mark.parametrize("gs,act,k", [(32, False, 0), (64, True, 7), (128, True, 128), (128, False, 1)])
def test_int4pack_candidate_matches_float64_in_bf16(gs, act, k):
    """aten._weight_int4pack_mm (CPU twin here) on the equal-group layout: zero point as s * (8 - z),
    act-order through perm_pos, FP16 columns on top; bf16 activations."""
    from gift_quant.kernels import torch_int4
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu" if DEV == "cpu" else "_weight_int4pack_mm"):
        pytest.skip("this torch has no int4pack op")
    layer, L = _layout(256, 48, 4, gs, k, act, 21 + gs, torch.float32)
    assert torch_int4.unavailable(L) is None
    P = torch_int4.build(L)
    x = torch.randn(3, 256, device=DEV).to(torch.bfloat16)
    y = torch_int4.forward(x, P)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 48)
    assert _err(y, _ref(layer, x)) < 2e-2
    _, L3 = _layout(256, 48, 3, gs, k, act, 1, torch.float32)
    assert "4 bits only" in torch_int4.unavailable(L3)


def test_int4pack_path_only_where_packed_and_bf16():
    """The op takes 'int4pack' only on a layout packed for it with bf16 input; otherwise 'dequant'."""
    from gift_quant.kernels import torch_int4
    from gift_quant.kernels.triton import op as triton_op
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu" if DEV == "cpu" else "_weight_int4pack_mm"):
        pytest.skip("this torch has no int4pack op")
    layer, L = _layout(256, 48, 4, 64, 7, True, 3, torch.float32)
    x = torch.randn(20, 256, device=DEV)
    y = triton_op.run(x, L, 0, "int4pack")  # not packed: dequant, exact in fp32
    assert _err(y, _ref(layer, x)) < TOL[torch.float32]
    L.__dict__["_int4"] = torch_int4.build(L)
    yb = triton_op.run(x.to(torch.bfloat16), L, 0, "int4pack")
    assert yb.dtype == torch.bfloat16 and _err(yb, _ref(layer, x.to(torch.bfloat16))) < 2e-2


def test_frozen_layer_traces_under_compile_fullgraph(monkeypatch):
    """torch.compile(fullgraph=True) of a layer prepare_model froze: tracing skips the frozen record and
    goes through the custom op (no graph break), and the result matches eager."""
    from gift_quant.nn import dispatch
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "triton")
    dispatch.reset()
    layer = MixedPrecisionLinear.random(96, 40, 4, 32, 3, bias=True, seed=4).to(DEV)
    dispatch.prepare_model(layer, torch.float16, warmup_tokens=(2,))
    x = torch.randn(2, 96, device=DEV).to(torch.float16)
    f = torch.compile(layer, fullgraph=True, backend="aot_eager" if not CUDA else "inductor")
    with torch.no_grad():
        torch.testing.assert_close(f(x), layer(x))
    dispatch.reset()


def test_device_check_script_parses_and_writes_the_tuned_table():
    """The one-call device check: valid bash, strict mode, the issue's default parts, the table written."""
    import re
    import shutil
    import subprocess
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "tools" / "device_check.sh"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    assert "set -euo pipefail" in text and "--tuned-out" in text
    assert re.search(r"^DEFAULT=\(env kernel compile tests\)$", text, re.M)
    assert int(re.search(r"DEVICE_CHECK_BUDGET:-(\d+)", text).group(1)) <= 360
