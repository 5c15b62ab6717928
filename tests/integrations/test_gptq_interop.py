"""GPTQ interop: layout against GPTQModel's own pack/dequant code, v1/v2 detection from the data,
import of GPTQ checkpoints (sym/asym, 2/3/4/8 bits, act-order), export loadable by GPTQModel."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import gift_quant  # noqa: F401
from gift_quant import GiftError, GiftQuantizer
from gift_quant.core.packing import pack_qweight, pack_qzeros
from gift_quant.integrations.gptq import attach_salient, export_gptq, import_gptq
from gift_quant.integrations.gptq.layout import to_gptq_words, v2_to_v1_qzeros
from tests.conftest import char_tokenizer, tiny_llama

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel 7.7 refuses a 2-core machine otherwise


def _gift_ckpt(tmp, bits=4, sym=False, k=0, gs=32, desc_act=True, seed=0):
    m = tiny_llama(seed=seed)
    torch.manual_seed(seed)
    calib = torch.randint(2, 90, (4, 48))
    q = GiftQuantizer(bits=bits, dataset=calib, group_size=gs, n_salient=k, salient_ratio=None, sym=sym,
                      desc_act=desc_act)
    q.quantize_model(m, progress=False)
    d = tmp / f"gift_b{bits}_s{int(sym)}_k{k}"
    q.save(m, d, char_tokenizer())
    return m, d


def _weights(model):
    from gift_quant.nn import MixedPrecisionLinear
    return {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, MixedPrecisionLinear)}


def _to_v1(gptq_dir, bits, label="gptq"):
    """Rewrite an exported v2 GPTQ folder in the v1 convention (as GPTQModel writes 'gptq')."""
    f = gptq_dir / "model.safetensors"
    t = load_file(str(f))
    for k in list(t):
        if k.endswith(".qzeros"):
            out_f = t[k[: -len("qzeros")] + "scales"].shape[1]
            t[k] = v2_to_v1_qzeros(t[k], bits, out_f)
    save_file(t, str(f), metadata={"format": "pt"})
    cfg = json.loads((gptq_dir / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = label
    cfg["quantization_config"]["format"] = label
    (gptq_dir / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("bits,sym,fmt,label", [(4, False, "v1", "gptq"), (4, True, "v1", "gptq"),
                                                (2, False, "v2", "gptq_v2"), (3, True, "v2", "gptq_v2"),
                                                (3, False, "v1", "gptq"), (8, True, "v1", "gptq"),
                                                (2, True, "v2", "gptq"),  # label says v1, data says v2
                                                (4, False, "v1", "gptq_v2")])  # label says v2, data v1
def test_import_detects_zero_convention_from_data(tmp_path, bits, sym, fmt, label):
    model, d = _gift_ckpt(tmp_path, bits=bits, sym=sym)
    g = tmp_path / "gptq"
    export_gptq(d, g)
    if fmt == "v1":
        _to_v1(g, bits, label)
    else:
        cfg = json.loads((g / "config.json").read_text())
        cfg["quantization_config"]["checkpoint_format"] = label
        (g / "config.json").write_text(json.dumps(cfg))
    s = import_gptq(g, tmp_path / "imported")
    assert s["zero_format"] == fmt, s["zero_format_evidence"]
    from transformers import AutoModelForCausalLM
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "imported")
    ref, got = _weights(model), _weights(back)
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=n)


def test_export_sidecar_restores_salient_columns(tmp_path):
    from transformers import AutoModelForCausalLM
    model, d = _gift_ckpt(tmp_path, bits=4, k=3)
    s = export_gptq(d, tmp_path / "gptq")
    assert s["salient_columns"] == 14 * 3 and (tmp_path / "gptq" / "gift_salient.safetensors").is_file()
    # the base as a gift model with k=0 lacks the columns; the sidecar hook adds them back exactly
    imp = tmp_path / "imp"
    import_gptq(tmp_path / "gptq", imp, zero_format="v2")
    base = AutoModelForCausalLM.from_pretrained(imp)
    x = torch.randint(2, 90, (2, 12))
    ref = model(x).logits
    assert (base(x).logits - ref).abs().max() > 1e-3
    attach_salient(base, tmp_path / "gptq" / "gift_salient.safetensors")
    torch.testing.assert_close(base(x).logits, ref, rtol=1e-4, atol=1e-4)


def test_bad_gptq_fields_are_named(tmp_path):
    _, d = _gift_ckpt(tmp_path, bits=4)
    g = tmp_path / "gptq"
    export_gptq(d, g)
    cfg0 = json.loads((g / "config.json").read_text())
    for field, value in [("checkpoint_format", "marlin"), ("bits", 5), ("pack_dtype", "int16"),
                         ("quant_method", "awq"), ("dynamic", {"-:.*down.*": {}}), ("group_size", 0),
                         ("is_marlin_format", True), ("sym", "yes")]:
        cfg = json.loads(json.dumps(cfg0))
        cfg["quantization_config"][field] = value
        if field == "checkpoint_format":
            cfg["quantization_config"].pop("format")
        (g / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=repr(field)):
            import_gptq(g, tmp_path / "x")
    # tensors that disagree with the config name the module
    cfg = json.loads(json.dumps(cfg0))
    cfg["quantization_config"]["bits"] = 3
    (g / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GiftError, match=r"model\.layers\.0\.\S+: (qweight|scales|qzeros)"):
        import_gptq(g, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ against GPTQModel's own code paths
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_equals_gptqmodel(bits):
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    torch.manual_seed(bits)
    in_f, out_f, gs = 256, 96, 64
    G, maxq = in_f // gs, 2**bits - 1
    codes = torch.randint(0, maxq + 1, (out_f, in_f))
    zeros = torch.randint(0, maxq + 1, (G, out_f))
    scales = (torch.rand(G, out_f) * 0.01 + 0.001).half()
    g_idx = torch.randperm(in_f) % G  # act-order style
    W = scales[g_idx].t().float() * (codes - zeros[g_idx].t()).float()
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = W
    tl = TorchLinear(bits=bits, group_size=gs, sym=False, desc_act=True, in_features=in_f, out_features=out_f,
                     bias=False)
    tl.pack_original(lin, scales.t().float(), zeros.t(), g_idx.int())
    assert torch.equal(tl.qweight, to_gptq_words(pack_qweight(codes.int(), bits), bits, in_f))
    assert torch.equal(tl.qzeros, to_gptq_words(pack_qzeros(zeros.int(), bits).t().contiguous(), bits, out_f).t())
    tl.post_init()
    torch.testing.assert_close(tl.dequantize_weight().t().float(), W, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bits", [3, 4])
def test_v1_writer_matches_gptqmodel(bits):
    """v2->v1 as GPTQModel converts it (word-wise for 2/4/8, per field for 3), zero-points 0 included."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
    from gptqmodel.quantization import QuantizeConfig
    torch.manual_seed(0)
    in_f, out_f, gs = 64, 64, 32
    zeros = torch.randint(0, 2**bits, (2, out_f))
    zeros[0, :5] = 0  # borrows in the word-wise subtraction
    tl = TorchLinear(bits=bits, group_size=gs, sym=False, desc_act=False, in_features=in_f, out_features=out_f,
                     bias=False)
    qz = pack_qzeros(zeros.int(), bits)
    tl.qzeros.data = to_gptq_words(qz.t().contiguous(), bits, out_f).t().contiguous().clone()
    v2 = tl.qzeros.clone()
    convert_gptq_v2_to_v1_format_module(tl, QuantizeConfig(bits=bits))
    assert torch.equal(tl.qzeros, v2_to_v1_qzeros(v2, bits, out_f))


