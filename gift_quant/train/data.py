"""Training windows (and a held-out split) from the recipe's training text."""
from __future__ import annotations

import torch

from gift_quant.errors import GiftError
from gift_quant.train.settings import TrainSettings


def training_data(s: TrainSettings, tokenizer, seed: int):
    """(train ids [N, T], train labels or None, val ids, val labels or None)."""
    from gift_quant.io.chat import chat_windows, is_chat_source
    from gift_quant.io.data import load_train_texts, tokenize_stream, windows
    if is_chat_source(s.train_dataset):
        ids, labels = chat_windows(s.train_dataset, tokenizer, s.train_seq_len)
    else:
        texts = load_train_texts(s.train_dataset)
        if s.max_train_tokens:
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(texts), generator=g).tolist()
            picked, total = [], 0
            for i in order:
                picked.append(texts[i])
                total += len(texts[i]) // 3  # ~3+ chars per token: a cheap upper bound on tokens to tokenize
                if total >= s.max_train_tokens:
                    break
            texts = picked
        ids, labels = windows(tokenize_stream(texts, tokenizer), s.train_seq_len), None
    n_val = min(s.val_windows, max(0, ids.shape[0] - 1)) if s.eval_every else 0
    if ids.shape[0] - n_val < 1:
        raise GiftError(f"too little training text ({s.train_dataset}): fewer than one window of {s.train_seq_len} "
                        "tokens; give more text or lower --train-seq-len")
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(ids.shape[0], generator=g)
    vi, ti = perm[:n_val].sort().values, perm[n_val:].sort().values
    def pick(t, i):
        return None if t is None else t[i]
    return ids[ti], pick(labels, ti), (ids[vi] if n_val else None), (pick(labels, vi) if n_val else None)
