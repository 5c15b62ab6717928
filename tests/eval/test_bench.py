import json

from gift_quant.cli.main import main


def test_bench_cpu_tiny(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["compress", "--model", str(tiny_model_dir), "--output", str(out), "--bits", "4", "--group-size",
                 "32", "--calib-samples", "4", "--seq-len", "32", "--no-eval", "--quiet"]) == 0
    j = tmp_path / "b.json"
    code = main(["bench", str(out), "--baseline", str(tiny_model_dir), "--batch", "1,2", "--prompt-len", "8",
                 "--new-tokens", "4", "--eval-windows", "1", "--json", str(j), "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0 and "CPU" in stdout and "decode tok/s" in stdout and "pytorch (cpu)" in stdout
    rows = json.loads(j.read_text())
    assert main(["bench", str(out), "--baseline", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
    assert [(r["model"], r["batch"]) for r in rows] == [("gift", 1), ("gift", 2), ("baseline", 1), ("baseline", 2)]
    assert all(r["status"] == "ok" and r["decode_tok_s"] > 0 and r["prefill_ms"] > 0 for r in rows)
    assert rows[0]["size_mib"] < rows[2]["size_mib"]


def test_bench_bad_input(tiny_model_dir, tmp_path, capsys):
    assert main(["bench", str(tiny_model_dir)]) == 2  # a float model is not a checkpoint
    assert main(["bench", str(tmp_path), "--batch", "x"]) == 2
    err = capsys.readouterr().err
    assert "not a gift-quant checkpoint" in err and "--batch" in err
