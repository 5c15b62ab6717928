"""GPTQ checkpoints in and out: :func:`import_gptq`, :func:`export_gptq`, :func:`attach_salient`."""
from gift_quant.integrations.gptq.convert import attach_salient, export_gptq, import_gptq

__all__ = ["attach_salient", "export_gptq", "import_gptq"]
