"""Smoke tests of the benchmark tools on tiny shapes (each in a subprocess, like they are run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_bench_offload_memory_tiny_cpu(tmp_path):
    out = tmp_path / "mem.json"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_offload_memory.py"), "--device", "cpu",
                        "--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4",
                        "--vocab", "1000", "--samples", "4", "--seq-len", "32", "--salient", "8",
                        "--group-size", "64", "--bits", "3", "--quiet", "--json", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["shape"] == {"layers": 2, "hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 4, "vocab": 1000}
    # the model was built in fp16: 2 bytes per parameter
    assert abs(r["model_fp16_gib"] * 2 ** 30 - 2 * r["params"]) < 0.001 * 2 ** 30
    assert r["params"] == 2 * 256 * 1000 + 2 * (4 * 256 * 256 + 3 * 256 * 512 + 2 * 256) + 256
    assert r["device"] == "cpu" and r["activations"] == "cpu" and r["bits"] == 3
    assert r["gpu_peak_allocated_gib"] is None and r["gpu_peak_reserved_gib"] is None
    assert r["cpu_peak_rss_compress_gib"] > 0 and r["cpu_peak_rss_process_gib"] >= r["cpu_peak_rss_compress_gib"]
    assert r["compress_seconds"] > 0 and 3 < r["bits_per_weight"] < 16
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("| shape") and lines[-1].startswith("| 2 x 256 / 512, 1000 |")


@pytest.mark.integration
def test_bench_recipes_tiny_model_two_domains(tmp_path, tiny_model_dir):
    out, js = tmp_path / "B.md", tmp_path / "b.json"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_recipes.py"), "--model", str(tiny_model_dir),
                        "--bits", "3", "--seeds", "0", "--methods", "fp,none,post,pre-nonoise", "--steps", "2",
                        "--batch-size", "2", "--train-seq-len", "32", "--calib-samples", "4", "--eval-windows", "1",
                        "--max-train-tokens", "5000", "--device", "cpu", "--out", str(out), "--json", str(js),
                        "--domains", "idle,licenses"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(js.read_text())
    assert [r["method"] for r in rows] == ["fp", "none", "post", "pre-nonoise"]
    assert all(set(r["ppl"]) == {"idle", "licenses"} and all(v > 1 for v in r["ppl"].values()) for r in rows)
    assert rows[2]["steps"] == 2 and rows[2]["trainable"] > 0
    text = out.read_text()
    assert "ppl licenses" in text and "| 3 | pre-nonoise |" in text and "2 steps x 2 x 32 tokens" in text
    assert "geomean / FP" in text
