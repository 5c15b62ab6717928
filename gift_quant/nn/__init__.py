from .mixed_linear import MixedPrecisionLinear
from .gift_linear import GiftLinear
from . import self_check as _self_check  # noqa: F401  (registers the backends' self-check)
from .dispatch import mixed_linear_forward, prepare_model

__all__ = ["MixedPrecisionLinear", "GiftLinear", "mixed_linear_forward", "prepare_model"]
