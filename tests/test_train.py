"""GIFT-SW training: GiftLinear gradients and noise, the training loop, recipes end to end (tiny model)."""
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gift_quant import GiftError, noise as qni
from gift_quant.nn import GiftLinear
from gift_quant.nn.gift_linear import swap_modules
from gift_quant.pipeline import decoder_layers
from gift_quant.recipes import load_recipe, run_recipe
from gift_quant.train import TrainSettings, train

from .conftest import char_tokenizer, tiny_llama

TEXT = ("The quick brown fox jumps over the lazy dog. Training text for a tiny model, "
        "with numbers 0123456789 and punctuation!? ") * 60


def gift_tiny(noise="gaussian", seed=0):
    m = tiny_llama(seed)
    for p in m.parameters():
        p.requires_grad_(False)
    layers, _ = decoder_layers(m)
    swap_modules(layers, lambda n, lin: GiftLinear.from_linear(lin, torch.arange(0, lin.in_features, 16), 2, noise),
                 (torch.nn.Linear,))
    return m


class _RecordMM(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
            self.shapes.append(tuple(out.shape))
        return out


def test_training_step_has_no_dense_weight_gradient():
    torch.manual_seed(0)
    g = GiftLinear.from_linear(torch.nn.Linear(256, 192), torch.tensor([1, 7, 100]), bits=2).train()
    x = torch.randn(2, 8, 256, requires_grad=True)
    y = g(x)
    # graph-saved tensors: the base buffer itself (no copy) and x[..., idx]; never a dense weight-sized extra
    saved = y.grad_fn.saved_tensors
    assert any(t.data_ptr() == g.base.data_ptr() for t in saved)
    assert sum(t.numel() for t in saved if t.data_ptr() != g.base.data_ptr()) < 192 * 256 / 4
    rec = _RecordMM()
    with rec:
        y.square().sum().backward()
    assert g.base.grad is None and not g.base.requires_grad
    assert g.salient_weight.grad.shape == (192, 3)
    assert (192, 256) not in rec.shapes and (256, 192) not in rec.shapes  # no grad_out^T @ x

    m = gift_tiny()
    ids = torch.randint(0, 128, (2, 32))
    m.train()
    m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith("salient_weight") for n in grads)
    dense = sum(mod.base.numel() for mod in m.modules() if isinstance(mod, GiftLinear))
    assert sum(t.numel() for t in grads.values()) * 8 < dense
    assert all(mod.base.grad is None for mod in m.modules() if isinstance(mod, GiftLinear))


def test_custom_grad_matches_float64_reference():
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 48)
    idx = torch.tensor([3, 10, 20, 63])
    g = GiftLinear.from_linear(lin, idx, bits=3).train()
    x = torch.randn(2, 5, 64, requires_grad=True)
    torch.manual_seed(5)
    y = g(x)
    y.square().sum().backward()
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    W = g.base.double() + qni.sample(g.base.shape, g.delta, g.g_idx, "gaussian", seed, "cpu", torch.float32).double()
    W[:, idx] = 0
    S = g.salient_weight.detach().double().clone().requires_grad_()
    xd = x.detach().double().requires_grad_()
    yr = xd @ W.t() + xd[..., idx] @ S.t() + lin.bias.detach().double()
    yr.square().sum().backward()
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.salient_weight.grad.double(), S.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,sym,gs", [(2, False, 32), (3, True, 32), (4, False, -1)])
def test_pre_delta_comes_from_the_real_quantizer(bits, sym, gs):
    """pre's Delta per group is the scale the project's quantizer (RTN with the same fit as GPTQ) stores."""
    from gift_quant.gptq import rtn_quantize
    torch.manual_seed(bits)
    lin = torch.nn.Linear(100, 24)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(1, 100) * 3)  # columns of different range, like real layers
    idx = torch.tensor([0, 5, 33, 99])
    g = GiftLinear.from_linear(lin, idx, bits, "gaussian", group_size=gs, sym=sym)
    qw = rtn_quantize(lin.weight.detach(), bits, gs, sym, idx, mse=True)
    torch.testing.assert_close(g.delta, qw.scales.t().float(), rtol=0, atol=0)
    assert torch.equal(g.g_idx, qw.g_idx)
    # noise std is half that step, per element of each group
    torch.testing.assert_close(qni.expected_std(g.delta, "gaussian")[:, g.g_idx], qw.scales[qw.g_idx].t() / 2)
    # the step is the real rounding step: |w - Q(w)| <= Delta/2 wherever the clip search did not clip
    Wq = qw.dequantize(with_salient=True)
    err = (Wq - lin.weight.detach()).abs()
    assert (err <= g.delta[:, g.g_idx] / 2 + 1e-6).float().mean() > 0.9
    if gs > 0:  # a group made only of salient columns gets no noise
        g0 = GiftLinear.from_linear(lin, torch.arange(gs), bits, "gaussian", group_size=gs, sym=sym)
        assert torch.all(g0.delta[:, 0] == 0) and torch.all(g0.delta[:, 1:] > 0)


