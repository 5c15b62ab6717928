import json

import pytest
import torch

from gift_quant.cli.main import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _compress_args(tiny_model_dir, out, *extra):
    return ["compress", "--model", str(tiny_model_dir), "--output", str(out), "--calib-samples", "8",
            "--seq-len", "32", "--eval-windows", "2", "--quiet", *extra]


def test_compress_then_eval(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    code, stdout, err = _run(capsys, *_compress_args(tiny_model_dir, out, "--bits", "4", "--salient", "4",
                                                      "--group-size", "32"))
    assert code == 0, err
    assert "perplexity" in stdout and "bits/weight" in stdout
    for f in ("config.json", "model.safetensors", "saliency.safetensors", "README.md", "gift_report.json",
              "tokenizer.json", "generation_config.json"):
        assert (out / f).is_file(), f
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "gift_sw" and q["bits"] == 4 and set(q["salient_counts"].values()) == {4}
    from safetensors.torch import load_file
    sal = load_file(str(out / "saliency.safetensors"))
    assert sal["model.layers.0.mlp.down_proj.salient_idx"].numel() == 4
    assert sal["model.layers.0.mlp.down_proj.scores"].numel() == 96
    code, stdout, err = _run(capsys, "eval", str(out), "--windows", "2", "--quiet")
    assert code == 0, err
    ppl = float(stdout.strip().split()[-1])
    assert 1 < ppl < 1e4
    # ppl printed by compress equals the one eval measures on the reloaded checkpoint
    report = json.loads((out / "gift_report.json").read_text())
    key = next(k for k in report if k.startswith("perplexity"))
    assert report[key] == pytest.approx(ppl, rel=1e-3)


def test_rtn_and_plain_gptq(tiny_model_dir, tmp_path, capsys):
    for i, extra in enumerate([("--method", "rtn"), ("--salient", "0"), ("--metric", "wanda", "--sym")]):
        code, _, err = _run(capsys, *_compress_args(tiny_model_dir, tmp_path / f"o{i}", "--bits", "3", "--no-eval", *extra))
        assert code == 0, err


@pytest.mark.parametrize("extra,needle", [
    (("--bits", "5"), "bits"),
    (("--salient", "1000"), "larger than"),
    (("--recipe", "banana"), "unknown recipe"),
    (("--metric", "magic"), "unknown metric"),
    (("--metric-tau", "3"), "tau"),
    (("--calib-samples", "100000"), "too little calibration text"),
    (("--group-size", "0"), "--group-size"),
    # what a new user tries first: each must end in one clear line, not a traceback or a misleading message
    pytest.param(("--device", "cuda"), "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (("--device", "tpu"), "unknown device 'tpu'"),
    (("--dataset", "nothere.txt"), "dataset file not found: nothere.txt"),
    (("--seq-len", "5000"), "--seq-len 5000 is longer than the model's context window (1024 tokens)"),
    (("--recipe", "post", "--train-seq-len", "4096"), "--train-seq-len 4096 is longer than the model's context"),
])
def test_bad_input_one_line_exit_2(tiny_model_dir, tmp_path, capsys, extra, needle):
    out = tmp_path / "never"
    code, _, err = _run(capsys, *_compress_args(tiny_model_dir, out, *extra))
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_bad_paths(tmp_path, capsys, tiny_model_dir):
    code, _, err = _run(capsys, "compress", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert code == 2 and "not found" in err
    (tmp_path / "exists").mkdir()
    code, _, err = _run(capsys, *_compress_args(tiny_model_dir, tmp_path / "exists"))
    assert code == 2 and "already exists" in err
    code, _, err = _run(capsys, "eval", str(tmp_path / "exists"))
    assert code == 2 and "not a checkpoint" in err
    code, _, err = _run(capsys, "eval", str(tmp_path / "missing"))
    assert code == 2 and "not found" in err
    code, _, err = _run(capsys, "frobnicate")
    assert code == 2 and len(err.strip().splitlines()) == 1
    txt = tmp_path / "short.txt"
    txt.write_text("too short")
    code, _, err = _run(capsys, *_compress_args(tiny_model_dir, tmp_path / "o2", "--dataset", str(txt)))
    assert code == 2 and "too little" in err


def test_checkpoint_tensor_mismatch_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    assert _run(capsys, *_compress_args(tiny_model_dir, out, "--bits", "4", "--no-eval"))[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    code, _, err = _run(capsys, "eval", str(out), "--quiet")
    assert code == 2 and "model.layers.0" in err and "qweight" in err
    cfg["quantization_config"]["bits"] = 4
    (out / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    t = load_file(str(out / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.salient_weight"]
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = _run(capsys, "eval", str(out), "--quiet")
    assert code == 2 and "model.layers.1.mlp.up_proj" in err and "salient_weight" in err
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = _run(capsys, "eval", str(out), "--quiet")
    assert code == 2 and "truncated" in err
    torch.manual_seed(0)


def test_compress_calibrates_on_generated_text(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path / "cache"))
    code, _, err = _run(capsys, *_compress_args(tiny_model_dir, tmp_path / "o", "--bits", "4", "--no-eval",
                                                "--dataset", "bundled+generated"))
    assert code == 0, err
    assert len(list((tmp_path / "cache").glob("generated-*.json"))) == 1  # the model wrote half the windows
    code, _, err = _run(capsys, *_compress_args(tiny_model_dir, tmp_path / "o2", "--eval-dataset", "generated"))
    assert code == 2 and "serves calibration" in err and "Traceback" not in err


def test_training_flags_on_a_recipe_that_does_not_train_warn(tiny_model_dir, tmp_path, capsys):
    with pytest.warns(UserWarning, match="recipe none does not train; ignoring loss, steps, train_scales"):
        code, _, err = _run(capsys, *_compress_args(tiny_model_dir, tmp_path / "o", "--bits", "4", "--no-eval",
                                                     "--loss", "kd", "--steps", "5", "--train-scales"))
    assert code == 0, err
    code, _, err = _run(capsys, *_compress_args(tiny_model_dir, tmp_path / "o2", "--bits", "4", "--no-eval",
                                                 "--recipe", "ste", "--train-scales"))
    assert code == 2 and "train_scales needs recipe post" in err and "Traceback" not in err
