"""The one compression pipeline and its entry point :func:`quantize_`."""
from gift_quant.compress.api import quantize_
from gift_quant.compress.pipeline import compress_model

__all__ = ["compress_model", "quantize_"]
