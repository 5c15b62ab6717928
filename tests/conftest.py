import os

import torch

if not torch.cuda.is_available():
    # the Triton kernels' CPU check mode; must precede the first import of triton (transformers imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


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


def char_tokenizer():
    """A real PreTrainedTokenizerFast (character level, 128 ids), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random Llama with a tokenizer: what --model accepts."""
    d = tmp_path_factory.mktemp("tiny_llama")
    m = tiny_llama(hidden=64, inter=96, layers=2, vocab=128)
    m.config.max_position_embeddings = 1024
    m.save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


# tiny models run faster single-threaded (no OpenMP overhead, no oversubscription beside other jobs)
torch.set_num_threads(1)
