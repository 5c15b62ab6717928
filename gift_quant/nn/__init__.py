from .mixed_linear import MixedPrecisionLinear

__all__ = ["MixedPrecisionLinear"]