@pytest.mark.parametrize("act_order", [False, True])
def test_post_noise_sigma_is_half_the_stored_group_scale(act_order):
    from gift_quant.nn import MixedPrecisionLinear
    mpl = MixedPrecisionLinear.random(256, 64, 2, group_size=64, n_salient=8, act_order=act_order,
                                      dtype=torch.float32, seed=int(act_order))
    g = GiftLinear.from_mixed(mpl, "gaussian")
    sigma = qni.expected_std(g.delta, "gaussian")[:, g.g_idx]          # [out, in]
    want = mpl.scales.float()[mpl.g_idx.long()].t() / 2
    assert torch.equal(sigma, want)
    # the sampled noise has that std per group (fresh draws)
    n = qni.sample((64, 256), g.delta, g.g_idx, "gaussian", 123, "cpu", torch.float64)
    for grp in range(4):
        cols = mpl.g_idx.long() == grp
        ratio = (n[:, cols] / want[:, cols].double()).std()
        assert 0.93 < ratio < 1.07
    # noise_bits splits the same stored range into more steps
    g4 = GiftLinear.from_mixed(mpl, "gaussian", noise_bits=4)
    torch.testing.assert_close(g4.delta, g.delta * 3 / 15)


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_noise_std_matches_formula(kind):
    torch.manual_seed(3)
    g = GiftLinear.from_linear(torch.nn.Linear(128, 32, bias=False), torch.arange(0, 128, 8), bits=2, noise=kind,
                               group_size=32)
    want = qni.expected_std(g.delta, kind)
    assert torch.allclose(want, g.delta / (2 if kind == "gaussian" else 12 ** 0.5))
    mask = torch.ones(128, dtype=torch.bool)
    mask[g.salient_idx] = False
    var_row = want[:, g.g_idx][:, mask].square().sum(1)   # E[(x N^T)_i^2] = sum_j sigma_ij^2 for x ~ N(0, I)
    est = torch.zeros(32)
    reps = 40
    for _ in range(reps):
        x = torch.randn(256, 128)  # fresh random inputs; noise resampled per call
        with torch.no_grad():
            d = g.train()(x) - g.eval()(x)
        est += d.square().mean(0)
        # salient columns get no noise
        xs = torch.zeros(4, 128)
        xs[:, 8] = 1.0
        assert torch.allclose(g.train()(xs), g.eval()(xs))
    ratio = (est / reps / var_row).sqrt()
    assert 0.85 < ratio.mean() < 1.15 and ratio.min() > 0.6 and ratio.max() < 1.5


def test_eval_is_deterministic_and_train_is_noisy():
    m = gift_tiny()
    ids = torch.randint(0, 128, (2, 16))
    m.eval()
    with torch.no_grad():
        a, b = m(ids).logits, m(ids).logits
        m.train()
        c = m(ids).logits
        m.eval()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    none = gift_tiny(noise="none").train()
    with torch.no_grad():
        assert torch.equal(none(ids).logits, none(ids).logits)


def test_train_loop_lowers_loss_and_only_touches_salient():
    m = gift_tiny()
    base = {n: b.clone() for n, b in m.named_buffers()}
    torch.manual_seed(0)
    data = torch.randint(0, 16, (8, 32))  # learnable: tiny vocabulary
    rep = train(m, data, TrainSettings(steps=25, lr=1e-2, batch_size=4, progress=False))
    assert rep.losses[-1] < rep.losses[0]
    assert all(torch.equal(base[n], b) for n, b in m.named_buffers())


