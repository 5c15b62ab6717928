"""MixedPrecisionExperts: the fused experts of transformers 5 split into one Linear per expert, exactly, and
its forward against a plain loop over experts in float64."""
import pytest
import torch
from torch import nn

from gift_quant.nn import MixedPrecisionLinear
from gift_quant.nn.experts import (
    MixedPrecisionExperts,
    is_fused_experts,
    split_fused_experts,
)
from tests.compress.test_experts import ARCHS, MOE_LAYERS, tiny_moe


@pytest.mark.parametrize("arch", ARCHS)
def test_split_is_exact_and_detected(arch):
    m = tiny_moe(arch)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = m(x).logits
        names = split_fused_experts(m)
        assert len(names) == MOE_LAYERS[arch] and all(n.endswith("mlp.experts") for n in names)
        assert torch.equal(m(x).logits, ref)
    assert not any(is_fused_experts(mod) for mod in m.modules())


def test_unsupported_layouts_are_not_detected():
    import transformers as tf
    cfg = tf.GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                          head_dim=16, layer_types=["full_attention"])
    m = tf.GptOssForCausalLM(cfg)
    assert not is_fused_experts(m.model.layers[0].mlp.experts)  # transposed, with bias
    assert split_fused_experts(m) == []


def test_forward_matches_a_loop_over_experts():
    gen = torch.Generator().manual_seed(0)
    E, H, I, T, K = 3, 32, 32, 7, 2
    gu = [MixedPrecisionLinear.random(H, 2 * I, 4, 32, 2, dtype=torch.float32, seed=e) for e in range(E)]
    dn = [MixedPrecisionLinear.random(I, H, 4, 32, 2, dtype=torch.float32, seed=10 + e) for e in range(E)]
    ex = MixedPrecisionExperts(gu, dn, nn.SiLU())
    x = torch.randn(T, H, generator=gen)
    idx = torch.randint(0, E + 1, (T, K), generator=gen)  # E: an expert that lives elsewhere, skipped
    w = torch.rand(T, K, generator=gen)
    with torch.no_grad():
        got = ex(x, idx, w)
    ref = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            e = int(idx[t, j])
            if e == E:
                continue
            gate, up = (x[t].double() @ gu[e].dequantize(torch.float64).t()).chunk(2)
            ref[t] += w[t, j].double() * (dn[e].dequantize(torch.float64) @ (nn.functional.silu(gate) * up))
    assert torch.allclose(got.double(), ref, atol=1e-4)


def test_one_projection_per_expert():
    with pytest.raises(ValueError, match="one gate_up and one down"):
        MixedPrecisionExperts([nn.Linear(2, 4)], [], nn.SiLU())
