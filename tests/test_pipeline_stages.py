"""True-sequential staging: a layer's Linears are quantized stage by stage in forward order."""
import torch

from gift_quant import GiftConfig
from gift_quant.api import quantize_
from gift_quant.pipeline import _collect_stats, capture_inputs, decoder_layers, linears, stages

from .conftest import tiny_llama


def _layer0_and_batches():
    m = tiny_llama()
    layers, _ = decoder_layers(m)
    return layers[0], capture_inputs(m, torch.randint(0, 128, (4, 16)), 2, "cpu")


def test_llama_stages_follow_forward_order():
    layer, batches = _layer0_and_batches()
    assert stages(layer, linears(layer), batches[0]) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_early_stop_gives_the_same_statistics():
    layer, batches = _layer0_and_batches()
    lins = linears(layer)
    for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]):
        sub = {n: lins[n] for n in group}
        full = _collect_stats(layer, sub, batches, "cpu")
        early = _collect_stats(layer, sub, batches, "cpu", stop_early=True)
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


def test_cli_flag_sets_true_sequential_and_default_is_off():
    from gift_quant.cli import _config_from_args, build_parser
    base = ["compress", "--output", "x"]
    assert _config_from_args(build_parser().parse_args(base)).true_sequential is False
    assert _config_from_args(build_parser().parse_args(base + ["--true-sequential"])).true_sequential is True


def test_true_sequential_with_a_training_recipe_is_refused(tmp_path, capsys):
    from gift_quant.cli import main
    rc = main(["compress", "--recipe", "post", "--true-sequential", "--output", str(tmp_path / "o")])
    assert rc == 2 and "not supported with a training recipe" in capsys.readouterr().err


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
