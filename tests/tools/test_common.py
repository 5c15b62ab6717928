"""tools/_common.py: the helpers the benchmark scripts, the tests and device_check.sh share."""
import argparse

import pytest
import torch

from gift_quant.nn.mixed_linear import MixedPrecisionLinear
from tools._common import (
    DECODER_LINEARS,
    char_tokenizer,
    ints,
    llama_config,
    random_gift_linears,
    tiny_llama,
)


def test_ints_parses_comma_lists_and_rejects_the_rest():
    assert ints("1,8, 16") == [1, 8, 16] and ints("4,") == [4] and ints("") == []
    with pytest.raises(ValueError):
        ints("4,x")
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=ints)
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--bits", "2.5"])
    assert e.value.code == 2


def test_llama_config_takes_kv_heads_when_given():
    a = argparse.Namespace(layers=2, hidden=64, intermediate=96, heads=4, vocab=100)
    assert llama_config(a).num_key_value_heads == 4
    a.kv_heads = 2
    c = llama_config(a, max_position_embeddings=512)
    assert (c.num_key_value_heads, c.max_position_embeddings, c.num_hidden_layers) == (2, 512, 2)


def test_random_gift_linears_replaces_every_decoder_linear_with_its_own_copy():
    m = tiny_llama(hidden=64, inter=128, layers=2)
    counts = random_gift_linears(m, 3, group_size=32, salient=3, act_order=True, dtype=torch.float32)
    assert len(counts) == 2 * len(DECODER_LINEARS)
    for name, k in counts.items():
        layer = m.get_submodule(name)
        assert isinstance(layer, MixedPrecisionLinear) and layer.bits == 3
        assert k == min(3, layer.in_features // 32) == layer.salient_idx.numel()
    a, b = m.model.layers[0].mlp.up_proj, m.model.layers[1].mlp.up_proj
    assert a.qweight.data_ptr() != b.qweight.data_ptr() and torch.equal(a.qweight, b.qweight)
    x = torch.randint(0, 128, (1, 8))
    assert torch.isfinite(m(x).logits).all()


def test_char_tokenizer_round_trips_text_in_a_small_vocab():
    tok = char_tokenizer()
    ids = tok("Hi, there!\n")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list("Hi, there!\n") and max(ids) < 100
    assert tok.eos_token_id == tok.pad_token_id == 1
