"""Chat training data: the loss covers assistant tokens only."""
import json

from tests.conftest import char_tokenizer


def test_chat_data_masks_non_assistant_tokens(tmp_path):
    from gift_quant.io.chat import chat_windows
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]}] * 20
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ids, labels = chat_windows(str(f), tok, 16)
    kept = "".join(tok.decode([int(t)]) for t in labels.flatten() if t != -100)
    assert "hello!" in kept and "hi there" not in kept and "user" not in kept
