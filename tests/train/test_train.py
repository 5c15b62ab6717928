"""GIFT-SW training: GiftLinear gradients and noise, the training loop (tiny model)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    W = g.base.double() + qni.sample(g.base.shape, g.delta, "gaussian", seed, "cpu", torch.float32).double()
    W[:, idx] = 0
    S = g.salient_weight.detach().double().clone().requires_grad_()
    xd = x.detach().double().requires_grad_()
    yr = xd @ W.t() + xd[..., idx] @ S.t() + lin.bias.detach().double()
    yr.square().sum().backward()
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.salient_weight.grad.double(), S.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-4)


def test_row_step_matches_formula():
    torch.manual_seed(2)
    W = torch.randn(16, 100, dtype=torch.float64)
    idx = torch.tensor([0, 5])
    got = qni.row_step(W.float(), 3, idx)
    Wn = W[:, [j for j in range(100) if j not in (0, 5)]]
    levels = 2 ** 2 - 1
    want = []
    for row in Wn:
        amax = row.abs().max()
        best = None
        for i in range(17):
            a = amax * (1 - i / 20)
            step = a / levels
            err = ((torch.clamp(torch.round(row / step), -levels - 1, levels) * step - row) ** 2).sum()
            if best is None or err < best[0]:
                best = (err, a)
        want.append(best[1] / levels)
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_noise_std_matches_formula(kind):
    torch.manual_seed(3)
    g = GiftLinear.from_linear(torch.nn.Linear(128, 32, bias=False), torch.arange(0, 128, 8), bits=2, noise=kind)
    n_ns = 128 - 16
    want = qni.expected_std(g.delta, kind)
    assert torch.allclose(want, g.delta / (2 if kind == "gaussian" else 12 ** 0.5))
    est = torch.zeros(32)
    reps = 40
    for _ in range(reps):
        x = torch.randn(256, 128)  # fresh random inputs; noise resampled per call
        with torch.no_grad():
            d = g.train()(x) - g.eval()(x)
        est += d.square().mean(0) / n_ns  # E[(x N^T)_i^2] = ||N_i||^2 = n_ns * sigma_i^2
        # salient columns get no noise
        xs = torch.zeros(4, 128)
        xs[:, 8] = 1.0
        assert torch.allclose(g.train()(xs), g.eval()(xs))
    ratio = (est / reps).sqrt() / want
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
