"""lm-eval (0.4.x) with gift checkpoints: ``python -m gift_quant.integrations.lmeval <lm_eval arguments>``.

It only imports ``gift_quant`` (which registers the ``gift_sw`` quantization method with transformers)
and then runs lm-eval's own command line, so the harness ``hf`` model loads gift checkpoints:

    python -m gift_quant.integrations.lmeval --model hf --model_args pretrained=DIR,dtype=float32 \\
        --tasks hellaswag --device cpu --batch_size 1

Without the import, transformers would only warn about the unknown quant_method and evaluate a model
with random Linears.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    import gift_quant.integrations.transformers  # noqa: F401  (registers gift_sw with transformers)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("gift-quant: lm-eval is not installed: pip install 'lm-eval>=0.4,<0.5'", file=sys.stderr)
        return 2
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
