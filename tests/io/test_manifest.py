"""The checkpoint manifest: ``gift-quant verify`` accepts a fresh checkpoint and names the file that changed."""
from gift_quant.cli.main import main


def _args(model_dir, out):
    return ["compress", "--model", str(model_dir), "--output", str(out), "--bits", "3", "--group-size", "32",
            "--calib-samples", "8", "--seq-len", "32", "--no-eval", "--quiet"]


def test_manifest_verify(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(_args(tiny_model_dir, out)) == 0
    assert main(["verify", str(out)]) == 0
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    (out / "model.safetensors").write_bytes(bytes(data[:100]))
    assert main(["verify", str(out)]) == 2
    assert main(["verify", str(tmp_path)]) == 2
