"""The Triton kernels against a float64 reference, through ``MixedPrecisionLinear.forward``.

Without a GPU they run on CPU tensors under ``TRITON_INTERPRET=1`` (fp16 and fp32: the interpreter has
no bf16); on a GPU the same tests run the compiled kernels in fp16 and bf16. Outputs are allocated
NaN-filled, so an output element the kernel never writes fails the comparison.
"""
import itertools

import pytest
import torch

from tests.kernels.triton_env import CUDA, DEV, DTYPES, TOL  # first: sets TRITON_INTERPRET on CPU

from gift_quant.kernels.triton import layout as lay  # noqa: E402
from gift_quant.kernels import torch_path  # noqa: E402
from gift_quant.nn import backends, dispatch  # noqa: E402
from gift_quant.nn.mixed_linear import MixedPrecisionLinear  # noqa: E402
from gift_quant.core.packing import pack  # noqa: E402


def reference64(layer, x):
    y = x.double() @ layer.dequantize(torch.float64).t().to(x.device)
    return y if layer.bias is None else y + layer.bias.double()


@pytest.fixture
def poisoned(monkeypatch):
    from gift_quant.kernels.triton import kernel as triton_kernel
    monkeypatch.setattr(triton_kernel, "_alloc", lambda *s, **kw: torch.full(s, float("nan"), **kw))
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "triton")


def _layer(K, N, bits, gs, k, act, seed, bias=True):
    return MixedPrecisionLinear.random(K, N, bits, gs, k, bias=bias, act_order=act, seed=seed).to(DEV)


def _check(layer, x, dtype, where):
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], layer.out_features), where
    ref = reference64(layer, x)
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL[dtype], f"{where}: rel. error {err:.2e}"


