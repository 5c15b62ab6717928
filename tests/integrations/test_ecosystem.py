"""Optimum-style API, quantize-on-load, pre-quantized loading (device_map / dtype), Trainer and PEFT."""
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import gift_quant
from gift_quant import GiftConfig, GiftError, GiftQuantizer, load_quantized_model
from gift_quant.nn import MixedPrecisionLinear
from tests.conftest import char_tokenizer, tiny_llama

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 12, "Calibration text for a tiny model, " * 12]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(model, saved dir, input, reference logits) from GiftQuantizer on the tiny Llama."""
    d = tmp_path_factory.mktemp("gq")
    m = tiny_llama()
    q = GiftQuantizer(bits=4, dataset=TEXTS, group_size=32, n_salient=4, calib_samples=4, seq_len=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = q.quantize_model(m, char_tokenizer(), progress=False)
    assert out is m and isinstance(m.model.layers[0].mlp.down_proj, MixedPrecisionLinear)
    q.save(m, d, char_tokenizer())
    x = torch.randint(2, 90, (2, 16))
    with torch.no_grad():
        ref = m(x).logits
    return m, d, x, ref


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_quantize_save_from_pretrained_same_logits(quantized):
    _, d, x, ref = quantized
    assert {"model.safetensors", "config.json", "saliency.safetensors", "gift_report.json",
            "tokenizer.json"} <= {p.name for p in d.iterdir()}
    m = AutoModelForCausalLM.from_pretrained(d)
    assert type(m.model.layers[1].self_attn.q_proj) is MixedPrecisionLinear
    assert _rel(m(x).logits, ref) < 1e-3
    out = m.generate(x[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_prequantized_load_device_map_auto_dtypes(quantized, dtype, tol):
    _, d, x, ref = quantized
    m = AutoModelForCausalLM.from_pretrained(d, device_map="auto", dtype=dtype)
    lin = m.model.layers[0].mlp.down_proj
    assert lin.qweight.dtype == torch.int32 and lin.scales.dtype == torch.float16  # never cast
    with torch.no_grad():
        assert _rel(m(x).logits, ref) < tol


def test_load_quantized_model_optimum_signature(quantized):
    m0, d, x, ref = quantized
    m = load_quantized_model(m0, d, device_map="auto")
    assert _rel(m(x).logits, ref) < 1e-3
    with pytest.raises(GiftError, match="save_dir"):
        load_quantized_model(None, d / "nope")
    other = type("M", (), {"config": type("C", (), {"model_type": "gpt2"})()})()
    with pytest.raises(GiftError, match="model"):
        load_quantized_model(other, d)


def test_giftquantizer_defaults_are_giftconfigs():
    assert GiftQuantizer().config.to_dict() == GiftConfig().to_dict()
    q = GiftQuantizer(3, "bundled", n_salient=8)
    assert q.config.to_dict() == GiftConfig(bits=3, dataset="bundled", n_salient=8).to_dict()


def test_quantize_on_load_then_round_trip(tiny_model_dir, tmp_path):
    cfg = GiftConfig(bits=3, group_size=32, n_salient=4, dataset=TEXTS, calib_samples=4, seq_len=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=cfg)
    assert isinstance(m.model.layers[0].self_attn.v_proj, MixedPrecisionLinear)
    assert m.model.layers[0].self_attn.v_proj.bits == 3
    x = torch.randint(2, 90, (1, 12))
    with torch.no_grad():
        ref = m(x).logits
    m.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "gift_sw" and saved["dataset"] is None and len(saved["salient_counts"]) == 14
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert _rel(m2(x).logits, ref) < 1e-3


def test_quantize_on_load_tokenizer_field(tiny_model_dir, tmp_path):
    """A tokenizer object in the config is used, then dropped from config.json."""
    cfg = GiftConfig(bits=4, group_size=32, n_salient=0, dataset=TEXTS, calib_samples=2, seq_len=32,
                     tokenizer=char_tokenizer())
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=cfg)
    m.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"].get("tokenizer") is None
    bad = GiftConfig(bits=4, group_size=32, dataset=TEXTS, calib_samples=2, seq_len=32, tokenizer=str(tmp_path / "x"))
    with pytest.raises(GiftError, match="tokenizer"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bad)


def _trainer(model, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    torch.manual_seed(0)
    ids = torch.randint(2, 90, (8, 24)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path / "tr"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    return Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))


def test_trainer_trains_salient_columns(quantized, tmp_path):
    _, d, x, _ = quantized
    m = AutoModelForCausalLM.from_pretrained(d)
    gift_quant.prepare_for_training(m)
    trainable = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("salient_weight") for n in trainable)
    frozen = {n: b.clone() for n, b in m.named_buffers()}
    _trainer(m, tmp_path).train()
    assert all(not torch.equal(p, trainable[n]) for n, p in m.named_parameters() if p.requires_grad)
    assert all(torch.equal(b, frozen[n]) for n, b in m.named_buffers())
    m.save_pretrained(tmp_path / "trained")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    assert m2.model.layers[0].mlp.up_proj.salient_weight.dtype == torch.float16
    with torch.no_grad():
        assert _rel(m2(x).logits, m.eval()(x).logits) < 1e-3


def test_peft_lora_on_mixed_precision_linear(quantized, tmp_path):
    peft = pytest.importorskip("peft")
    from gift_quant.nn.lora import LoraMixedPrecisionLinear, load_adapter, register_peft
    _, d, x, _ = quantized
    base = gift_quant.prepare_for_training(AutoModelForCausalLM.from_pretrained(d), train="none")
    cfg = register_peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        task_type="CAUSAL_LM"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, cfg)
    wrapped = [m for m in pm.modules() if isinstance(m, LoraMixedPrecisionLinear)]
    assert len(wrapped) == 6
    assert all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    _trainer(pm, tmp_path).train()
    pm.eval()
    with torch.no_grad():
        ref = pm(x).logits
    pm.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm2 = load_adapter(AutoModelForCausalLM.from_pretrained(d), tmp_path / "adapter")
    with torch.no_grad():
        assert _rel(pm2(x).logits, ref) < 1e-5
    with pytest.raises(GiftError, match="requantize"):
        pm.merge_and_unload()


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("field,value", [("bits", 5), ("group_size", 0), ("sym", "yes"), ("desc_act", 1),
                                         ("n_salient", -1), ("salient_ratio", 2.0), ("metric", "nope"),
                                         ("metric_tau", 3), ("method", "awq"), ("damp_percent", 0),
                                         ("calib_samples", 0), ("seq_len", "512"), ("format", "gift_sw/9")])
def test_giftconfig_invalid_field_named(field, value):
    with pytest.raises(ValueError, match=rf"GiftConfig\.{field}\b"):
        GiftConfig(**{field: value})


def test_giftquantizer_bad_recipe():
    with pytest.raises(ValueError, match="recipe"):
        GiftQuantizer(recipe="post")


def _edit_checkpoint(src, dst, cfg_change=None, drop=None):
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    if cfg_change:
        c = json.loads((dst / "config.json").read_text())
        c["quantization_config"].update(cfg_change)
        (dst / "config.json").write_text(json.dumps(c))
    if drop:
        t = load_file(str(dst / "model.safetensors"))
        del t[drop]
        save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("change,drop,pattern", [
    ({"bits": 3}, None, r"model\.layers\.0\.self_attn\.q_proj: qweight has shape"),
    ({"group_size": 16}, None, r"model\.layers\.0\.self_attn\.q_proj: qzeros has shape"),
    (None, "model.layers.1.mlp.up_proj.salient_weight", r"model\.layers\.1\.mlp\.up_proj: tensor 'salient_weight' is missing"),
])
def test_checkpoint_config_disagreement_names_module(quantized, tmp_path, change, drop, pattern):
    _, d, _, _ = quantized
    bad = tmp_path / "bad"
    _edit_checkpoint(d, bad, change, drop)
    with pytest.raises(GiftError, match=pattern):
        AutoModelForCausalLM.from_pretrained(bad)
    with pytest.raises(GiftError, match=pattern):
        load_quantized_model(None, bad)


# ------------------------------------------------------------------------------------------ lm-eval
@pytest.mark.slow
def test_lm_eval_hf_harness_reads_gift_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """lm-eval's ``hf`` model on a gift checkpoint folder gives exactly what it gives on the in-memory
    quantized model (so the folder loaded the packed weights, not random Linears)."""
    lm_eval = pytest.importorskip("lm_eval")
    from pathlib import Path
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the task's data_files path is repo-relative
    cfg = GiftConfig(bits=4, group_size=32, n_salient=4, dataset=TEXTS, calib_samples=4, seq_len=64)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=cfg)
    m.save_pretrained(tmp_path / "q")
    char_tokenizer().save_pretrained(tmp_path / "q")
    tm = TaskManager(include_path="tests/lm_eval_task")
    kw = dict(tasks=["gift_heldout_topics"], task_manager=tm, device="cpu", batch_size=1, limit=2)
    from_dir = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'q'},dtype=float32", **kw)
    in_mem = lm_eval.simple_evaluate(model=HFLM(pretrained=m, tokenizer=char_tokenizer(), batch_size=1), **kw)
    a = from_dir["results"]["gift_heldout_topics"]["bits_per_byte,none"]
    b = in_mem["results"]["gift_heldout_topics"]["bits_per_byte,none"]
    assert 0 < a < 20 and abs(a - b) < 1e-4
