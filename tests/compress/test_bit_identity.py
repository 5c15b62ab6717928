"""The one pipeline computes exactly the paper's steps: its first layer equals, bit for bit, what the core
functions give when called by hand (the same input statistics, metric, top-k, GPTQ and packing), so moving
code between files cannot change the numbers unnoticed."""
import copy

import pytest
import torch

from gift_quant import GiftConfig, quantize_
from gift_quant.core.gptq import gptq_quantize
from gift_quant.core.packing import pack_qweight, pack_qzeros
from gift_quant.core.saliency import ActivationStats, resolve_metric, select_salient, sensitivity
from tests.conftest import tiny_llama


@pytest.mark.parametrize("bits,metric", [(3, "gift"), (2, "owq")])
def test_first_layer_equals_core_functions(bits, metric):
    torch.manual_seed(7)
    ids = torch.randint(0, 128, (8, 24))  # one calibration batch (the pipeline's batch size is 8)
    model = tiny_llama(seed=5, layers=1)
    ref = copy.deepcopy(model)
    cfg = GiftConfig(bits=bits, group_size=32, n_salient=5, salient_ratio=None, metric=metric)
    quantize_(model, cfg, dataset=ids, device="cpu", progress=False)
    got = model.model.layers[0].self_attn.q_proj

    layer = ref.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(ref.model.embed_tokens(ids))
    st = ActivationStats(x.shape[-1])
    st.add(x)
    W = layer.self_attn.q_proj.weight.detach().float()
    m = resolve_metric(metric)
    idx = select_salient(sensitivity(W, st.norm(m.rho), m, bits, 32, False), 5)
    qw = gptq_quantize(W, st.hessian, bits, 32, False, True, idx, damp=0.01, block_size=128, mse=True)

    assert torch.equal(got.salient_idx.long(), idx)
    assert torch.equal(got.qweight, pack_qweight(qw.codes.round().to(torch.int32), bits))
    assert torch.equal(got.qzeros, pack_qzeros(qw.zeros.round().to(torch.int32), bits))
    assert torch.equal(got.scales, qw.scales.to(torch.float16))
    assert torch.equal(got.g_idx.long(), qw.g_idx.long())
    assert torch.equal(got.salient_weight.data, qw.salient_weight.to(torch.float16))
