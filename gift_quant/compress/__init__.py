"""Compression: calibration statistics, salient selection and GPTQ over a model's modules."""
