import contextlib
import os

import torch

if not torch.cuda.is_available():
    # the Triton kernels' CPU check mode; must precede the first import of triton (transformers imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tools._common import char_tokenizer, tiny_llama  # noqa: E402,F401  (the tests import them from here)


@contextlib.contextmanager
def interrupted_at(monkeypatch, step: int):
    """A Ctrl-C at training step ``step`` inside the block, as a user's would land; the real loop after it."""
    import gift_quant.train.loop as loop
    real = loop.batch_rows

    def stop(s, *a):
        if s == step:
            raise KeyboardInterrupt
        return real(s, *a)
    monkeypatch.setattr(loop, "batch_rows", stop)
    try:
        yield
    finally:
        monkeypatch.setattr(loop, "batch_rows", real)


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
