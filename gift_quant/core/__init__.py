"""Pure tensor math: the uniform quantizer, GPTQ, packing, the saliency metric, quantization noise."""
