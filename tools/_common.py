"""Small helpers shared by the scripts in tools/, by the tests and by device_check.sh's inline Python.

Benchmark and test scaffolding only, so it lives here and not in the ``gift_quant`` wheel. A script run
as ``python3 tools/X.py`` imports it as ``_common`` (Python puts tools/ first on ``sys.path``); code run
from the checkout's root (pytest, a heredoc) imports ``tools._common``. It imports nothing from
``gift_quant`` or transformers at module level, so importing it costs only torch.
"""
from __future__ import annotations

import copy
import gc
import importlib.util
import sys
import time

import torch

if importlib.util.find_spec("gift_quant") is None:  # the scripts use the installed package, never the tree
    print("error: gift_quant is not installed; in a checkout run `pip install -e .` first", file=sys.stderr)
    raise SystemExit(2)

# the Linears of a LLaMA-style decoder layer, under self_attn and mlp
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logger(prog: str):
    """``log(msg)`` printing ``[prog HH:MM:SS] msg``, flushed (progress of long runs reaches a pipe)."""
    def log(msg: str):
        print(f"[{prog} {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    return log


def ints(s) -> list[int]:
    """"1,8,16" -> [1, 8, 16]; ValueError on anything else, so it serves as an argparse ``type=``."""
    return [int(v) for v in str(s).split(",") if v.strip()]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    """Collect garbage; on CUDA also empty the cache and reset the peak so the next measurement is its own."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def shape_args(ap, layers: int = 32):
    """The model-shape flags of the random-weight benchmarks; defaults: LLaMA-2-7B's width."""
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)


def llama_config(a, **kw):
    """The LlamaConfig of :func:`shape_args`' flags (``a.kv_heads``, where present and set, for GQA)."""
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=getattr(a, "kv_heads", None) or a.heads,
                       vocab_size=a.vocab, tie_word_embeddings=False, **kw)


@torch.no_grad()
def random_gift_linears(model, bits: int, *, group_size: int, salient: int, act_order: bool, device=None,
                        dtype=torch.float16) -> dict[str, int]:
    """Replace a LLaMA-style model's decoder Linears by random ``MixedPrecisionLinear`` layers in the real
    packed format, k = min(``salient``, in/32) FP16 columns each; returns name -> k (the checkpoint's
    ``salient_counts``). One random template per (in, out) shape, deep-copied into every layer: distinct
    memory, so the footprint is the real one, at the cost of one random draw per shape."""
    from gift_quant.nn.mixed_linear import MixedPrecisionLinear
    templates, counts = {}, {}
    for li, layer in enumerate(model.model.layers):
        for parent, pname in ((layer.self_attn, "self_attn"), (layer.mlp, "mlp")):
            for name in DECODER_LINEARS:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                k = max(0, min(salient, lin.in_features // 32))
                key = (lin.in_features, lin.out_features)
                if key not in templates:
                    t = MixedPrecisionLinear.random(lin.in_features, lin.out_features, bits, group_size=group_size,
                                                    n_salient=k, act_order=act_order, dtype=dtype, seed=len(templates))
                    templates[key] = t if device is None else t.to(device)
                setattr(parent, name, copy.deepcopy(templates[key]))
                counts[f"model.layers.{li}.{pname}.{name}"] = k
    return counts


def char_tokenizer():
    """A real PreTrainedTokenizerFast (character level: <unk>, </s>, printable ASCII, newline and tab, all
    ids below 100, so it fits the tiny models' vocab), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def tiny_llama(seed: int = 0, hidden: int = 64, inter: int = 96, layers: int = 2, vocab: int = 128):
    """A tiny random LlamaForCausalLM (4 heads, 2 KV heads), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


MOE_EXPERTS, MOE_TOPK = 4, 2
MOE_ARCHS = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3")


def tiny_moe(arch: str, seed: int = 0, experts: int = MOE_EXPERTS, topk: int = MOE_TOPK):
    """A tiny random mixture-of-experts model of ``arch`` (one of ``MOE_ARCHS``), built from its config."""
    import transformers as tf
    torch.manual_seed(seed)
    common = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128,
              "num_experts_per_tok": topk, "max_position_embeddings": 1024, "tie_word_embeddings": False}
    if arch == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=96, num_key_value_heads=2, num_local_experts=experts, **common)
        return tf.MixtralForCausalLM(cfg).eval()
    if arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=96, num_key_value_heads=2, head_dim=16,
                                num_experts=experts, **common)
        return tf.Qwen3MoeForCausalLM(cfg).eval()
    if arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=96, shared_expert_intermediate_size=64,
                                num_key_value_heads=2, num_experts=experts, **common)
        return tf.Qwen2MoeForCausalLM(cfg).eval()
    if arch == "deepseek_v3":
        cfg = tf.DeepseekV3Config(intermediate_size=96, moe_intermediate_size=96, num_key_value_heads=4,
                                  n_routed_experts=experts, n_group=1, topk_group=1, first_k_dense_replace=1,
                                  q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=16, **common)
        return tf.DeepseekV3ForCausalLM(cfg).eval()
    raise ValueError(arch)
