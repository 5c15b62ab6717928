"""GIFT-SW training: GiftLinear gradients and noise, the training loop (tiny model)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gift_quant import GiftError
from gift_quant.core import noise as qni
from gift_quant.nn import GiftLinear
from gift_quant.nn.swap import swap_modules
from gift_quant.compress.pipeline import decoder_layers
from gift_quant.train.loop import train
from gift_quant.train.settings import TrainSettings

from tests.conftest import tiny_llama

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
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]  # None: no scale factors, no full input
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
    from gift_quant.core.gptq import rtn_quantize
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
    import gift_quant.train.loop as T
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


def test_eval_domains_are_disjoint_from_training_and_calibration(tmp_path, monkeypatch):
    """Both held-out domains ship offline and share no document with the default train/calib text."""
    from gift_quant.io.data import EVAL_DOMAINS, load_texts, load_train_texts
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


def test_idle_text_without_idlelib_is_a_one_line_error(monkeypatch):
    """Slim Pythons (the GPU image's) have no idlelib: the default eval text must say so, not crash."""
    import sys
    from gift_quant.io.data import load_texts
    monkeypatch.setitem(sys.modules, "idlelib", None)   # makes `import idlelib` raise ImportError
    with pytest.raises(GiftError, match="idlelib.*--eval-dataset"):
        load_texts("idle")


def test_kd_loss_matches_float64_reference_on_scored_positions():
    from gift_quant.train.loop import kd_loss
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    lab = torch.randint(0, 11, (3, 7), generator=g)
    lab[0, 3:] = -100   # e.g. a chat window: only the assistant's tokens are scored
    ref, n = 0.0, 0
    for b in range(3):
        for i in range(6):
            if lab[b, i + 1] == -100:
                continue
            p = torch.softmax(t[b, i].double(), -1)
            ref += float((p * (p.log() - torch.log_softmax(s[b, i].double(), -1))).sum())
            n += 1
    assert float(kd_loss(s, t, lab)) == pytest.approx(ref / n, rel=1e-5)
    assert float(kd_loss(t, t, lab)) == pytest.approx(0.0, abs=1e-6)


def test_kd_training_moves_the_student_towards_the_teacher():
    teacher = tiny_llama(0).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # the teacher's Linears differ from the student's frozen base, as after quantization
        for n, p in teacher.named_parameters():
            if "proj" in n:
                p.add_(0.5 * p.std() * torch.randn_like(p))
    student = gift_tiny(noise="none", seed=0)
    data = torch.randint(0, 128, (8, 32))
    from gift_quant.train.loop import kd_loss

    def gap():
        with torch.no_grad():
            return float(kd_loss(student(data).logits, teacher(data).logits, data))
    before = gap()
    rep = train(student, data, TrainSettings(steps=15, lr=1e-2, batch_size=4, loss="kd", progress=False),
                teacher=teacher)
    assert rep.losses[-1] < rep.losses[0] and gap() < 0.7 * before
    # held-out windows are scored by the objective that trains: KL to the teacher, not cross-entropy
    from gift_quant.train.loop import val_loss
    val = torch.randint(0, 128, (3, 32))
    with torch.no_grad():
        kl = float(kd_loss(student(val).logits, teacher(val).logits, val))
        ce = float(student(val, labels=val).loss)
    assert val_loss(student, val, None, 2, "cpu", teacher) == pytest.approx(kl, rel=1e-4)
    assert val_loss(student, val, None, 2, "cpu") == pytest.approx(ce, rel=1e-4)
    rep = train(student, data, TrainSettings(steps=2, lr=1e-3, batch_size=4, loss="kd", eval_every=1,
                                             progress=False), val=val, teacher=teacher)
    assert 0 <= rep.val_losses[-1][1] < 0.5 * ce  # a KL, far below the cross-entropy
    with pytest.raises(GiftError, match="teacher"):
        train(student, data, TrainSettings(steps=1, loss="kd", progress=False))
    with pytest.raises(GiftError, match="loss"):
        TrainSettings(loss="mse")


@pytest.mark.parametrize("noise", ["none", "gaussian"])
def test_scale_factors_match_a_dense_float64_reference(noise):
    """post + train_scales: output and every gradient equal autograd through the dense weight
    base * mult[:, g] (+ the same noise) with the FP columns written in, on fresh random inputs."""
    from gift_quant.nn import MixedPrecisionLinear
    mpl = MixedPrecisionLinear.random(256, 96, 2, group_size=64, n_salient=8, dtype=torch.float32,
                                      seed=int(noise == "gaussian"))
    g = GiftLinear.from_mixed(mpl, noise, train_scales=True).double().train()
    with torch.no_grad():
        g.scale_mult.uniform_(0.8, 1.2)
    x = torch.randn(3, 5, 256, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    y = g(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    mult = g.scale_mult.detach().clone().requires_grad_(True)
    sal = g.salient_weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    W = g.base * mult[:, g.g_idx]
    if noise != "none":
        torch.manual_seed(11)
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())  # the draw GiftLinear.forward makes
        W = W + qni.sample(W.shape, g.delta, g.g_idx, noise, seed, "cpu", torch.float64).index_fill(1, g.salient_idx, 0)
    W = W.index_copy(1, g.salient_idx, sal)
    y2 = x2 @ W.t() + (0 if g.bias is None else g.bias)
    y2.backward(gy)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.scale_mult.grad, mult.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g.salient_weight.grad, sal.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)
    assert mult.grad.abs().max() > 0


def test_trained_scale_factors_are_written_into_the_stored_scales(monkeypatch):
    from gift_quant.nn import MixedPrecisionLinear
    monkeypatch.setenv("GIFT_QUANT_TORCH_CACHE", "1")  # the PyTorch path keeps a dequantized layout per layer
    mpl = MixedPrecisionLinear.random(128, 32, 3, group_size=32, n_salient=4, dtype=torch.float32, seed=5)
    before = mpl.scales.clone()
    g = GiftLinear.from_mixed(mpl, "none", train_scales=True)
    with torch.no_grad():
        g.scale_mult.uniform_(0.5, 1.5)
    x = torch.randn(7, 128)
    with torch.no_grad():
        stale = mpl(x)  # builds a cached layout from the untrained scales (cache on): it must not survive
        want = g.eval()(x)
        back = g.to_mixed()
    torch.testing.assert_close(back.scales, before * g.scale_mult.detach().t())
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-5)  # the packed layer computes what trained
    assert not torch.allclose(stale, want, atol=1e-3)


