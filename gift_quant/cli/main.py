"""``gift-quant``: compress, eval, verify, bench, gptq. Every user error is one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import errno
import sys

from gift_quant.cli import commands, compress, gptq
from gift_quant.errors import GiftError
from gift_quant.version import VERSION

# what the machine, not the program, got wrong: reported in one line like bad input
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise GiftError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gift-quant", description="GIFT-SW mixed-precision compression for transformers")
    parser.add_argument("--version", action="version", version=f"gift-quant {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    compress.add_parser(sub)
    commands.add_eval(sub)
    commands.add_verify(sub)
    commands.add_bench(sub)
    gptq.add_parser(sub)
    return parser


COMMANDS = {"compress": compress.run, "eval": commands.cmd_eval, "verify": commands.cmd_verify,
            "bench": commands.cmd_bench, "gptq": gptq.run}


def environment_error(e: BaseException) -> str | None:
    """One line for a write the machine refused (full disk, read-only folder), else None (a bug: traceback)."""
    if isinstance(e, OSError) and e.errno in _ENV_ERRNOS:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}"
    text = str(e)
    if type(e).__name__ == "SafetensorError" or "No space left" in text:  # safetensors / tokenizers (Rust)
        if "No space left" in text:
            return "No space left on device (while writing tensors)"
        return f"safetensors: {text.splitlines()[0] if text else type(e).__name__}"
    return None


def main(argv=None) -> int:
    a = None
    try:
        parser = build_parser()
        a = parser.parse_args(argv)
        if a.command is None:  # bare `gift-quant`: what it can do
            parser.print_help(sys.stderr)
            return 2
        if getattr(a, "quiet", False):
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        return COMMANDS[a.command](a)
    except GiftError as e:
        print(f"gift-quant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gift-quant: interrupted; {_kept(a)}", file=sys.stderr)
        return 130
    except Exception as e:
        msg = environment_error(e)
        if msg is None:
            raise
        print(f"gift-quant: error: {msg}; {_kept(a)}", file=sys.stderr)
        return 2


def _kept(a) -> str:
    """What an interrupted or failed run left: compress keeps OUTPUT.partial/ for --resume."""
    if a is not None and getattr(a, "command", None) == "compress":
        from gift_quant.io.export import partial_dir
        p = partial_dir(a.output)
        if p.exists():
            return f"{p} was kept: run the same command with --resume to continue"
    return "no partial output was left"


if __name__ == "__main__":
    sys.exit(main())
