"""The one module-swap helper: by kind and name, nested and at the root, returning what it put in."""
import torch
from torch import nn

from gift_quant.nn.swap import set_module, swap_modules


def _net():
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))


def test_swaps_every_module_of_the_kinds_that_where_accepts():
    net = _net()
    got = swap_modules(net, lambda name, m: nn.Identity(), (nn.Linear,), where=lambda n: n != "2")
    assert sorted(got) == ["0", "1.0"]
    assert isinstance(net[0], nn.Identity) and isinstance(net[1][0], nn.Identity)
    assert isinstance(net[2], nn.Linear) and isinstance(net[1][1], nn.ReLU)
    assert all(got[n] is net.get_submodule(n) for n in got)


def test_fn_sees_the_old_module_and_its_name():
    net, seen = _net(), []

    def fn(name, m):
        seen.append((name, m.out_features))
        return nn.Linear(m.in_features, m.out_features, bias=False)
    swap_modules(net, fn, (nn.Linear,))
    assert seen == [("0", 4), ("1.0", 4), ("2", 2)]
    assert net(torch.ones(1, 4)).shape == (1, 2) and net[2].bias is None


def test_set_module_nested_and_top_level():
    net = _net()
    set_module(net, "1.1", nn.Tanh())
    set_module(net, "0", nn.Identity())
    assert isinstance(net[1][1], nn.Tanh) and isinstance(net[0], nn.Identity)
