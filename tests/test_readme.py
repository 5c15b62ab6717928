"""The README's Python example runs as written, on a tiny random model in place of the bundled one."""
import re
from pathlib import Path

from gift_quant.io import model_io
from tests.conftest import char_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    readme = ROOT / "README.md"
    (code,) = re.findall(r"## Python\n\n```python\n(.*?)```", readme.read_text(), re.DOTALL)
    assert len(code.strip().splitlines()) <= 12
    model = tiny_llama()
    model.config.max_position_embeddings = 1024  # the example calibrates on 512-token windows
    monkeypatch.setattr(model_io, "load_model", lambda *a, **k: (model, char_tokenizer()))
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "readme_example"}
    exec(compile(code, str(readme), "exec"), ns)  # noqa: S102 -- the point is to run the documented code
    from gift_quant import MixedPrecisionLinear
    assert any(isinstance(m, MixedPrecisionLinear) for m in ns["model"].modules())  # the reloaded checkpoint
    bits, text = capsys.readouterr().out.split(" ", 1)
    assert 3 < float(bits) < 4.5  # 3-bit codes plus scales, zeros and FP16 columns
    assert text.replace(" ", "").startswith("deffibonacci(n):")  # the character tokenizer spaces its tokens
