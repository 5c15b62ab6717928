"""vLLM integration: the ``gift_sw`` quantization method as an out-of-tree vLLM plugin.

vLLM calls :func:`register` in every process (main, engine core, workers) through the
``vllm.general_plugins`` entry point declared in pyproject.toml, so ``vllm serve DIR`` and
``vllm.LLM(DIR)`` read gift checkpoints once gift-quant is installed next to vLLM. Nothing here
imports vLLM until :func:`register` runs; :mod:`.sharding` never imports it.
"""
from __future__ import annotations


def register() -> None:
    """Make ``quant_method: gift_sw`` known to vLLM. Safe to call any number of times."""
    from vllm.model_executor.layers import quantization as q

    from ._deps import QUANT_METHOD
    from .method import GiftVllmConfig

    if getattr(q, "_CUSTOMIZED_METHOD_TO_QUANT_CONFIG", {}).get(QUANT_METHOD) is GiftVllmConfig:
        return
    q.register_quantization_config(QUANT_METHOD)(GiftVllmConfig)