def test_scale_factors_take_ten_times_the_lr_by_default():
    """Adam's first step moves every parameter by its lr: the FP16 columns by lr, the scale factors by
    10 x lr (``scale_lr`` unset), or by ``scale_lr`` when given."""
    from types import SimpleNamespace
    from gift_quant.nn import MixedPrecisionLinear

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 128).requires_grad_(False)
            mpl = MixedPrecisionLinear.random(128, 32, 2, group_size=32, n_salient=4, dtype=torch.float32, seed=9)
            self.lin = GiftLinear.from_mixed(mpl, "none", train_scales=True)

        def forward(self, input_ids, labels=None, use_cache=False):
            return SimpleNamespace(loss=self.lin(self.emb(input_ids)).square().mean())

    for scale_lr, want, wd in ((None, 1e-2, 0.0), (3e-3, 3e-3, 0.0), (None, 1e-2, 0.5)):
        torch.manual_seed(0)
        m = Wrap()
        s0, m0 = m.lin.salient_weight.detach().clone(), m.lin.scale_mult.detach().clone()
        train(m, torch.randint(0, 50, (4, 16)), TrainSettings(steps=1, lr=1e-3, scale_lr=scale_lr, batch_size=4,
                                                             warmup_ratio=0.0, schedule="constant", weight_decay=wd,
                                                             max_grad_norm=None, progress=False))
        if not wd:
            torch.testing.assert_close((m.lin.salient_weight.detach() - s0).abs(), torch.full_like(s0, 1e-3),
                                       rtol=1e-3, atol=1e-7)
        # never decayed towards 0: a factor's neutral value is 1
        torch.testing.assert_close((m.lin.scale_mult.detach() - m0).abs(), torch.full_like(m0, want),
                                   rtol=1e-3, atol=1e-7)
