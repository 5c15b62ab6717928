from gift_quant.nn.mixed_linear import MixedPrecisionLinear
from gift_quant.nn.gift_linear import GiftLinear

__all__ = ["MixedPrecisionLinear", "GiftLinear"]
