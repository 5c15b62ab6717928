"""Recipes end to end on a tiny model: YAML, the method registry, resume, the CLI, the baselines."""
import json
import warnings

import pytest
import torch

from gift_quant import GiftError
from gift_quant.train import load_recipe, run_recipe
from gift_quant.train.loop import train
from gift_quant.train.settings import TrainSettings
from tests.conftest import char_tokenizer, interrupted_at
from tests.train.test_train import TEXT, gift_tiny


def _write_text(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text(TEXT)
    return str(f)


def _recipe(tmp_path, method, **kw):
    txt = _write_text(tmp_path)
    ov = dict(bits=3, group_size=32, dataset=txt, calib_samples=8, seq_len=32, train_dataset=txt,
              train_seq_len=32, batch_size=2, steps=4, save_every=2, n_salient=4, salient_ratio=None,
              max_train_tokens=None, noise="gaussian", lr=1e-4)  # noise on: resume must replay the noise seeds
    ov.update(kw)
    return load_recipe(method, ov, device="cpu")


@pytest.mark.parametrize("method", ["post", "pre"])
def test_recipe_end_to_end_and_reload(tmp_path, tiny_model_dir, method):
    from transformers import AutoModelForCausalLM
    from gift_quant import load_checkpoint
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = char_tokenizer()
    r = _recipe(tmp_path, method, eval_every=2, val_windows=2)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_recipe(r, model, tok, out_dir=out, work_dir=tmp_path / "work", progress=False, device="cpu")
    noise_warned = any("measured worse than without noise" in str(w.message) for w in caught)
    assert noise_warned == (method == "pre")  # pre with noise at 3 bits says what the A/B measured
    s, trained = res.summary, res.model
    assert s["steps"] == 4 and s["trainable_params"] > 0
    assert json.loads((out / "recipe.json").read_text())["recipe"] == method
    loaded, _ = load_checkpoint(out)
    ids = torch.randint(0, 90, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-4)


def _packed(model, attr):
    """``attr`` (e.g. salient_weight, scales) of every packed layer, by module name."""
    from gift_quant.nn import MixedPrecisionLinear
    return {n: getattr(m, attr).detach().clone() for n, m in model.named_modules()
            if isinstance(m, MixedPrecisionLinear)}


@pytest.mark.parametrize("scales", [False, True])  # True: two optimizer param groups to save and restore
def test_resume_after_interruption_continues_identically(tmp_path, tiny_model_dir, monkeypatch, scales):
    from transformers import AutoModelForCausalLM
    tok = char_tokenizer()
    r = _recipe(tmp_path, "post", train_scales=scales)

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    full = run_recipe(r, fresh(), tok, work_dir=tmp_path / "w1", progress=False, device="cpu").model
    with interrupted_at(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        run_recipe(r, fresh(), tok, work_dir=tmp_path / "w2", progress=False, device="cpu")
    assert json.loads((tmp_path / "w2" / "train" / "train_state.json").read_text())["step"] == 2
    s = run_recipe(r, fresh(), tok, work_dir=tmp_path / "w2", resume=True, progress=False, device="cpu")
    assert s.train_report.resumed_from == 2
    for attr in ("salient_weight", "scales"):
        a, b = _packed(full, attr), _packed(s.model, attr)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), attr
    # a checkpoint of a different recipe is refused in one line
    r2 = _recipe(tmp_path, "post", lr=5e-4)
    with pytest.raises(GiftError, match="different model or recipe"):
        run_recipe(r2, fresh(), tok, work_dir=tmp_path / "w2", resume=True, progress=False, device="cpu")


def test_recipe_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, match in [("recipe: post\nstepz: 3\n", "stepz"),
                        ("recipe: post\nsteps: many\n", "'steps' must be int"),
                        ("recipe: post\ngpu: {lr: fast}\n", "'lr'"),
                        ("- a\n- b\n", "mapping"),
                        ("recipe: post\nnoise: pink\n", "noise")]:
        bad.write_text(text)
        with pytest.raises(GiftError, match=match):
            load_recipe(str(bad))
    with pytest.raises(GiftError, match="unknown recipe"):
        load_recipe("nosuch")
    with pytest.raises(GiftError, match="not found"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(GiftError, match="'steps'"):
        load_recipe("post", {"steps": 1.5})
    r = load_recipe("post", {"steps": 7, "bits": 3}, device="cpu")
    assert (r.train.steps, r.config.bits, r.method) == (7, 3, "post")
    assert load_recipe("post", device="cuda").train.steps > load_recipe("post", device="cpu").train.steps


def test_builtin_recipe_name_wins_over_a_local_file(tmp_path, monkeypatch):
    """`--recipe none` run in a folder that holds a file named `none` still means the built-in recipe."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "none").write_text("not a recipe: [")
    assert load_recipe("none").method == "none"
    with pytest.raises(GiftError, match="not valid YAML"):            # a path to it is still read
        load_recipe(str(tmp_path / "none"))


def test_empty_or_short_training_data(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    short = tmp_path / "short.txt"
    short.write_text("too short")
    r = _recipe(tmp_path, "post", train_dataset=str(short))
    with pytest.raises(GiftError, match="too little training text"):
        run_recipe(r, model, char_tokenizer(), progress=False, device="cpu")
    with pytest.raises(GiftError, match="no training windows"):
        train(gift_tiny(), torch.zeros(0, 8, dtype=torch.long), TrainSettings(steps=1, progress=False))


def test_cli_post_recipe_and_errors(tmp_path, tiny_model_dir, capsys):
    from gift_quant import load_checkpoint
    from gift_quant.cli.main import main
    txt = _write_text(tmp_path)
    out = tmp_path / "ck"
    base = ["compress", "--model", str(tiny_model_dir), "--calib-samples", "8", "--seq-len", "32",
            "--dataset", txt, "--train-dataset", txt, "--train-seq-len", "32", "--bits", "3", "--group-size", "32",
            "--salient", "4", "--eval-windows", "1", "--quiet"]
    assert main([*base, "--output", str(out), "--recipe", "post", "--steps", "3", "--batch-size", "2",
                 "--save-every", "1"]) == 0
    assert not (tmp_path / "ck.partial").exists()
    m, _ = load_checkpoint(out)
    assert json.loads((out / "gift_report.json").read_text())["steps"] == 3
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: post\nlearning_rate: 0.1\n")
    assert main([*base, "--output", str(tmp_path / "o2"), "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learning_rate" in err[0]
    assert not (tmp_path / "o2").exists()
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert main([*base, "--output", str(tmp_path / "o3"), "--recipe", "post", "--train-dataset", str(short)]) == 2
    assert "too little training text" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ste", "lora"])
def test_baseline_recipes_run(tmp_path, tiny_model_dir, method):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    r = _recipe(tmp_path, method, noise="none")
    s = run_recipe(r, model, char_tokenizer(), out_dir=tmp_path / "out", work_dir=tmp_path / "work",
                   progress=False, device="cpu").summary
    assert s["steps"] == 4 and s["trainable_params"] > 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_post_with_kd_loss_runs_and_frees_the_teacher(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    r = _recipe(tmp_path, "post", noise="none", loss="kd")
    res = run_recipe(r, model, char_tokenizer(), work_dir=tmp_path / "work", progress=False, device="cpu")
    s = res.summary
    assert s["loss"] == "kd" and s["steps"] == 4 and s["final_train_loss"] >= 0


def test_train_norms_trains_and_saves_the_norm_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from gift_quant import load_checkpoint
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = model.model.norm.weight.detach().clone()
    r0 = _recipe(tmp_path, "post", noise="none", lr=1e-2)
    r1 = _recipe(tmp_path, "post", noise="none", lr=1e-2, train_norms=True)
    p0 = run_recipe(r0, AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), char_tokenizer(),
                    work_dir=tmp_path / "w0", progress=False, device="cpu").summary["trainable_params"]
    res = run_recipe(r1, model, char_tokenizer(), out_dir=tmp_path / "out", work_dir=tmp_path / "w1",
                     progress=False, device="cpu")
    hidden, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    assert res.summary["trainable_params"] == p0 + hidden * (2 * n_layers + 1)
    loaded, _ = load_checkpoint(tmp_path / "out")
    assert not torch.allclose(loaded.model.norm.weight.float(), before, atol=1e-3)   # trained and saved
    torch.testing.assert_close(loaded.model.norm.weight.float(), res.model.model.norm.weight.float(),
                               rtol=1e-3, atol=1e-3)


def test_kd_on_pre_without_noise_is_a_one_line_error(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    r = _recipe(tmp_path, "pre", noise="none", loss="kd")
    with pytest.raises(GiftError, match="nothing to learn"):
        run_recipe(r, model, char_tokenizer(), progress=False, device="cpu")


def test_train_scales_trains_and_saves_the_group_scales(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from gift_quant import load_checkpoint
    from gift_quant.nn import MixedPrecisionLinear
    r0 = _recipe(tmp_path, "post", noise="none", lr=1e-2)
    r1 = _recipe(tmp_path, "post", noise="none", lr=1e-2, train_scales=True, scale_lr=1e-2)
    a = run_recipe(r0, AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), char_tokenizer(),
                   work_dir=tmp_path / "w0", progress=False, device="cpu")
    b = run_recipe(r1, AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), char_tokenizer(),
                   out_dir=tmp_path / "out", work_dir=tmp_path / "w1", progress=False, device="cpu")
    def mods(m):
        return {n: x for n, x in m.named_modules() if isinstance(x, MixedPrecisionLinear)}
    ma, mb = mods(a.model), mods(b.model)
    n_scales = sum(m.scales.numel() for m in ma.values())
    assert b.summary["trainable_params"] == a.summary["trainable_params"] + n_scales
    moved = [not torch.equal(ma[n].scales, mb[n].scales) for n in ma]  # same codes, trained scales
    assert all(moved) and all(torch.equal(ma[n].qweight, mb[n].qweight) for n in ma)
    loaded, _ = load_checkpoint(tmp_path / "out")
    ids = torch.randint(0, 90, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, b.model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["pre", "ste", "lora"])
def test_train_scales_outside_post_is_a_one_line_error(tmp_path, tiny_model_dir, method):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    r = _recipe(tmp_path, method, noise="none", train_scales=True)
    with pytest.raises(GiftError, match="train_scales needs recipe post"):
        run_recipe(r, model, char_tokenizer(), progress=False, device="cpu")
