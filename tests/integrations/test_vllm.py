"""Serving gift checkpoints through vLLM (CPU backend): greedy tokens and logprobs against transformers.

Runs only where vLLM is importable (CI's separate vllm venv, see .ci/run); skipped in the main venv.
"""
import gc
import os

import pytest
import torch

for _k, _v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)
vllm = pytest.importorskip("vllm")

from transformers import LlamaConfig, LlamaForCausalLM

from gift_quant.config import GiftConfig
from gift_quant.io.export import save_checkpoint
from gift_quant.integrations.transformers import load_checkpoint
from gift_quant.integrations.vllm import register
from gift_quant.compress.pipeline import compress_model

NEW_TOKENS = 32


def _tiny_llama(seed=0, bias=False):
    # head_dim 32: the smallest the CPU attention backend takes; a sharp head so greedy has no near-ties
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False,
                      attention_bias=bias, mlp_bias=bias,
                      bos_token_id=None, eos_token_id=None)  # no EOS: every run makes all its tokens
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return m


def _checkpoint(path, bits, act, bias=False):
    model = _tiny_llama(bias=bias)
    calib = torch.randint(3, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    cfg = GiftConfig(bits=bits, group_size=32, desc_act=act, n_salient=6, salient_ratio=None)
    # fixed, different FP16 columns per Linear (odd places: first, last, neighbours), so merged q/k/v and
    # gate/up parts never share their columns
    g = torch.Generator().manual_seed(bits)
    salient = {n: torch.cat([torch.tensor([0, m.in_features - 1]), 1 + torch.randperm(m.in_features - 2, generator=g)[:4]])
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    compress_model(model, calib, cfg, progress=False, salient=salient)
    save_checkpoint(model, None, path)
    return path


def _mergeable(path, first, rest):
    """Whether the checkpoint's parts of one merged vLLM layer share g_idx (then they merge into one)."""
    from safetensors.torch import load_file
    sd = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    g = [sd[f"model.layers.0.{p}.g_idx"] for p in (first, *rest)]
    return all(torch.equal(x, g[0]) for x in g)


def _prompts(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 12)]


def _hf_greedy(path, prompts):
    """Greedy tokens and the logprob of each chosen token, from transformers in fp32."""
    model, _ = load_checkpoint(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # vLLM runs with ignore_eos
    out = []
    for p in prompts:
        g = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                           output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        toks = g.sequences[0, len(p):].tolist()
        lps = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(g.scores, toks)]
        out.append((toks, lps))
    return out


def _layout(model):
    """Per gift layer: (vLLM name, parts, dtypes); and whether any float weight was materialized."""
    from gift_quant.integrations.vllm.method import GiftShard
    layers = {n: [s for s in m.gift_shards] for n, m in model.named_modules() if hasattr(m, "gift_shards")}
    assert layers and all(isinstance(s, GiftShard) and s.qweight.dtype == torch.int32
                          for shards in layers.values() for s in shards)
    dense = [n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
    return {n.rsplit(".", 1)[-1]: len(s) for n, s in layers.items()}, dense


def _vllm_greedy(path, prompts, layout=None, **kw):
    llm = vllm.LLM(model=str(path), dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
                   max_model_len=128, max_num_seqs=4, seed=0, **kw)
    if layout is not None:
        layout.extend(llm.apply_model(_layout))
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0, detokenize=False)
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    out = [(list(r.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)])
           for r in res]
    del llm
    gc.collect()
    return out


def _compare(hf, vl):
    for (ht, hl), (vt, vlp) in zip(hf, vl):
        assert vt == ht, f"greedy tokens differ: vLLM {vt} vs transformers {ht}"
        assert len(vt) == NEW_TOKENS
        assert max(abs(a - b) for a, b in zip(hl, vlp)) < 1e-3


def test_register_is_idempotent():
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        get_quantization_config,
    )
    register()
    register()
    assert QUANTIZATION_METHODS.count("gift_sw") == 1
    assert get_quantization_config("gift_sw").__name__ == "GiftVllmConfig"


def test_entry_point_declared_when_installed():
    from importlib.metadata import entry_points
    if not _installed():
        pytest.skip("gift-quant is not installed in this venv (PYTHONPATH only)")
    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "gift_sw"]
    assert len(eps) == 1 and eps[0].value == "gift_quant.integrations.vllm:register"
    eps[0].load()()  # what vLLM's plugin loader does in every process


def test_g_idx_is_kept_by_the_weight_mapper():
    from gift_quant.integrations.vllm.method import GiftVllmConfig
    cfg = GiftVllmConfig.from_config(GiftConfig(bits=3).to_dict())
    assert list(cfg.get_checkpoint_weight_mapper().apply([("a.q_proj.g_idx", torch.zeros(1))]))[0][0] == "a.q_proj.g_idx"


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register()  # the test process may run from a PYTHONPATH checkout, where no entry point exists


