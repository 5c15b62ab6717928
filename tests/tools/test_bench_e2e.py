import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_bench_e2e_part_b_tiny(tmp_path):
    """tools/bench_e2e.py part b at a tiny LLaMA shape on CPU: every variant measured, ratios to FP16."""
    out = tmp_path / "e2e"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_e2e.py"), "--part", "b", "--layers", "1", "--hidden", "128",
           "--intermediate", "256", "--heads", "4", "--vocab", "300", "--batch", "1,2", "--new-tokens", "4",
           "--prompt-len", "8", "--repeats", "1", "--no-compile", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads((out / "bench_e2e.json").read_text())
    rows = d["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [
        (m, b) for m in ("fp16", "gift-4bit", "gift-3bit", "gift-2bit") for b in (1, 2)]
    assert all(r["status"] == "ok" and r["decode_tok_s"] > 0 and r["prefill_ms"] > 0 for r in rows)
    assert all(r["tok_s_vs_fp16"] > 0 and r["mem_vs_fp16"] > 0 for r in rows)
    fp = rows[0]
    assert fp["tok_s_vs_fp16"] == 1.0 and fp["size_vs_fp16"] == 1.0 and fp["mixed_layers"] == 0
    for r in rows[2:]:
        assert r["mixed_layers"] == 7 and r["kernel_layers"] == 0 and r["size_vs_fp16"] < 1
    assert rows[2]["size_mib"] > rows[4]["size_mib"] > rows[6]["size_mib"]  # 4 > 3 > 2 bits
    assert "not used on cpu" in d["meta"]["kernel_status"] and d["meta"]["modes"] == ["eager"]
    md = (out / "bench_e2e.md").read_text()
    assert "tok/s vs FP16" in md and "never accuracy" in md
