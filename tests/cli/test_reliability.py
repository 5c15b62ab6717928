"""The CLI's output guarantees: the same seed gives the same bytes, a failed write leaves nothing behind, and a
bad recipe is one line on stderr with exit 2, before anything is loaded."""
import subprocess
import sys

import pytest

from gift_quant.cli.main import main


def _args(model_dir, out, *extra):
    return ["compress", "--model", str(model_dir), "--output", str(out), "--bits", "3", "--group-size", "32",
            "--calib-samples", "8", "--seq-len", "32", "--no-eval", "--quiet", *extra]


def test_deterministic_bytes(tiny_model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(tiny_model_dir, a, "--seed", "5")) == 0
    assert main(_args(tiny_model_dir, b, "--seed", "5")) == 0
    for f in ("model.safetensors", "saliency.safetensors", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_full_disk_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import errno

    import gift_quant.io.export as export

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_saliency", boom)
    out = tmp_path / "full"
    assert main(_args(tiny_model_dir, out)) == 2
    err = capsys.readouterr().err
    assert "No space left" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".full")] == []


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


@pytest.mark.integration
def test_cli_recipe_not_utf8_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"recipe: post\nbits: \xff\xfe\n")
    r = subprocess.run([sys.executable, "-m", "gift_quant.cli", "compress", "--model", str(tmp_path / "not-loaded"),
                        "--output", str(tmp_path / "out"), "--recipe", str(bad), "--no-eval", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "not a UTF-8 text file" in lines[0], r.stderr
