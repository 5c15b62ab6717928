"""gift-quant: GIFT-SW mixed-precision compression (salient FP16 columns + GPTQ base).

Importing the package registers the ``gift_sw`` quantization method with transformers.
"""
from gift_quant.version import VERSION as __version__
from gift_quant.config import GiftConfig  # noqa: E402
from gift_quant.errors import GiftError  # noqa: E402
from gift_quant.nn import MixedPrecisionLinear  # noqa: E402
from gift_quant.integrations import transformers as _hf  # noqa: E402,F401  (registration side effect)
from gift_quant.integrations.transformers import prepare_for_training  # noqa: E402
from gift_quant.io.checkpoint import load_checkpoint  # noqa: E402
from gift_quant.integrations.optimum import GiftQuantizer, load_quantized_model  # noqa: E402
from gift_quant.compress.api import quantize_  # noqa: E402

__all__ = ["GiftConfig", "GiftError", "GiftQuantizer", "MixedPrecisionLinear", "load_checkpoint",
           "load_quantized_model", "prepare_for_training", "quantize_", "__version__"]
