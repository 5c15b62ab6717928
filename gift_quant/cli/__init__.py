"""The ``gift-quant`` command line."""
from gift_quant.cli.main import main

__all__ = ["main"]
