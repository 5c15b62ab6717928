"""Tensor-parallel sharding and shard merging of gift layers, against the unsharded layer (no vLLM)."""
import pytest
import torch

from gift_quant.integrations.vllm._deps import mixed_linear_forward
from gift_quant.nn.mixed_linear import MixedPrecisionLinear
from gift_quant.integrations.vllm.sharding import (
    GiftTensors,
    codes_of,
    dequantize,
    even_slice,
    merge_outputs,
    shard_inputs,
    shard_outputs,
    zeros_of,
)


def random_layer(K, N, bits, group_size, salient, act_order, bias=True, seed=0, dtype=torch.float16):
    """A valid gift layer (random codes/zeros/scales, FP16 columns at ``salient``) as checkpoint tensors."""
    m = MixedPrecisionLinear.random(K, N, bits, group_size, bias=bias, act_order=act_order, dtype=dtype,
                                    seed=seed, salient_idx=salient)
    return GiftTensors(qweight=m.qweight, qzeros=m.qzeros, scales=m.scales, g_idx=m.g_idx,
                       salient_idx=m.salient_idx, salient_weight=m.salient_weight.data, bias=m.bias, bits=bits,
                       group_size=group_size, in_features=K, out_features=N)


K, N = 192, 96
# odd placements: on slice borders, all in the first quarter, all in the last slice, none at all
PLACEMENTS = {"borders": [0, 47, 48, 95, 96, 143, 144, 191], "first_quarter": [3, 5, 17, 40],
              "last": [150, 151, 190], "scattered": [1, 2, 64, 100, 101, 102, 177], "none": []}
CASES = [(bits, gs, act) for bits in (2, 3, 4, 8) for gs, act in ((32, True), (40, False), (-1, False), (64, False))]


def _x(rows=5, seed=1):
    return torch.randn(rows, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_forward_matches_float64_reference():
    t = random_layer(K, N, 3, 32, PLACEMENTS["scattered"], act_order=True)
    x = _x()
    ref = x @ dequantize(t).t() + t.bias.double()
    torch.testing.assert_close(mixed_linear_forward(x, t), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("bits,gs,act", CASES)
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_column_parallel_equals_unsharded(tp, bits, gs, act, placement):
    t = random_layer(K, N, bits, gs, PLACEMENTS[placement], act, seed=bits + tp)
    x = _x()
    full = mixed_linear_forward(x, t)
    parts = [shard_outputs(t, *even_slice(N, r, tp)) for r in range(tp)]
    torch.testing.assert_close(torch.cat([mixed_linear_forward(x, p) for p in parts], -1), full,
                               rtol=1e-12, atol=1e-12)
    for p in parts:
        assert p.qzeros.shape == (t.qzeros.shape[0], -(-p.out_features // 32) * bits)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("bits,gs,act", CASES)
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_row_parallel_equals_unsharded(tp, bits, gs, act, placement):
    t = random_layer(K, N, bits, gs, PLACEMENTS[placement], act, seed=bits * tp)
    x = _x()
    full = mixed_linear_forward(x, t)
    total = t.bias.double().expand(x.shape[0], N).clone()
    n_sal = 0
    for r in range(tp):
        start, size = even_slice(K, r, tp)
        p = shard_inputs(t, start, size)
        assert p.bias is None and p.in_features == size
        # only this slice's salient columns, re-indexed locally; only the groups the slice uses
        want = [i - start for i in PLACEMENTS[placement] if start <= i < start + size]
        assert p.salient_idx.tolist() == want
        n_sal += p.n_salient
        G = p.scales.shape[0]
        assert sorted(set(p.g_idx.tolist())) == list(range(G)) and G <= t.scales.shape[0]
        if want:  # the base still dequantizes to exactly 0 on the local salient columns
            assert torch.equal(codes_of(p)[p.salient_idx.long()], zeros_of(p)[p.g_idx.long()[p.salient_idx.long()]])
        total += mixed_linear_forward(x[:, start:start + size], p)
    assert n_sal == t.n_salient
    torch.testing.assert_close(total, full, rtol=1e-10, atol=1e-10)


def test_row_parallel_slice_keeps_only_its_groups():
    t = random_layer(K, N, 4, 48, [], act_order=False)  # 4 groups; tp = 4 cuts them at 48-column borders
    p = shard_inputs(t, 48, 48)
    assert p.scales.shape[0] == 1 and torch.equal(p.scales[0], t.scales[1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act", [False, True])
def test_merge_outputs_equals_concatenation(bits, act):
    # q/k/v-like parts with different salient columns; without act-order they share g_idx and merge
    sal = [[0, 5, 77, 150], [5, 9, 150, 191], []]
    parts = [random_layer(K, n, bits, 32, s, act_order=act, seed=0 if act else i)
             for i, (n, s) in enumerate(zip((64, 32, 32), sal))]
    if act:  # same permutation (seed 0) for every part: act-order with one shared g_idx still merges
        assert all(torch.equal(p.g_idx, parts[0].g_idx) for p in parts)
    x = _x()
    m = merge_outputs(parts)
    assert m is not None and m.out_features == 128
    assert m.salient_idx.tolist() == sorted({i for s in sal for i in s})
    ref = torch.cat([mixed_linear_forward(x, p) for p in parts], -1)
    torch.testing.assert_close(mixed_linear_forward(x, m), ref, rtol=1e-3, atol=1e-3)  # fp16 storage
    m32 = merge_outputs([GiftTensors(**{**p.__dict__, "salient_weight": p.salient_weight.float()}) for p in parts])
    torch.testing.assert_close(mixed_linear_forward(x, m32), ref, rtol=1e-9, atol=1e-9)  # exact in fp32
    # the merged base dequantizes to 0 on every salient column
    sidx = m.salient_idx.long()
    assert torch.equal(codes_of(m)[sidx], zeros_of(m)[m.g_idx.long()[sidx]])


def test_merge_outputs_refuses_different_g_idx():
    a = random_layer(K, 32, 4, 32, [1, 2], act_order=True, seed=1)
    b = random_layer(K, 32, 4, 32, [3], act_order=True, seed=2)
    assert merge_outputs([a, b]) is None
    assert merge_outputs([a]) is a


def test_bad_slices_are_refused():
    t = random_layer(K, N, 4, 32, [], act_order=False)
    with pytest.raises(ValueError):
        shard_outputs(t, 90, 32)
    with pytest.raises(ValueError):
        shard_inputs(t, -1, 10)
    with pytest.raises(ValueError, match="divisible"):
        even_slice(10, 0, 4)
