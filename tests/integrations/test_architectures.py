"""Dense architectures the README lists as supported: tiny random models built from their configs.

Each one: every decoder Linear is converted, almost nothing of the decoder stays float, the saved
checkpoint reloads bit-exactly with ``from_pretrained`` and generates. MoE models: tests/compress/test_experts.py.
"""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import gift_quant  # noqa: F401
from gift_quant import GiftConfig
from gift_quant.compress import quantize_
from gift_quant.io.export import save_checkpoint
from gift_quant.nn import MixedPrecisionLinear
from gift_quant.compress.layers import decoder_layers

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
              max_position_embeddings=256, tie_word_embeddings=False)


def tiny_dense(arch: str):
    import transformers as tf
    torch.manual_seed(0)
    kv = dict(num_key_value_heads=2, intermediate_size=96)
    cfgs = {
        "llama": lambda: tf.LlamaConfig(**kv, **COMMON),
        "mistral": lambda: tf.MistralConfig(**kv, **COMMON),
        "qwen2": lambda: tf.Qwen2Config(**kv, **COMMON),
        "qwen3": lambda: tf.Qwen3Config(head_dim=16, **kv, **COMMON),
        "phi3": lambda: tf.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=1, **kv, **COMMON),
        "gemma2": lambda: tf.Gemma2Config(head_dim=16, **kv, **COMMON),
        "gpt_neox": lambda: tf.GPTNeoXConfig(intermediate_size=96, **COMMON),
        "opt": lambda: tf.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                                    vocab_size=128, max_position_embeddings=256, word_embed_proj_dim=64),
    }
    return AutoModelForCausalLM.from_config(cfgs[arch]()).eval()


DENSE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt_neox", "opt"]


@pytest.mark.parametrize("arch", DENSE)
def test_dense_architecture_converts_reloads_generates(arch, tmp_path):
    m = tiny_dense(arch)
    layers, _ = decoder_layers(m)
    n_lin = sum(isinstance(x, nn.Linear) for x in layers.modules())
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    report = quantize_(m, GiftConfig(bits=4, group_size=32, n_salient=2, salient_ratio=None, calib_samples=4,
                                     seq_len=32), dataset=calib, progress=False)
    assert len(report.modules) == n_lin > 0
    assert not any(type(x) is nn.Linear for x in layers.modules())
    assert report.coverage.float_share < 0.05  # norms and biases
    x = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        q = m(x).logits
    save_checkpoint(m, None, tmp_path, report)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(isinstance(x, MixedPrecisionLinear) for x in m2.modules()) == n_lin
    with torch.no_grad():
        assert torch.equal(m2(x).logits, q)
    assert m2.generate(x, max_new_tokens=3, do_sample=False).shape == (1, 13)
