from .mixed_linear import MixedPrecisionLinear
from .gift_linear import GiftLinear

__all__ = ["MixedPrecisionLinear", "GiftLinear"]
