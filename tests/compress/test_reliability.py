"""Nothing lost: kill-and-resume, determinism, atomic output on write failure."""
import os
import subprocess
import sys

import pytest

from gift_quant.cli.main import main
from tests.conftest import char_tokenizer, tiny_llama


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


# the crash the test installs: SIGKILL right after decoder layer N is saved (a hook of the pipeline)
_KILLED_RUN = """import os, signal, sys
from gift_quant.compress import pipeline
n = int(sys.argv[1])
pipeline.LAYER_DONE_HOOKS.append(lambda li: li == n and os.kill(os.getpid(), signal.SIGKILL))
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


def test_deterministic_bytes(four_layer_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(four_layer_dir, a, "--seed", "5")) == 0
    assert main(_args(four_layer_dir, b, "--seed", "5")) == 0
    for f in ("model.safetensors", "saliency.safetensors", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_full_disk_leaves_nothing(four_layer_dir, tmp_path, monkeypatch, capsys):
    import errno

    import gift_quant.io.export as export

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_saliency", boom)
    out = tmp_path / "full"
    assert main(_args(four_layer_dir, out)) == 2
    err = capsys.readouterr().err
    assert "No space left" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".full")] == []


def test_manifest_verify(four_layer_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(_args(four_layer_dir, out)) == 0
    assert main(["verify", str(out)]) == 0
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    (out / "model.safetensors").write_bytes(bytes(data[:100]))
    assert main(["verify", str(out)]) == 2
    assert main(["verify", str(tmp_path)]) == 2


BAD_RECIPES = [
    ('bits: "two"', "recipe key 'bits' must be int, got 'two'"),
    ("bits: true", "recipe key 'bits' must be int, got True"),
    ("steps: many", "recipe key 'steps' must be int"),
    ("steps: 2.5", "recipe key 'steps' must be int, got 2.5"),
    ('train: {steps: "many"}', "unknown recipe key 'train'"),
    ("gpu: {steps: many}", "(gpu): recipe key 'steps' must be int"),
    ("cpu: [1, 2]", "'cpu' must be a mapping"),
    ("n_salient: [1]", "'n_salient' must be int/null"),
    ("lr: 1e-4", "write 1.0e-4"),  # YAML 1.1 reads 1e-4 (no dot) as a string
    ("lr: .inf", "lr: must be a finite number"),
    ("max_grad_norm: -1.0", "max_grad_norm: must be >= 0"),
    ("noise_bits: 1", "noise_bits: must be one of 2, 3, 4, 8"),
    ("bits: 5", "bits"),
    ("bits: 3\nbits: 4", "key 'bits' is given twice"),
    ("bits: [unclosed", "not valid YAML"),
]


@pytest.mark.parametrize("body,needle", BAD_RECIPES, ids=[b.split(":")[0] + str(i) for i, (b, _) in
                                                         enumerate(BAD_RECIPES)])
def test_cli_recipe_with_wrong_types_is_one_line_exit_2(tmp_path, capsys, body, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"recipe: post\n{body}\n")
    out = tmp_path / "out"
    # the model path does not exist: the recipe must be refused before anything is loaded
    assert main(["compress", "--model", str(tmp_path / "not-loaded"), "--output", str(out), "--recipe", str(bad),
                 "--no-eval", "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gift-quant: error: ") and needle in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no output, no .partial


def test_cli_recipe_not_utf8_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"recipe: post\nbits: \xff\xfe\n")
    r = _cli(["compress", "--model", str(tmp_path / "not-loaded"), "--output", str(tmp_path / "out"),
              "--recipe", str(bad), "--no-eval", "--quiet"])
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "not a UTF-8 text file" in lines[0], r.stderr
