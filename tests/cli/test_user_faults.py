"""What a new user hits: each bad input, fault or odd file is one line and exit 2 (before any long work
where it can be known up front), or a warning that says what happened; help and version always work."""
import json
import os
import shutil

import pytest
import torch

from gift_quant.cli.main import build_parser, main


def _run(capsys, *argv):
    code = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gift-quant: error: ") and "Traceback" not in err, err
    return lines[0]


def _compress_args(model_dir, out, *extra):
    return ["compress", "--model", model_dir, "--output", out, "--bits", "4", "--group-size", "32",
            "--salient", "4", "--calib-samples", "4", "--seq-len", "32", "--no-eval", "--quiet", *extra]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_model_dir):
    """One small gift checkpoint the tests copy and damage."""
    out = tmp_path_factory.mktemp("ck") / "ck"
    assert main([str(x) for x in _compress_args(tiny_model_dir, out)]) == 0
    return out


def _copy(ckpt, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(ckpt, dst)
    return dst


# ---- help, version, bare command

def _subcommands():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gift-quant {command}")
    # every option says what it does
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    undocumented = [a.option_strings for a in parser._actions if not a.help and a.option_strings]
    assert not undocumented, undocumented


def test_bare_command_lists_subcommands_and_version(capsys):
    code, _, err = _run(capsys)
    assert code == 2 and all(c in err for c in _subcommands())
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    from importlib.metadata import version
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"gift-quant {version('gift-quant')}"


def test_off_flags_say_what_they_turn_off(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no-act-order turn off (on by default): act-order" in out
    assert "--no-mse-clip turn off (on by default): search the clipping range" in out


# ---- flags validated before any work (the model path does not exist: reaching it would say "not found")

BAD_FLAGS = [
    (["compress", "--eval-windows", "0"], "--eval-windows: must be >= 1, got 0"),
    (["compress", "--eval-windows", "-1"], "--eval-windows: must be >= 1, got -1"),
    (["compress", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["compress", "--seq-len", "-5"], "--seq-len must be >= 1"),
    (["compress", "--recipe", "post", "--steps", "0"], "--steps must be >= 1"),
    (["eval", "--windows", "0"], "--windows: must be >= 1, got 0"),
    (["eval", "--seq-len", "0"], "--seq-len: must be >= 1, got 0"),
    (["eval", "--seq-len", "-5"], "--seq-len: must be >= 1, got -5"),
    (["eval", "--windows", "two"], "--windows: must be an integer, got 'two'"),
    (["bench", "--eval-windows", "-1"], "--eval-windows: must be >= 0, got -1"),
    (["compress", "--eval-dataset", "nothere.txt"], "dataset file not found: nothere.txt"),
    (["eval", "--dataset", "nothere.txt"], "dataset file not found: nothere.txt"),
]


@pytest.mark.parametrize("argv,needle", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_values_one_line_before_any_work(tmp_path, capsys, argv, needle):
    missing = tmp_path / "not-loaded"
    cmd, *flags = argv
    full = [cmd, "--model", missing, "--output", tmp_path / "out", *flags] if cmd == "compress" \
        else [cmd, missing, *flags]
    code, _, err = _run(capsys, *full)
    assert code == 2 and needle in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- recipes: the noise default belongs to the method

@pytest.mark.parametrize("method,noise", [("post", "none"), ("pre", "gaussian"), ("ste", "none"), ("none", "none")])
def test_a_recipe_without_noise_gets_its_methods_default(tmp_path, method, noise):
    from gift_quant.train import load_recipe
    f = tmp_path / "r.yaml"
    f.write_text(f"recipe: {method}\nbits: 4\n")
    r = load_recipe(str(f), device="cpu")
    assert r.train.noise == noise and r.to_dict()["noise"] == noise
    assert load_recipe(str(f), {"noise": "uniform"}, device="cpu").train.noise == "uniform"  # a flag wins


def test_shipped_recipes_do_not_trigger_the_measured_worse_warning():
    from gift_quant.train import load_recipe
    from gift_quant.train.recipe import builtin_names
    for name in builtin_names():
        for device in ("cpu", "cuda"):
            r = load_recipe(name, device=device)
            if r.method == "pre":  # the condition under which pre warns that noise measured worse
                assert not (r.train.noise != "none" and (r.train.noise_bits or r.config.bits) <= 3), name


def test_user_post_recipe_trains_and_reports_without_noise(tiny_model_dir, tmp_path, capsys):
    from tests.train.test_train import TEXT
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    rec = tmp_path / "mine.yaml"
    rec.write_text("recipe: post\nbits: 2\n")
    out = tmp_path / "o"
    code, _, err = _run(capsys, *_compress_args(tiny_model_dir, out, "--recipe", rec, "--steps", "2",
                                                 "--batch-size", "1", "--train-seq-len", "32", "--dataset", text,
                                                 "--train-dataset", text))
    assert code == 0, err
    assert json.loads((out / "gift_report.json").read_text())["noise"] == "none"
    assert json.loads((out / "recipe.json").read_text())["noise"] == "none"
    assert "| noise | none |" in (out / "README.md").read_text()


# ---- checkpoints that are not what they say

def test_gift_tensors_under_another_quant_method_are_refused(ckpt, tmp_path, capsys):
    bad = _copy(ckpt, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gift_SW"
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = _run(capsys, "eval", bad, "--quiet", "--windows", "1")
    line = _one_line(err)
    assert code == 2 and "holds gift-quant tensors" in line and "'gift_SW'" in line
    from transformers import AutoModelForCausalLM

    import gift_quant  # registers gift_sw and the misnamed-config check
    with pytest.raises(gift_quant.GiftError, match="names quant_method 'gift_SW'"):
        AutoModelForCausalLM.from_pretrained(bad)
    del cfg["quantization_config"]  # no quantization_config at all: the tensors still give it away
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = _run(capsys, "eval", bad, "--quiet", "--windows", "1")
    assert code == 2 and "salient_idx, salient_weight" in _one_line(err)


def _edit_tensor(folder, key_suffix, fn):
    from safetensors.torch import load_file, save_file
    f = folder / "model.safetensors"
    t = load_file(str(f))
    key = next(k for k in t if k.endswith(key_suffix))
    t[key] = fn(t[key])
    save_file(t, str(f), metadata={"format": "pt"})
    return key.rsplit(".", 1)[0]


@pytest.mark.parametrize("suffix,fn,needle", [
    ("g_idx", lambda g: g + 1000, "invalid g_idx"),
    ("g_idx", lambda g: g - 1, "invalid g_idx"),
    ("scales", lambda s: s.index_fill(0, torch.tensor([0]), float("nan")), "non-finite scales"),
])
def test_damaged_tensors_are_refused_at_load(ckpt, tmp_path, capsys, suffix, fn, needle):
    bad = _copy(ckpt, tmp_path)
    module = _edit_tensor(bad, suffix, fn)
    code, _, err = _run(capsys, "eval", bad, "--quiet", "--windows", "1")
    line = _one_line(err)
    assert code == 2 and needle in line and module in line


def test_compressing_a_compressed_checkpoint_is_refused_up_front(ckpt, tmp_path, capsys):
    code, _, err = _run(capsys, *_compress_args(ckpt, tmp_path / "again"))
    assert code == 2 and "is a gift-quant checkpoint (quant_method 'gift_sw')" in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_output_that_is_or_holds_the_input_is_refused(ckpt, tmp_path, capsys, tiny_model_dir):
    src = _copy(ckpt, tmp_path, "src")
    before = sorted(p.name for p in src.iterdir())
    for dst, needle in [(src, "is the source"), (src / "inner", "is inside the source"),
                        (tmp_path, "contains the source")]:
        code, _, err = _run(capsys, "gptq", "export", src, dst, "--overwrite")
        assert code == 2 and needle in _one_line(err)
    assert sorted(p.name for p in src.iterdir()) == before
    assert main(["verify", str(src)]) == 0
    model = _copy(tiny_model_dir, tmp_path, "float")
    code, _, err = _run(capsys, *_compress_args(model, model, "--overwrite"))
    assert code == 2 and "is the model" in _one_line(err)
    assert (model / "config.json").is_file()


# ---- files that are not what their name says

def test_unparseable_manifest_is_one_line(ckpt, tmp_path, capsys):
    bad = _copy(ckpt, tmp_path)
    for body in ("{not json", '{"files": 3}', '["a"]', '{"files": {"x": 1}}'):
        (bad / "manifest.json").write_text(body)
        code, _, err = _run(capsys, "verify", bad)
        assert code == 2 and "unreadable manifest" in _one_line(err), body


def test_truncated_gguf_is_one_line(tmp_path, capsys):
    pytest.importorskip("gguf")
    f = tmp_path / "cut.gguf"
    f.write_bytes(b"GGUF\x03\x00\x00\x00\x02\x00")  # a header cut short
    code, _, err = _run(capsys, "eval", f, "--quiet")
    assert code == 2 and "truncated or not a valid GGUF file" in _one_line(err)


def test_binary_file_named_txt_is_not_calibration_text(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "calib.txt"
    f.write_bytes(bytes(range(256)) * 40)
    code, _, err = _run(capsys, *_compress_args(tiny_model_dir, tmp_path / "o", "--dataset", f))
    assert code == 2 and "is not UTF-8 text" in _one_line(err)
    assert not (tmp_path / "o").exists()


def test_tiny_group_size_warns_with_its_cost(tiny_model_dir, tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"--group-size 7 stores .* 2.86 extra bits per weight on top of the 4"):
        code, _, err = _run(capsys, *_compress_args(tiny_model_dir, tmp_path / "o", "--group-size", "7"))
    assert code == 0, err


# ---- bench: outputs checked before the benchmark runs

def test_bench_outputs_checked_before_it_runs(ckpt, tmp_path, capsys, monkeypatch):
    import sys

    import gift_quant.eval.bench as bench

    def never(*a, **k):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr(bench, "run", never)
    code, _, err = _run(capsys, "bench", ckpt, "--json", tmp_path / "no" / "such" / "r.json")
    assert code == 2 and "does not exist" in _one_line(err)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # a read-only folder (root ignores chmod)
    code, _, err = _run(capsys, "bench", ckpt, "--json", tmp_path / "r.json")
    assert code == 2 and "is not writable" in _one_line(err)
    monkeypatch.undo()
    monkeypatch.setattr(bench, "run", never)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = _run(capsys, "bench", ckpt, "--plot", tmp_path / "p.png")
    assert code == 2 and "--plot needs matplotlib" in _one_line(err)


# ---- faults while writing, and interruption

def test_full_disk_in_safetensors_is_one_line_and_resume_works(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import gift_quant.io.export as export
    real = export.save_saliency

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    monkeypatch.setattr(export, "save_saliency", full)
    out = tmp_path / "o"
    code, _, err = _run(capsys, *_compress_args(tiny_model_dir, out))
    line = _one_line(err)
    assert code == 2 and "No space left on device" in line and "--resume" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]
    assert (tmp_path / "o.partial").is_dir()  # the finished compression is kept
    monkeypatch.setattr(export, "save_saliency", real)
    code, _, err = _run(capsys, *_compress_args(tiny_model_dir, out, "--resume"))
    assert code == 0, err
    assert main(["verify", str(out)]) == 0


def test_ctrl_c_says_the_partial_folder_was_kept(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import gift_quant.train.runner as runner

    def interrupted(*a, work_dir=None, **k):
        (work_dir / "compress").mkdir(parents=True)
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "run_recipe", interrupted)
    code, _, err = _run(capsys, *_compress_args(tiny_model_dir, tmp_path / "o"))
    assert code == 130 and "o.partial was kept" in err and "--resume" in err and "no partial" not in err


def test_a_resumed_run_keeps_its_report(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from tests.conftest import interrupted_at
    from tests.train.test_train import TEXT
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    argv = _compress_args(tiny_model_dir, tmp_path / "o", "--recipe", "post", "--steps", "4", "--save-every", "2",
                          "--batch-size", "1", "--train-seq-len", "32", "--dataset", text, "--train-dataset", text)
    with interrupted_at(monkeypatch, 3):
        assert _run(capsys, *argv)[0] == 130
    stage = json.loads((tmp_path / "o.partial" / "compressed.json").read_text())
    code, out, err = _run(capsys, *argv, "--resume")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "gift_report.json").read_text())
    assert report["salient_columns_total"] > 0 and report["decoder_params_left_in_float"].endswith("%")
    assert report["compress_seconds"] == stage["compress_seconds"]  # the run that compressed, not 0.0
    assert "decoder parameters left in float" in out
    card = (tmp_path / "o" / "README.md").read_text()
    assert "| salient_columns_total |" in card and "| decoder_params_left_in_float |" in card


# ---- the model card

def test_model_card_names_base_model_and_what_perplexity_measured(tiny_model_dir, tmp_path, capsys):
    from gift_quant.io.export import BUNDLED_HUB_ID, base_model_id
    out = tmp_path / "o"
    argv = [a for a in _compress_args(tiny_model_dir, out) if a != "--no-eval"]
    code, _, err = _run(capsys, *argv, "--eval-windows", "2", "--eval-dataset", "licenses")
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert "| perplexity (licenses, 2 x 512 tokens) |" in card
    assert "base_model:" not in card  # a local folder is no hub id
    assert base_model_id("bundled SmolLM2-135M-Instruct") == BUNDLED_HUB_ID
    assert base_model_id("org/some-model") == "org/some-model"
    assert base_model_id(str(tiny_model_dir)) is None


def test_eval_of_a_checkpoint_without_tokenizer_is_one_line(ckpt, tmp_path, capsys):
    d = _copy(ckpt, tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (d / f).unlink(missing_ok=True)
    code, _, err = _run(capsys, "eval", d, "--windows", "1", "--seq-len", "16")
    assert code == 2 and "no tokenizer files" in _one_line(err)