def test_schedule_warms_up_then_decays_linearly(monkeypatch):
    import gift_quant.train as T
    seen = []
    real = T.make_scheduler

    def spy(opt, s, start=0):
        sched = real(opt, s, start)
        step = sched.step

        def record():
            seen.append(opt.param_groups[0]["lr"])  # the lr the optimizer step just used
            step()
        sched.step = record
        return sched
    monkeypatch.setattr(T, "make_scheduler", spy)
    m = gift_tiny(noise="none")
    data = torch.randint(0, 16, (8, 16))
    train(m, data, TrainSettings(steps=20, lr=1e-2, warmup_ratio=0.1, batch_size=2, progress=False))
    assert len(seen) == 20
    peak = seen.index(max(seen))
    assert peak == 2 and max(seen) == pytest.approx(1e-2)              # 2 warm-up steps, then the peak lr
    assert all(a < b for a, b in zip(seen[:peak], seen[1:peak + 1]))
    assert all(a > b for a, b in zip(seen[peak:], seen[peak + 1:]))    # strictly decaying after warm-up
    assert seen[-1] == pytest.approx(1e-2 / 18)                         # linear to 0 at step 20
    # constant and cosine are opt-in; resume replays the schedule to the same lr
    def opt():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = TrainSettings(steps=10, lr=1.0, warmup_ratio=0.1)
    assert real(opt(), s, start=6).get_last_lr()[0] == pytest.approx(4 / 9)
    s.schedule = "constant"
    assert real(opt(), s, start=6).get_last_lr()[0] == pytest.approx(1.0)
    s.schedule = "bogus"
    with pytest.raises(GiftError, match="schedule"):
        real(opt(), s)


def _write_text(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text(TEXT)
    return str(f)


def _recipe(tmp_path, method, **kw):
    txt = _write_text(tmp_path)
    ov = dict(bits=3, group_size=32, calib_dataset=txt, calib_samples=8, calib_seq_len=32, train_dataset=txt,
              seq_len=32, batch_size=2, steps=4, save_every=2, n_salient=4, salient_ratio=None,
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
    s = run_recipe(r, model, tok, out_dir=out, work_dir=tmp_path / "work", progress=False, device="cpu")
    trained = s.pop("_model")
    assert s["steps"] == 4 and s["trainable_params"] > 0
    assert json.loads((out / "recipe.json").read_text())["recipe"] == method
    loaded, _ = load_checkpoint(out)
    ids = torch.randint(0, 90, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-4)


def _post_salient(model):
    from gift_quant.nn import MixedPrecisionLinear
    return {n: m.salient_weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, MixedPrecisionLinear)}


def test_resume_after_interruption_continues_identically(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM
    import gift_quant.train as T
    tok = char_tokenizer()
    r = _recipe(tmp_path, "post")

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    full = run_recipe(r, fresh(), tok, work_dir=tmp_path / "w1", progress=False, device="cpu")["_model"]
    real = T.batch_rows

    def boom(step, *a):
        if step == 3:
            raise KeyboardInterrupt
        return real(step, *a)
    monkeypatch.setattr(T, "batch_rows", boom)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(r, fresh(), tok, work_dir=tmp_path / "w2", progress=False, device="cpu")
    monkeypatch.setattr(T, "batch_rows", real)
    assert json.loads((tmp_path / "w2" / "train_state.json").read_text())["step"] == 2
    s = run_recipe(r, fresh(), tok, work_dir=tmp_path / "w2", resume=True, progress=False, device="cpu")
    assert s["_train_report"].resumed_from == 2
    a, b = _post_salient(full), _post_salient(s["_model"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
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
    assert (r.steps, r.bits, r.recipe) == (7, 3, "post")
    assert load_recipe("post", device="cuda").steps > load_recipe("post", device="cpu").steps


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


def test_chat_data_masks_non_assistant_tokens(tmp_path):
    from gift_quant.chat import chat_windows
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]}] * 20
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ids, labels = chat_windows(str(f), tok, 16)
    kept = "".join(tok.decode([int(t)]) for t in labels.flatten() if t != -100)
    assert "hello!" in kept and "hi there" not in kept and "user" not in kept



def test_cli_post_recipe_and_errors(tmp_path, tiny_model_dir, capsys):
    from gift_quant import load_checkpoint
    from gift_quant.cli import main
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
                   progress=False, device="cpu")
    assert s["steps"] == 4 and s["trainable_params"] > 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_eval_domains_are_disjoint_from_training_and_calibration(tmp_path, monkeypatch):
    """Both held-out domains ship offline and share no document with the default train/calib text."""
    from gift_quant.data import EVAL_DOMAINS, load_texts, load_train_texts
    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path))
    train_text = "\n".join(load_train_texts("train") + load_texts("bundled"))
    for name in EVAL_DOMAINS:
        docs = load_texts(name)
        assert sum(len(d) for d in docs) > 40_000, name          # enough for 20 windows of 512 tokens
        for d in docs:
            probe = " ".join(d.split())[:300]
            assert probe not in " ".join(train_text.split()), (name, probe[:60])
    lic, idle = load_texts("licenses"), load_texts("idle")
    assert not set(lic) & set(idle)
