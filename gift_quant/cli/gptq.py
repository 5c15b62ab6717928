"""``gift-quant gptq import|export``: GPTQ checkpoints in and out (:mod:`gift_quant.integrations.gptq`)."""
from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("gptq", help="convert between GPTQ checkpoints and gift checkpoints")
    p.add_argument("direction", choices=["import", "export"],
                   help="import: GPTQ folder -> gift folder (k=0); export: gift folder -> GPTQ v2 folder + sidecar")
    p.add_argument("src", help="the folder to convert")
    p.add_argument("dst", help="the new folder (must not exist unless --overwrite; never the source or inside it)")
    p.add_argument("--zero-format", default="auto", choices=["auto", "v1", "v2"],
                   help="import: zero-point convention (default: detected from the data)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dst folder atomically")


def run(a) -> int:
    from gift_quant.integrations.gptq import export_gptq, import_gptq
    from gift_quant.io.export import check_not_overlapping
    check_not_overlapping(a.src, a.dst, "source")
    if a.direction == "import":
        s = import_gptq(a.src, a.dst, zero_format=a.zero_format, overwrite=a.overwrite)
    else:
        s = export_gptq(a.src, a.dst, overwrite=a.overwrite)
    print(json.dumps(s, default=str))
    return 0
