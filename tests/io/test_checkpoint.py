import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import gift_quant
from gift_quant.config import GiftConfig
from gift_quant.io.export import save_checkpoint
from gift_quant.core.gptq import gptq_quantize
from gift_quant.nn import MixedPrecisionLinear
from gift_quant.compress.pipeline import compress_model


def _compressed(tiny_model, calib, **kw):
    cfg = GiftConfig(**{"bits": 3, "group_size": 32, "n_salient": 5, "salient_ratio": None, **kw})
    report = compress_model(tiny_model, calib, cfg, progress=False)
    return tiny_model, report


def test_every_linear_converted_and_close(tiny_model, calib):
    ref = tiny_model(calib).logits
    m, report = _compressed(tiny_model, calib, bits=8)
    mods = [x for x in m.modules() if isinstance(x, MixedPrecisionLinear)]
    assert len(mods) == 14 and len(report.modules) == 14
    assert isinstance(m.lm_head, torch.nn.Linear) and not isinstance(m.lm_head, MixedPrecisionLinear)
    rel = (m(calib).logits - ref).norm() / ref.norm()
    assert rel < 0.02
    assert 8 < report.bits_per_weight < 16


def test_save_then_from_pretrained_same_logits(tiny_model, calib, tmp_path):
    m, _ = _compressed(tiny_model, calib)
    ref = m(calib).logits
    save_checkpoint(m, None, tmp_path)
    for dtype, tol in [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)]:
        m2, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        out = m2(calib).logits.float()
        assert (out - ref).abs().max() / ref.abs().max() < tol, dtype
    assert m2.generate(calib[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_salient_columns_come_back_exactly(tiny_model, calib, tmp_path):
    # what the solver leaves in the FP columns is exactly what the checkpoint serves (fp16-rounded)
    W = tiny_model.model.layers[0].mlp.down_proj.weight.detach().clone()
    H = torch.eye(W.shape[1]) + 0.1
    qw = gptq_quantize(W, H, 2, 32, salient_idx=torch.tensor([1, 7, 50]))
    mpl = MixedPrecisionLinear.from_quantized(qw, None, 32)
    assert torch.equal(mpl.salient_weight.data, qw.salient_weight.half())
    assert torch.equal(mpl.salient_idx.long(), qw.salient_idx)
    assert torch.equal(mpl.codes().float(), qw.codes)
    m, _ = _compressed(tiny_model, calib)
    save_checkpoint(m, None, tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(m.named_modules(), m2.named_modules()):
        if isinstance(a, MixedPrecisionLinear):
            assert torch.equal(a.salient_weight.data, b.salient_weight.data), n
            for buf in ("qweight", "qzeros", "scales", "g_idx", "salient_idx"):
                assert torch.equal(getattr(a, buf), getattr(b, buf)), (n, buf)


@pytest.mark.integration
def test_registration_idempotent_and_guarded(tiny_model, calib, tmp_path):
    import importlib

    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    importlib.reload(gift_quant.integrations.transformers)  # registering twice must not raise
    assert AUTO_QUANTIZER_MAPPING["gift_sw"] is gift_quant.integrations.transformers.GiftHfQuantizer
    m, _ = _compressed(tiny_model, calib)
    save_checkpoint(m, None, tmp_path)
    # the silent path: without the plugin transformers returns random Linears; our loader never does
    code = ("import transformers, torch; m, info = transformers.AutoModelForCausalLM.from_pretrained("
            f"{str(tmp_path)!r}, output_loading_info=True); print(len(info['missing_keys']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and int(r.stdout.strip().splitlines()[-1]) > 0
    code2 = "import gift_quant\n" + code
    r = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True)
    assert r.returncode == 0 and int(r.stdout.strip().splitlines()[-1]) == 0


def test_config_json_round_trip():
    c = GiftConfig(bits=2, group_size=64, metric="owq", metric_tau="inf", salient_counts={"a": 3})
    d = c.to_dict()
    assert d["quant_method"] == "gift_sw" and d["format"] == "gift_sw/1"
    c2 = GiftConfig.from_dict(d)
    assert c2.to_dict() == d and c2.salient_for(100, "a") == 3
