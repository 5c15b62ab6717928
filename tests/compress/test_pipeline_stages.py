"""True-sequential staging: a layer's Linears are quantized stage by stage in forward order."""
import torch

from gift_quant import GiftConfig
from gift_quant.compress.api import quantize_
from gift_quant.compress.layers import capture_inputs, collect_stats, decoder_layers, linears, stages

from tests.conftest import tiny_llama


def _layer0_and_batches():
    m = tiny_llama()
    layers, _ = decoder_layers(m)
    return layers[0], capture_inputs(m, torch.randint(0, 128, (4, 16)), 2, "cpu")


def test_llama_stages_follow_forward_order():
    layer, batches = _layer0_and_batches()
    assert stages(layer, linears(layer, GiftConfig()), batches[0]) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_early_stop_gives_the_same_statistics():
    layer, batches = _layer0_and_batches()
    lins = linears(layer, GiftConfig())
    for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]):
        sub = {n: lins[n] for n in group}
        full = collect_stats(layer, sub, batches, "cpu")
        early = collect_stats(layer, sub, batches, "cpu", stop_early=True)
        for n in group:
            assert torch.equal(full[n].xtx, early[n].xtx) and full[n].n == early[n].n


def test_true_sequential_calibrates_later_stages_on_quantized_outputs(calib):
    """o_proj's statistics differ once q/k/v are quantized first; the flag is honoured and saved."""
    out, first = {}, {}
    for ts in (True, False):
        m = tiny_llama()
        cfg = GiftConfig(bits=2, group_size=32, n_salient=4, true_sequential=ts)
        quantize_(m, cfg, dataset=calib[:4], progress=False)
        out[ts] = m.model.layers[0].self_attn.o_proj
        first[ts] = m.model.layers[0].self_attn.q_proj
        assert m.config.quantization_config.true_sequential is ts
    assert not torch.equal(out[True].qweight, out[False].qweight) or \
        not torch.equal(out[True].salient_weight, out[False].salient_weight)
    # the first stage sees the same (unquantized) input either way
    assert torch.equal(first[True].qweight, first[False].qweight)


def _recipe_from_cli(*argv):
    from gift_quant.cli.flags import overrides
    from gift_quant.cli.main import build_parser
    from gift_quant.train import TrainSettings, load_recipe
    a = build_parser().parse_args(["compress", "--output", "x", *argv])
    return load_recipe(a.recipe, overrides(a, GiftConfig, TrainSettings), "cpu")


def test_cli_flag_sets_true_sequential_and_default_is_off():
    assert _recipe_from_cli().config.true_sequential is False
    assert _recipe_from_cli("--true-sequential").config.true_sequential is True


def test_every_compression_flag_reaches_a_training_recipe():
    """One config: the metric-norm and staging flags reach a training recipe's GiftConfig."""
    c = _recipe_from_cli("--recipe", "post", "--true-sequential", "--metric-tau", "2", "--metric-rho", "1",
                         "--metric-gamma", "0.5", "--metric-weight", "raw", "--damp-percent", "0.05").config
    assert (c.true_sequential, c.metric_tau, c.metric_rho, c.metric_gamma, c.metric_weight, c.damp_percent) == \
        (True, "2", "1", 0.5, "raw", 0.05)
    assert c.resolved_metric().tau == 2.0 and c.recipe == "post"


def test_compression_runs_without_autograd(calib):
    """Calibration forwards must not record graphs: a recorded graph keeps every layer's activations
    alive (RSS grew by >1 GB per layer on the bundled model when this regressed)."""
    m = tiny_llama()
    seen = []
    for layer in m.model.layers:
        layer.register_forward_hook(lambda mod, i, o: seen.append((torch.is_grad_enabled(), o[0].requires_grad
                                                                  if isinstance(o, tuple) else o.requires_grad)))
    with torch.enable_grad():
        quantize_(m, GiftConfig(bits=3, group_size=32, n_salient=4, true_sequential=True), dataset=calib[:4],
                  progress=False)
    assert seen and not any(g or r for g, r in seen)


def test_stat_passes_split_by_memory_budget():
    from gift_quant.compress.layers import stat_passes
    layer, _ = _layer0_and_batches()
    lins = linears(layer, GiftConfig())
    assert stat_passes(lins, 8.0) == [list(lins)]                       # everything fits: one pass
    one = max(m.in_features for m in lins.values()) ** 2 * 4 / 2**30
    assert stat_passes(lins, one * 0.5) == [[n] for n in lins]          # each alone over budget: one each
    passes = stat_passes(lins, one * 2.5)
    assert [n for p in passes for n in p] == list(lins) and 1 < len(passes) < len(lins)


def test_layer_in_several_passes_is_bit_identical_to_one_pass(calib):
    """A memory budget that forces one Linear per calibration pass changes nothing in the result."""
    states = []
    for gb in (8.0, 1e-9):
        m = tiny_llama()
        quantize_(m, GiftConfig(bits=2, group_size=32, n_salient=4, stats_memory_gb=gb), dataset=calib,
                  progress=False)
        states.append({k: v for k, v in m.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
