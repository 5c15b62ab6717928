import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, hidden: int = 64, inter: int = 96, layers: int = 2, vocab: int = 128):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


class TinyTokenizer:
    """Byte-level stand-in so data paths run without a tokenizer file."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + b % 127 for b in text.encode()]}


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def calib():
    torch.manual_seed(1)
    return torch.randint(0, 128, (16, 32))
