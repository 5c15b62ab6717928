"""Per-layer results of an interrupted compression, so ``--resume`` continues where it stopped."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from gift_quant.compress.report import CompressReport, ModuleReport, account
from gift_quant.config import GiftConfig
from gift_quant.errors import GiftError
from gift_quant.io.atomic import save_tensors, write_json
from gift_quant.nn import MixedPrecisionLinear


class LayerState:
    """Per-layer results of an interrupted compression: one safetensors file per finished layer,
    written atomically, plus a fingerprint so a resume never mixes runs."""

    def __init__(self, root, config: GiftConfig, samples: torch.Tensor, model):
        self.root = Path(root)
        cfg = {k: v for k, v in config.to_dict().items() if k != "salient_counts"}
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
        h.update(samples.cpu().numpy().tobytes())
        h.update(str(getattr(model.config, "to_json_string", lambda: "")()).encode())
        self.fingerprint = h.hexdigest()

    def open(self, resume: bool):
        meta = self.root / "meta.json"
        if resume and meta.is_file():
            got = json.loads(meta.read_text()).get("fingerprint")
            if got != self.fingerprint:
                raise GiftError(f"cannot resume from {self.root}: it belongs to a different model, "
                                "calibration data or config")
            return
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        write_json(meta, {"fingerprint": self.fingerprint})

    def _path(self, li: int) -> Path:
        return self.root / f"layer_{li:05d}.safetensors"

    def has(self, li: int) -> bool:
        return self._path(li).is_file()

    def save(self, li: int, packed: dict, rows: list):
        t, meta = {}, {}
        for (n, mpl), row in zip(packed.items(), rows):
            for key, v in mpl.state_dict().items():
                t[f"{n}.{key}"] = v
            t[f"{n}.__scores"] = row.scores.float()
            meta[n] = {"name": row.name, "shape": list(row.shape), "k": row.k, "rel_error": row.rel_error,
                       "bits": mpl.bits, "group_size": mpl.group_size, "bias": mpl.bias is not None}
        save_tensors(self._path(li), t, metadata={"modules": json.dumps(meta)})

    def load(self, li, report: CompressReport, counts: dict, storage_dtype) -> dict:
        from safetensors import safe_open
        with safe_open(str(self._path(li)), framework="pt") as f:
            meta = json.loads(f.metadata()["modules"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        packed = {}
        for n, m in meta.items():
            out_f, in_f = m["shape"]
            mpl = MixedPrecisionLinear(in_f, out_f, m["bits"], m["group_size"], m["k"], m["bias"], storage_dtype)
            mpl.load_state_dict({k[len(n) + 1:]: v for k, v in t.items()
                                 if k.startswith(n + ".") and not k.endswith("__scores")})
            packed[n] = mpl
            counts[m["name"]] = m["k"]
            report.modules.append(ModuleReport(m["name"], (out_f, in_f), m["k"], mpl.salient_idx.long(),
                                               t[f"{n}.__scores"], m["rel_error"]))
            account(report, mpl)
        return packed
