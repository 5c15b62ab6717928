"""The calibration entry point: every dataset form the API accepts, named sources mixed with ``a+b``, and
text the model writes itself."""
import pytest
import torch

from gift_quant import GiftConfig, GiftError
from gift_quant.compress.calibration import calibration_tensor
from gift_quant.io.data import calibration_samples, load_texts
from tests.conftest import char_tokenizer, tiny_llama

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 12, "Calibration text for a tiny model, " * 12]


def _cfg(n: int) -> GiftConfig:
    return GiftConfig(calib_samples=n, seq_len=32, seed=0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path))
    return tmp_path


def test_dataset_forms():
    cfg = GiftConfig(calib_samples=2, seq_len=16)
    tok = char_tokenizer()
    t = calibration_tensor([torch.arange(20), torch.arange(20)], None, cfg)
    assert t.shape == (2, 16)
    assert calibration_tensor([{"input_ids": list(range(10))}] * 3, None, cfg).shape == (3, 10)
    assert calibration_tensor(torch.ones(4, 40, dtype=torch.long), None, cfg).shape == (4, 16)
    assert calibration_tensor(TEXTS, tok, cfg).shape == (2, 16)
    from datasets import Dataset
    assert calibration_tensor(Dataset.from_dict({"text": TEXTS}), tok, cfg).shape == (2, 16)
    assert calibration_tensor("bundled", tok, cfg).shape == (2, 16)
    with pytest.raises(GiftError, match="tokenizer"):
        calibration_tensor(TEXTS, None, cfg)
    with pytest.raises(GiftError, match="dataset"):
        calibration_tensor(3.5, tok, cfg)
    with pytest.raises(GiftError, match="dataset"):
        calibration_tensor(["text", torch.arange(3)], tok, cfg)


def test_mixed_calibration_takes_equal_shares(cache):
    model, tok = tiny_llama(seed=3, vocab=128), char_tokenizer()
    model.generation_config.eos_token_id = None
    w = calibration_tensor("bundled+generated", tok, _cfg(5), model=model, progress=False)
    assert w.shape == (5, 32)
    bundled = calibration_samples(load_texts("bundled"), tok, 3, 32, seed=0)
    assert torch.equal(w[:3], bundled)  # the first part gets the remainder
    gen = calibration_tensor("generated", tok, _cfg(2), model=model, progress=False)
    assert torch.equal(w[3:], gen)


def test_generated_needs_the_model():
    tok = char_tokenizer()
    with pytest.raises(GiftError, match="needs the model"):
        calibration_tensor("generated", tok, _cfg(2))
    with pytest.raises(GiftError, match="calibration"):
        load_texts("generated")
    with pytest.raises(GiftError, match="empty name"):
        calibration_tensor("bundled+", tok, _cfg(2))