# Every bits x group size pair once; act-order, k, shape tails, token counts and dtypes rotate through
# their values so each value meets several bit widths (the interpreter runs programs one by one).
_KS = [0, 1, 7, 128]
_SHAPES = [(67, 37), (300, 45), (161, 16), (300, 131)]
_TOKENS = [1, 3, 8, 17, 64]
CASES = [dict(bits=b, gs=g, act=bool(i % 2), k=_KS[i % 4], shape=_SHAPES[(i // 2) % 4],
              tokens=_TOKENS[i % 5], dtype=DTYPES[(i + i // 4) % 2])
         for i, (b, g) in enumerate(itertools.product([2, 3, 4, 8], [32, 64, 128, -1]))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c['bits']}-g{c['gs']}-act{int(c['act'])}-k{c['k']}-"
                         f"{c['shape'][0]}x{c['shape'][1]}-t{c['tokens']}-{str(c['dtype'])[6:]}")
def test_triton_forward_matches_float64(case, poisoned):
    K, N = case["shape"]
    k = min(case["k"], K)
    seed = hash((case["bits"], case["gs"], K)) % 10**6
    layer = _layer(K, N, case["bits"], case["gs"], k, case["act"], seed)
    x = torch.randn(case["tokens"], K, device=DEV).to(case["dtype"])
    _check(layer, x, case["dtype"], str(case))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_triton_decode_and_prefill_paths_agree_for_every_token_count(bits, poisoned, monkeypatch):
    """The GEMV (decode), the dequantize-then-GEMM and the tl.dot GEMM (prefill) on the same layer,
    tokens 1/3/8/17/64."""
    from gift_quant.kernels.triton import op as triton_op
    layer = _layer(200, 40, bits, 64, 7, True, 11 + bits)
    tokens = _TOKENS if bits == 4 else _TOKENS[:2]
    runs = [(t, 0, p) for t in tokens for p in triton_op.PREFILL_PATHS] + [(t, 64, "-") for t in tokens if t <= 17]
    for t, gmt, pre in runs:
        monkeypatch.setattr(backends, "GEMV_MAX_TOKENS", gmt)  # 0: always the prefill path, 64: always the GEMV
        monkeypatch.setattr(triton_op, "PREFILL_PATH", pre if gmt == 0 else "dequant")
        x = torch.randn(t, 200, device=DEV).to(torch.float16)
        _check(layer, x, torch.float16, f"bits={bits} tokens={t} gemv_max_tokens={gmt} prefill={pre}")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_triton_dequantize_t_writes_every_weight_exactly(bits, poisoned):
    """The prefill path's W^T (act-order, ragged groups, FP16 columns, column padding) equals the layer's
    own dequantization in float32: each element is one code, one zero, one scale."""
    from gift_quant.kernels.triton import kernel as triton_kernel
    from gift_quant.kernels.triton import op as triton_op
    layer = _layer(300, 45, bits, 64, 9, bits % 2 == 1, 40 + bits)
    L = dispatch.prepared(layer, "triton", torch.float32)
    wt = triton_kernel.dequantize_t(L, torch.float32)
    assert wt.shape == (300, L.qweight.shape[1]) and not wt.isnan().any()
    torch.testing.assert_close(wt[:, :45].cpu(), layer.dequantize(torch.float32).t().cpu(), rtol=1e-6, atol=1e-6)
    assert wt[:, 45:].abs().sum() == 0                                   # padding columns hold zeros
    with pytest.raises(ValueError, match="GIFT_QUANT_TRITON_PREFILL"):
        triton_op.run(torch.randn(20, 300, device=DEV), L, 0, "fast")


def test_triton_3d_input_and_no_bias(poisoned):
    layer = _layer(96, 33, 4, 32, 3, False, 5, bias=False)
    x = torch.randn(2, 3, 96, device=DEV).to(torch.float16)
    _check(layer, x, torch.float16, "3d")


def test_layout_reference_is_exact_in_float64():
    """The load-time layout (group sort, per-group padding, 3-bit planes, salient rows zeroed, column
    padding) reproduces the layer exactly, including foreign salient slots that are not the zero-point."""
    gen = torch.Generator().manual_seed(3)
    for bits, gs, k, act, (K, N) in itertools.product([2, 3, 4, 8], [32, 64, -1], [0, 7], [False, True],
                                                      [(67, 5), (256, 36)]):
        layer = MixedPrecisionLinear.random(K, N, bits, gs, k, bias=True, act_order=act,
                                            seed=int(torch.randint(0, 10**6, (1,), generator=gen)))
        if k:  # foreign checkpoint: salient slots hold arbitrary codes
            from gift_quant.core.packing import pack_qweight
            codes = layer.codes().clone()
            codes[:, layer.salient_idx.long()] = (1 << bits) - 1
            layer.qweight.copy_(pack_qweight(codes, bits))
        L = lay.build_layout(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.salient_idx,
                             layer.salient_weight, layer.bias, bits, K, N, torch.float64, gs)
        assert L.identity_rows == (not act or gs < 0 or gs >= K)
        assert L.qweight.shape[1] % 16 == 0 and L.sal_w.shape[0] % 32 == 0
        x = torch.randn(3, K, dtype=torch.float64, generator=gen)
        torch.testing.assert_close(lay.layout_reference(x, L), reference64(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_chunk_packing_and_int32_unpack_roundtrip(bits):
    c = torch.randint(0, 2 ** bits, (96, 7), dtype=torch.int32)
    assert torch.equal(lay.unpack_chunks(lay.pack_chunks(c, bits), bits).to(torch.int32), c)
    for m in (9, 1):
        c = torch.randint(0, 2 ** bits, (100, m), dtype=torch.int32)
        p = pack(c, bits)
        for packed in (p, p.t().contiguous().t()):  # also a size-1 dim with a stride other than 1
            assert torch.equal(torch_path.unpack_codes(packed, bits, 100).to(torch.int32), c)


@pytest.mark.parametrize("cache", ["0", "1"])
def test_torch_path_matches_float64_and_trains_only_the_fp16_columns(monkeypatch, cache):
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "torch")
    monkeypatch.setenv("GIFT_QUANT_TORCH_CACHE", cache)
    for bits, gs, N, act in itertools.product([2, 3, 4, 8], [32, 40, -1], [1, 20], [False, True]):
        # per-row: qzeros has one row; 40 does not divide 96 (a shorter last group); static groups broadcast
        layer = MixedPrecisionLinear.random(96, N, bits, gs, 4, bias=True, act_order=act, seed=bits).double()
        x = torch.randn(5, 96, dtype=torch.float64)
        torch.testing.assert_close(layer(x), reference64(layer, x), rtol=1e-10, atol=1e-10)
    layer = MixedPrecisionLinear.random(96, 20, 3, 32, 4, bias=True, act_order=True, seed=8)
    x = torch.randn(5, 96, dtype=torch.float64)
    layer.double()
    torch.testing.assert_close(layer(x), reference64(layer, x), rtol=1e-10, atol=1e-10)
    layer.salient_weight.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.salient_weight.grad is not None and layer.salient_weight.grad.abs().sum() > 0


def test_cache_follows_buffers_replaced_by_assignment(poisoned):
    """load_state_dict(assign=True) and offloading replace buffers without bumping _version."""
    layer = _layer(96, 24, 4, 32, 3, False, 1)
    other = _layer(96, 24, 4, 32, 3, False, 2)
    x = torch.randn(2, 96, device=DEV).to(torch.float16)
    _check(layer, x, torch.float16, "before")
    layer.load_state_dict(other.state_dict(), assign=True)
    _check(layer, x, torch.float16, "after load_state_dict(assign=True)")
    layer.scales = layer.scales * 2
    _check(layer, x, torch.float16, "after assigning scales")


def test_named_backend_errors_never_fall_back(monkeypatch):
    layer = MixedPrecisionLinear.random(64, 16, 4, 32, 2, seed=1)
    x = torch.randn(1, 64)
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "bogus")
    with pytest.raises(ValueError, match="GIFT_QUANT_KERNEL='bogus': expected one of auto, triton, cuda, torch"):
        layer(x)
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "cuda")
    with pytest.raises(RuntimeError, match="GIFT_QUANT_KERNEL=cuda: input on cpu"):
        layer(x)
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "triton")
    monkeypatch.setattr(backends, "triton_unavailable", lambda x: "triton is not importable (test)")
    dispatch.reset()  # the backend choice is memoized per (env, device, dtype, bits); the fake changes it
    with pytest.raises(RuntimeError, match="GIFT_QUANT_KERNEL=triton: triton is not importable"):
        layer(x)
    dispatch.reset()


def test_auto_falls_back_with_one_warning_naming_the_reason(monkeypatch, recwarn):
    import warnings
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "auto")
    monkeypatch.setattr(backends, "_wants_kernel", lambda x: True)
    monkeypatch.setattr(backends, "triton_unavailable", lambda x: "triton is not importable (test)")
    dispatch.reset()
    layer = MixedPrecisionLinear.random(64, 16, 4, 32, 2, seed=1)
    x = torch.randn(2, 64, dtype=torch.float64)
    with pytest.warns(UserWarning, match="GIFT_QUANT_KERNEL=auto: triton is not importable .test.; using the"):
        y = layer.double()(x)
    torch.testing.assert_close(y, reference64(layer, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # no second warning
    dispatch.reset()


def test_triton_op_opcheck_and_compile_fullgraph(poisoned):
    """torch.library registration: schema/fake checks, and torch.compile(fullgraph=True) traces the op."""
    from gift_quant.kernels.triton import op as triton_op
    layer = _layer(96, 40, 2, 32, 3, False, 4)
    x = torch.randn(3, 96, device=DEV).to(torch.float16)
    with torch.no_grad():
        ref = layer(x)
    L = dispatch.prepared(layer, "triton", torch.float16)
    args = (x, L.qweight, L.perm, L.gchunk, L.scales, L.zeros, L.sal_w, L.sal_idx, L.bias, 2, 96, 40,
            L.identity_rows, 8, "dequant", L.perm_pos, L.tile, L.group_rows)
    torch.library.opcheck(torch.ops.gift_quant.mixed_linear_triton.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(layer, fullgraph=True, backend="aot_eager" if not CUDA else "inductor")
    with torch.no_grad():
        torch.testing.assert_close(f(x), ref)
    assert triton_op.run(x, L).shape == (3, 40)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_triton_reduce_overhead_cuda_graphs(monkeypatch):
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "auto")
    layer = MixedPrecisionLinear.random(1024, 512, 3, 128, 32, bias=True, seed=12).cuda()
    assert dispatch.prepare_model(layer, torch.float16) == 1
    f = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for t in (1, 1, 1, 4, 4, 4):
        x = torch.randn(t, 1024, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            torch.testing.assert_close(f(x).clone(), layer(x), rtol=3e-3, atol=3e-3)


def test_backend_choice_is_memoized_but_follows_the_environment(monkeypatch):
    layer = MixedPrecisionLinear.random(64, 16, 4, 32, 2, seed=2)
    x = torch.randn(1, 64)
    dispatch.reset()
    calls = []
    real = backends._resolve
    monkeypatch.setattr(backends, "_resolve", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "torch")
    assert dispatch.resolve(x, layer) == "torch" == dispatch.resolve(x, layer)
    assert len(calls) == 1  # the second call is answered from the memo
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "cuda")
    for _ in range(2):  # an error is never memoized
        with pytest.raises(RuntimeError, match="GIFT_QUANT_KERNEL=cuda: input on cpu"):
            dispatch.resolve(x, layer)
    monkeypatch.setenv("GIFT_QUANT_KERNEL", "off")
    assert dispatch.resolve(x, layer) == "torch"
    assert dispatch.resolve(x, layer, "torch") == "torch"
    dispatch.reset()
