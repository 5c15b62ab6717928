"""Chat / instruction training data: JSONL records with ``messages`` ([{role, content}, ...]) or a
``datasets`` dataset with a ``messages`` column. The loss is masked to assistant tokens.

The assistant spans are found by rendering the chat template on growing prefixes of the conversation:
the tokens a message adds are its span (works with any template, no ``{% generation %}`` tag needed).
Conversations are packed into windows of ``seq_len`` tokens; labels of non-assistant tokens are -100.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from gift_quant.errors import GiftError


def is_chat_source(source) -> bool:
    p = Path(str(source)).expanduser()
    if p.suffix not in (".jsonl", ".json") or not p.is_file():
        return False
    with open(p, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    return '"messages"' in head


def read_conversations(source) -> list[list[dict]]:
    p = Path(str(source)).expanduser()
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise GiftError(f"{p}: not valid JSON lines ({e})") from None
    convs = []
    for i, row in enumerate(rows):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise GiftError(f"{p}: record {i + 1} has no valid 'messages' list of {{role, content}}")
        convs.append(msgs)
    return convs


def _render(tokenizer, msgs):
    out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def conversation_tokens(tokenizer, msgs) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation; labels are -100 outside assistant messages."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise GiftError("the tokenizer has no chat template; chat data needs one")
    ids, labels, prev = [], [], []
    for i in range(len(msgs)):
        cur = _render(tokenizer, msgs[: i + 1])
        if cur[: len(prev)] != prev:  # template not prefix-stable: train on the whole conversation
            cur = _render(tokenizer, msgs)
            return cur, list(cur)
        new = cur[len(prev):]
        ids.extend(new)
        labels.extend(new if msgs[i]["role"] == "assistant" else [-100] * len(new))
        prev = cur
    return ids, labels


def chat_windows(source, tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = [], []
    for msgs in read_conversations(source):
        a, b = conversation_tokens(tokenizer, msgs)
        ids.extend(a)
        labels.extend(b)
    n = len(ids) // seq_len
    if n == 0:
        raise GiftError(f"too little chat data in {source}: {len(ids)} tokens, fewer than one window of {seq_len}")
    t = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    lab = torch.tensor(labels[: n * seq_len]).view(n, seq_len)
    if (lab != -100).sum() == 0:
        raise GiftError(f"{source}: no assistant tokens to train on")
    return t, lab
