"""tools/bench_peers.py: the one bits-per-weight formula, Pareto frontiers and the rendered table."""
import itertools
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import bench_peers


def _k_of(n):
    return n // 32


def test_bits_per_weight_hqq_gptq_gift():
    shapes = [(576, 576), (1536, 576), (576, 1536)]
    # HQQ: b-bit codes + fp16 scale + fp16 zero per group
    assert bench_peers.bits_per_weight(shapes, 4, 64, zero_bits=16) == pytest.approx(4.5)
    w = sum(o * i for o, i in shapes)
    groups = sum(o * -(-i // 128) for o, i in shapes)  # 576 columns make 5 groups of 128, the last partial
    assert bench_peers.bits_per_weight(shapes, 2, 128, zero_bits=16) == pytest.approx(2 + 32 * groups / w)
    # GPTQ asym with act-order: integer zeros of b bits + a 32-bit g_idx per input column
    gidx = sum(32 * i for _, i in shapes) / w
    assert bench_peers.bits_per_weight(shapes, 3, 128, zero_bits=3, g_idx=True) == pytest.approx(3 + 19 * groups / w + gidx)
    # gift: k FP16 columns leave the codes and cost 16 x out bits + a 32-bit index each
    expect = sum(o * i * 2 + o * -(-i // 128) * 18 + 32 * i + 16 * o * _k_of(i) + 32 * _k_of(i) for o, i in shapes) / w
    assert bench_peers.bits_per_weight(shapes, 2, 128, zero_bits=2, g_idx=True, k_of=_k_of) == pytest.approx(expect)


def test_pareto_keeps_only_improvements():
    rng = random.Random(0)
    pts = [(rng.uniform(2, 5), rng.uniform(1, 10)) for _ in range(40)]
    front = bench_peers.pareto(pts)
    assert all(x1 < x2 and y1 > y2 for (x1, y1), (x2, y2) in itertools.pairwise(front))
    for x, y in pts:  # every point is dominated by (or on) the frontier
        assert any(fx <= x and fy <= y for fx, fy in front)


def test_render_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_peers, "OUT", tmp_path)
    fp = {"method": "fp", "bits": 16, "group": 128, "bpw": 16.0, "ppl": {"idle": 10.0, "austen": 20.0}}
    rows = [fp, {"method": "hqq", "bits": 4, "group": 64, "bpw": 4.5, "ppl": {"idle": 12.0, "austen": 30.0}},
            {"method": "autoround", "bits": 2, "group": 128, "bpw": 2.14, "iters": 50,
             "ppl": {"idle": 40.0, "austen": 80.0}}]
    md = bench_peers.render(rows)
    lines = md.splitlines()
    assert lines[0].startswith("| method | bits | group | bits/weight | idle ppl (/ FP) | austen ppl (/ FP)")
    hqq = next(x for x in lines if x.startswith("| HQQ"))
    assert "12.00 (1.20x)" in hqq and "30.00 (1.50x)" in hqq and f"{(1.2 * 1.5) ** 0.5:.3f}" in hqq
    assert lines.index(next(x for x in lines if x.startswith("| AutoRound (50 it)"))) < lines.index(hqq)
    if "matplotlib" in sys.modules or __import__("importlib").util.find_spec("matplotlib"):
        assert (tmp_path / "peers.png").stat().st_size > 1000


def test_gift_rows_from_bench_recipes_json(tmp_path):
    f = tmp_path / "b.json"
    f.write_text(json.dumps([{"method": "fp", "bits": 16, "ppl": {"idle": 1.0}},
                             {"method": "none", "bits": 2, "bpw": 2.7, "ppl": {"idle": 3.0}, "seconds": 5},
                             {"method": "post", "bits": 2, "error": "boom"}]))
    rows = bench_peers.gift_rows([f])
    assert [(r["method"], r["bpw"]) for r in rows] == [("gift none (GPTQ + FP16 cols)", 2.7)]


def test_cli_rejects_unknown_peer(capsys):
    assert bench_peers.main(["--peers", "awq"]) == 2
    assert "unknown peer" in capsys.readouterr().err
