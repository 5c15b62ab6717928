"""Inference needs neither ``datasets`` nor ``gguf`` (the GPU machines have neither): importing the package,
loading a checkpoint and running it work in an environment where both are missing."""
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("datasets", "gguf")

_INFER = """
import sys, torch
import gift_quant
from gift_quant import load_checkpoint
model, _ = load_checkpoint(sys.argv[1])
with torch.no_grad():
    print(tuple(model(torch.randint(0, 128, (1, 8))).logits.shape))
hidden = [m for m in sys.modules if m.split(".")[0] in ("datasets", "gguf")]
assert not hidden, hidden
"""


def _site_without(tmp_path: Path) -> Path:
    """A copy of site-packages (symlinks) without the hidden packages."""
    view = tmp_path / "site"
    view.mkdir()
    for p in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not p.name.lower().startswith(HIDDEN) and not p.name.endswith(".pth"):
            (view / p.name).symlink_to(p)
    return view


@pytest.mark.integration
def test_inference_without_datasets_and_gguf(tmp_path):
    from gift_quant import GiftConfig, quantize_
    from gift_quant.io.export import save_checkpoint
    m = tiny_llama()
    quantize_(m, GiftConfig(bits=4, group_size=32, n_salient=4), dataset=__import__("torch").randint(0, 128, (4, 16)),
              progress=False)
    save_checkpoint(m, None, tmp_path / "ck")
    env = {"PYTHONPATH": f"{ROOT}:{_site_without(tmp_path)}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-S", "-c", _INFER, str(tmp_path / "ck")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().endswith("(1, 8, 128)")
    # the environment really lacks them
    q = subprocess.run([sys.executable, "-S", "-c", "import datasets"], capture_output=True, text=True, env=env)
    assert q.returncode != 0 and "No module named 'datasets'" in q.stderr
