"""Text the model writes itself: general calibration and training text with no corpus to ship.

Why: the text that ships with CPython is Python documentation, and a model calibrated and trained on it
alone loses more on other held-out domains than on ``idle``. An instruct model asked about
everyday, scientific, historical and literary topics writes general English prose in its own
distribution (the data-free idea of LLM-QAT). A model without a chat template starts from a random
vocabulary token instead, as LLM-QAT does.

The topics avoid what the evaluation domains hold (Python, IDLE, software licenses and legal text).
Generation is seeded and cached per model under ``GIFT_QUANT_CACHE`` (default ``~/.cache/gift_quant``);
a later run that needs more text extends the cache instead of starting again.
"""
from __future__ import annotations

import json

import torch

from gift_quant.errors import GiftError
from gift_quant.io.atomic import write_json
from gift_quant.io.cache import cache_dir
from gift_quant.io.model_io import model_key

VERSION = 1  # bump when TOPICS, STYLES or the sampling below change: the cache key includes it
TOPICS = (
    "the history of the Roman Empire", "how volcanoes form", "cooking a vegetable soup at home",
    "the life cycle of a butterfly", "why the sky is blue", "a dog that got lost in a big city",
    "the causes of the French Revolution", "training for a first marathon", "how photosynthesis works",
    "a summer trip to the mountains", "supply and demand in a market economy", "the rules of chess",
    "the planets of the solar system", "how vaccines protect people", "the ocean at night",
    "the invention of the printing press", "keeping bees in a garden", "the water cycle",
    "the Industrial Revolution in Britain", "how airplanes stay in the air", "a family moving to a new country",
    "the human heart and blood circulation", "the music of Beethoven", "saving money on a small salary",
    "the first landing on the Moon", "how rainbows appear", "growing tomatoes", "the ancient Egyptian pyramids",
    "a friendship between an old fisherman and a boy", "climate and weather", "the life of Marie Curie",
    "how bread rises", "the Silk Road", "caring for a cat", "earthquakes and tectonic plates",
    "learning a foreign language as an adult", "the Renaissance in Florence", "how the immune system works",
    "a storm on a small island", "the history of the bicycle", "the migration of birds", "a village market",
    "how electricity reaches homes", "the Great Wall of China", "healthy sleep", "the deserts of the world",
    "a detective solving a mystery in a small town", "the discovery of penicillin",
)
STYLES = (
    "Write a detailed essay about {}.",
    "Explain {} to a curious student, in several paragraphs.",
    "Write a short story about {}.",
    "Write a magazine article about {}.",
)


def _prompts(tokenizer, start: int, n: int, gen: torch.Generator) -> list[list[int]]:
    """Token ids of prompts ``start .. start+n`` (chat template), or a random first token each."""
    if getattr(tokenizer, "chat_template", None):
        out = []
        for i in range(start, start + n):
            topic, style = TOPICS[i % len(TOPICS)], STYLES[(i // len(TOPICS)) % len(STYLES)]
            msgs = [{"role": "user", "content": style.format(topic)}]
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            out.append(list(ids))
        return out
    vocab = len(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + [int(torch.randint(0, vocab, (1,), generator=gen))] for _ in range(n)]


@torch.no_grad()
def _generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[list[int]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise GiftError("generated text needs a tokenizer with a pad or EOS token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, so every row continues from its last prompt token
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # the caller's RNG stays as it was
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True, temperature=0.8,
                             top_p=0.95, max_new_tokens=max_new_tokens, pad_token_id=pad)
    new = out[:, width:].cpu()
    eos = tokenizer.eos_token_id
    rows = []
    for r in new.tolist():
        if eos is not None and eos in r:
            r = r[:r.index(eos)]
        rows.append([t for t in r if t != pad])
    return rows


def generated_texts(model, tokenizer, n_tokens: int, seed: int = 0, batch_size: int = 64,
                    max_new_tokens: int = 256, progress: bool = True) -> list[str]:
    """At least ``n_tokens`` tokens of text written by ``model`` (fewer only if it keeps stopping at once),
    as one document per prompt; cached and extended per model, seed and ``VERSION``."""
    path = cache_dir() / f"generated-v{VERSION}-{model_key(model)}-s{seed}-t{max_new_tokens}.json"
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        docs = []  # [{"text": str, "tokens": int}, ...] in generation order
    have = sum(d["tokens"] for d in docs)
    if have < n_tokens:
        from tqdm.auto import tqdm
        was_training = model.training
        model.eval()
        bar = tqdm(total=n_tokens, initial=min(have, n_tokens), desc="generating calibration text", unit="tok",
                   disable=not progress)
        gen = torch.Generator().manual_seed(seed)
        stalls = 0
        try:
            while have < n_tokens:
                start = len(docs)
                n = min(batch_size, -(-(n_tokens - have) // max_new_tokens))  # the last batch: only what is missing
                prompts = _prompts(tokenizer, start, n, gen)
                rows = _generate_batch(model, tokenizer, prompts, max_new_tokens, seed * 1_000_003 + start)
                got = 0
                for r in rows:
                    docs.append({"text": tokenizer.decode(r, skip_special_tokens=True), "tokens": len(r)})
                    got += len(r)
                have += got
                bar.update(min(got, max(0, n_tokens - bar.n)))
                try:
                    write_json(path, docs)  # after every batch: an interrupted run keeps what it wrote
                except OSError:
                    pass
                stalls = stalls + 1 if got == 0 else 0
                if stalls >= 3:
                    raise GiftError("the model stops at once on every prompt: it wrote no text to calibrate on; "
                                    "pass --dataset with a text file instead")
        finally:
            bar.close()
            model.train(was_training)
    out, total = [], 0
    for d in docs:
        if total >= n_tokens:
            break
        if d["text"].strip():
            out.append(d["text"])
        total += d["tokens"]
    return out
