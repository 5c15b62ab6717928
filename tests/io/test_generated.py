"""Self-generated calibration text: amount, cache (reuse and extension), mixing, RNG left alone."""
import pytest
import torch

from gift_quant.io import generated
from tests.conftest import char_tokenizer, tiny_llama


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path))
    return tmp_path


def test_generates_enough_tokens_caches_and_extends(cache, monkeypatch):
    model, tok = tiny_llama(seed=3, vocab=128), char_tokenizer()
    model.generation_config.eos_token_id = None  # a random model would stop at random: keep the count exact
    calls = []
    real = generated._generate_batch
    monkeypatch.setattr(generated, "_generate_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = torch.random.get_rng_state()
    texts = generated.generated_texts(model, tok, 100, batch_size=4, max_new_tokens=16, progress=False)
    assert torch.equal(rng, torch.random.get_rng_state())  # the caller's RNG is untouched
    assert len(calls) == 2 and len(texts) == 7  # 4 docs, then only the 3 still missing: 7 x 16 >= 100
    assert sum(len(tok(t)["input_ids"]) for t in texts) >= 100
    assert len(list(cache.glob("generated-*.json"))) == 1
    again = generated.generated_texts(model, tok, 100, batch_size=4, max_new_tokens=16, progress=False)
    assert again == texts and len(calls) == 2  # read from the cache
    more = generated.generated_texts(model, tok, 190, batch_size=4, max_new_tokens=16, progress=False)
    assert more[:7] == texts and len(calls) == 4  # extended (4 docs, then 2), not regenerated


def test_chat_template_prompts_name_the_topics():
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    prompts = generated._prompts(tok, 0, 3, torch.Generator().manual_seed(0))
    assert len(prompts) == 3
    text = "".join(tok.convert_ids_to_tokens(prompts[1]))
    assert text.startswith("<user>") and text.endswith("<assistant>")  # rendered through the chat template
    assert generated.TOPICS[1] in text


def test_topics_avoid_the_evaluation_domains():
    words = ("python", "idle", "license", "licence", "copyright", "software", "legal", "law")
    for t in generated.TOPICS + generated.STYLES:
        assert not any(w in t.lower().split() for w in words), t
