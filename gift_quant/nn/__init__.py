from .mixed_linear import MixedPrecisionLinear
from .gift_linear import GiftLinear
from .dispatch import mixed_linear_forward, prepare_model

__all__ = ["MixedPrecisionLinear", "GiftLinear", "mixed_linear_forward", "prepare_model"]
