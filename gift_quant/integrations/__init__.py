"""Bridges to other libraries (transformers, vLLM, ...); each submodule imports its library lazily."""