def test_export_loads_in_gptqmodel(tmp_path):
    pytest.importorskip("gptqmodel")
    from gptqmodel import BACKEND, GPTQModel
    model, d = _gift_ckpt(tmp_path, bits=3, k=0)
    export_gptq(d, tmp_path / "gptq")
    g = GPTQModel.load(str(tmp_path / "gptq"), device="cpu", backend=BACKEND.TORCH)
    x = torch.randint(2, 90, (2, 12))
    with torch.no_grad():
        theirs = g.model(x).logits.float()
    ref = model(x).logits
    assert ((theirs - ref).norm() / ref.norm()) < 2e-2  # GPTQModel computes in bf16 on CPU
    ours = _weights(model)
    for n, w in ours.items():  # the dequantized weights agree to fp16 rounding
        torch.testing.assert_close(g.model.get_submodule(n).dequantize_weight().t().float(), w,
                                   rtol=1e-2, atol=1e-3, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("bits,sym", [(4, False), (3, True)])
def test_gptqmodel_quantized_checkpoint_imports(tmp_path, tiny_model_dir, bits, sym):
    """A checkpoint written by GPTQModel.quantize (v1 'gptq' format) imports with identical logits."""
    pytest.importorskip("gptqmodel")
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    calib = [{"input_ids": torch.randint(2, 90, (64,)).tolist(), "attention_mask": [1] * 64} for _ in range(8)]
    qc = QuantizeConfig(bits=bits, group_size=32, desc_act=True, sym=sym)
    gm = GPTQModel.load(str(tiny_model_dir), qc, device="cpu")
    gm.quantize(calib, batch_size=4)
    gm.save(str(tmp_path / "g"))
    s = import_gptq(tmp_path / "g", tmp_path / "imp")
    assert s["zero_format"] == "v1"
    assert any(q.startswith("gptqmodel:") for q in s["quantizer"]), s["quantizer"]  # the writer, as recorded
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "imp")
    theirs = GPTQModel.load(str(tmp_path / "g"), device="cpu", backend=BACKEND.TORCH)
    x = torch.randint(2, 90, (2, 16))
    with torch.no_grad():
        ref, got = theirs.model(x).logits.float(), ours(x).logits
    assert ((got - ref).norm() / ref.norm()) < 2e-3


def test_module_command_line(tmp_path, capsys):
    from gift_quant.cli import main
    _, d = _gift_ckpt(tmp_path, bits=2)
    assert main(["gptq", "export", str(d), str(tmp_path / "g")]) == 0
    assert main(["gptq", "import", str(tmp_path / "g"), str(tmp_path / "i")]) == 0
    assert '"zero_format": "v2"' in capsys.readouterr().out
    assert main(["gptq", "import", str(tmp_path / "g"), str(tmp_path / "i")]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
