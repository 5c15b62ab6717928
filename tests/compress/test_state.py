"""Resumable compression state: a run killed after a decoder layer resumes from the saved layers to the same
bytes, and refuses a resume with another config."""
import os
import subprocess
import sys

import pytest

from gift_quant.cli.main import main
from tests.conftest import char_tokenizer, tiny_llama

pytestmark = pytest.mark.integration  # child processes, killed and resumed


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny4")
    m = tiny_llama(seed=3, layers=4)
    m.config.max_position_embeddings = 1024
    m.save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def _args(model_dir, out, *extra):
    return ["compress", "--model", str(model_dir), "--output", str(out), "--bits", "3", "--group-size", "32",
            "--calib-samples", "8", "--seq-len", "32", "--no-eval", "--quiet", *extra]


# the crash: SIGKILL right after decoder layer N is saved (LayerState.save patched in the child process)
_KILLED_RUN = """import os, signal, sys
from gift_quant.compress.state import LayerState
n, save = int(sys.argv[1]), LayerState.save


def killing_save(self, li, *a, **k):
    save(self, li, *a, **k)
    if li == n:
        os.kill(os.getpid(), signal.SIGKILL)


LayerState.save = killing_save
from gift_quant.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _cli(argv, kill_after: int | None = None):
    cmd = ["-m", "gift_quant.cli"] if kill_after is None else ["-c", _KILLED_RUN, str(kill_after)]
    return subprocess.run([sys.executable, *cmd, *argv], capture_output=True, text=True, env=dict(os.environ))


def test_kill_and_resume_is_bit_identical(four_layer_dir, tmp_path):
    ref = tmp_path / "ref"  # same process setup (threads) as the killed and resumed runs
    assert _cli(_args(four_layer_dir, ref)).returncode == 0
    out = tmp_path / "out"
    r = _cli(_args(four_layer_dir, out), kill_after=1)
    assert r.returncode == -9, r.stderr
    partial = tmp_path / "out.partial" / "compress"
    assert sorted(p.name for p in partial.glob("layer_*.safetensors")) == ["layer_00000.safetensors",
                                                                          "layer_00001.safetensors"]
    assert not out.exists()  # no valid-looking checkpoint after a kill
    r = _cli(_args(four_layer_dir, out))
    assert r.returncode == 2 and "--resume" in r.stderr  # never silently discards finished work
    r = _cli(_args(four_layer_dir, out, "--resume"))
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert (out / "saliency.safetensors").read_bytes() == (ref / "saliency.safetensors").read_bytes()
    assert not (tmp_path / "out.partial").exists()


def test_resume_refuses_other_config(four_layer_dir, tmp_path):
    out = tmp_path / "out"
    r = _cli(_args(four_layer_dir, out), kill_after=0)
    assert r.returncode == -9
    assert main(_args(four_layer_dir, out, "--resume", "--bits", "4")) == 2
