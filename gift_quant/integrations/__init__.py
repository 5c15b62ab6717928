"""Other libraries' entry points: transformers, Optimum-style, PEFT, GPTQ checkpoints, lm-eval, vLLM.

Each submodule imports its library lazily."""