# (bits, act-order, biases): act-order gives each of q/k/v its own g_idx (parts run separately);
# without it the parts share g_idx and merge into one packed layer
@pytest.mark.parametrize("bits,act,bias", [(2, True, False), (3, True, True), (4, True, False), (8, True, False),
                                           (4, False, True)])
def test_tiny_llama_matches_transformers(tmp_path, bits, act, bias):
    _checkpoint(tmp_path, bits, act, bias)
    prompts = _prompts(256)
    layout = []
    _compare(_hf_greedy(tmp_path, prompts), _vllm_greedy(tmp_path, prompts, layout))
    parts, dense = layout[0]
    assert not dense, f"float weights materialized: {dense}"  # the weights stay packed
    assert set(parts) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    # act-order: q/k/v and gate/up pick different FP16 columns, so different g_idx: one part each;
    # without act-order they share g_idx and merge into one packed layer
    assert (parts["qkv_proj"], parts["gate_up_proj"]) == ((3, 2) if act else (1, 1))


def _installed():
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        distribution("gift-quant")
        return True
    except PackageNotFoundError:
        return False


# Worker processes find the plugin only through the installed entry point. vLLM's CPU backend pins one
# NUMA node per worker by default; "nobind" lets tp ranks share this machine's cores.
@pytest.mark.skipif(not _installed(), reason="tensor parallel workers need gift-quant installed (entry point)")
@pytest.mark.parametrize("tp,bits,act", [(2, 3, True), pytest.param(4, 2, False, marks=pytest.mark.slow)])
def test_tensor_parallel_matches_transformers(tmp_path, monkeypatch, tp, bits, act):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    _checkpoint(tmp_path, bits, act, bias=True)
    prompts = _prompts(256)
    layout = []
    vl = _vllm_greedy(tmp_path, prompts, layout, tensor_parallel_size=tp, distributed_executor_backend="mp")
    _compare(_hf_greedy(tmp_path, prompts), vl)
    assert len(layout) == tp and all(not dense for _, dense in layout)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bundled_smollm2_matches_transformers(tmp_path, bits):
    from gift_quant.io.data import calibration_samples, load_texts
    from gift_quant.io.model_io import load_model
    model, tok = load_model(None)
    calib = calibration_samples(load_texts("bundled"), tok, 8, 128)
    compress_model(model, calib, GiftConfig(bits=bits, desc_act=True), progress=False)
    save_checkpoint(model, tok, tmp_path)
    prompts = [tok("The Python language reference says that")["input_ids"],
               tok("def fibonacci(n):")["input_ids"]]
    _compare(_hf_greedy(tmp_path, prompts), _vllm_greedy(tmp_path, prompts))


def test_merged_layer_parts_must_agree_on_conversion():
    from gift_quant.errors import GiftError
    from gift_quant.integrations.vllm.method import GiftVllmConfig
    attn = "model.layers.0.self_attn"
    cfg = GiftVllmConfig.from_config(GiftConfig(modules_not_converted=["lm_head", f"{attn}.q_proj"]).to_dict())
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with pytest.raises(GiftError, match="converted only some"):
        cfg.is_skipped(f"{attn}.qkv_proj")
    assert not cfg.is_skipped("model.layers.1.self_attn.qkv_proj") and cfg.is_skipped("lm_head")
    cfg.modules_not_converted += [f"{attn}.k_proj", f"{attn}.v_proj"]
    assert cfg.is_skipped(f"{attn}.qkv_proj")


def test_bad_checkpoint_tensors_name_the_layer():
    from gift_quant.errors import GiftError
    from gift_quant.integrations.vllm.method import _checked
    cfg = GiftConfig(bits=4, group_size=32)
    good = {"qweight": torch.zeros(8, 16, dtype=torch.int32), "qzeros": torch.zeros(2, 4, dtype=torch.int32),
            "scales": torch.ones(2, 16), "g_idx": torch.arange(64, dtype=torch.int32) // 32,
            "salient_idx": torch.tensor([3, 9], dtype=torch.int32), "salient_weight": torch.zeros(16, 2)}
    assert _checked("m.o_proj", 0, good, cfg).out_features == 16
    for key, bad, msg in [("qweight", torch.zeros(12, 16, dtype=torch.int32), "qweight has shape"),
                          ("salient_idx", torch.tensor([3, 3], dtype=torch.int32), "invalid salient_idx"),
                          ("g_idx", torch.full((64,), 5, dtype=torch.int32), "invalid g_idx")]:
        with pytest.raises(GiftError, match=f"m.o_proj.*{msg}|{msg}.*m.o_proj"):
            _checked("m.o_proj", 0, {**good, key: bad}, cfg)
    with pytest.raises(GiftError, match="no scales for m.o_proj"):
        _checked("m.o_proj", 0, {k: v for k, v in good.items() if k != "scales"}, cfg)
