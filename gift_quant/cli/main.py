"""``gift-quant``: compress, eval, verify, bench, gptq. Every user error is one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import sys

from gift_quant.cli import commands, compress, gptq
from gift_quant.errors import GiftError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise GiftError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gift-quant", description="GIFT-SW mixed-precision compression for transformers")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    compress.add_parser(sub)
    commands.add_eval(sub)
    commands.add_verify(sub)
    commands.add_bench(sub)
    gptq.add_parser(sub)
    return parser


COMMANDS = {"compress": compress.run, "eval": commands.cmd_eval, "verify": commands.cmd_verify,
            "bench": commands.cmd_bench, "gptq": gptq.run}


def main(argv=None) -> int:
    try:
        a = build_parser().parse_args(argv)
        if getattr(a, "quiet", False):
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        return COMMANDS[a.command](a)
    except GiftError as e:
        print(f"gift-quant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gift-quant: interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
