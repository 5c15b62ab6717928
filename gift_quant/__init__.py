"""gift-quant: GIFT-SW mixed-precision compression (salient FP16 columns + GPTQ base).

Importing the package registers the ``gift_sw`` quantization method with transformers.
"""
from .config import GiftConfig
from .errors import GiftError
from .nn import MixedPrecisionLinear
from . import hf as _hf  # noqa: F401  (registration side effect)
from .hf import load_checkpoint, prepare_for_training
from .quantizer import GiftQuantizer, load_quantized_model

__version__ = "0.1.0"

__all__ = ["GiftConfig", "GiftError", "GiftQuantizer", "MixedPrecisionLinear", "load_checkpoint",
           "load_quantized_model", "prepare_for_training", "__version__"]
