"""Measuring a model: held-out perplexity and the deployment benchmark."""
