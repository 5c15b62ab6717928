"""The wheel users install carries every kernel source (a non-editable install must build and run)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_wheel_contains_every_kernel_source(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = tmp_path.glob("gift_quant-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    kernels = ROOT / "gift_quant" / "kernels"
    sources = [p for p in kernels.rglob("*") if p.suffix in {".py", ".cu", ".cuh", ".cpp", ".h"}
               and "__pycache__" not in p.parts]
    assert any(p.suffix == ".cu" for p in sources) and any(p.parent.name == "triton" for p in sources)
    missing = [str(p.relative_to(ROOT)) for p in sources if str(p.relative_to(ROOT)) not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert any(n.startswith("gift_quant/recipes/") and n.endswith(".yaml") for n in names)
