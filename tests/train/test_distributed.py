"""Multi-process training: 2 CPU ranks with the gloo backend (the path ``accelerate launch`` takes).

The processes are started by ``torch.distributed.run`` (what ``accelerate launch --multi_gpu`` runs
underneath); inside, :func:`gift_quant.train.train` builds the accelerate ``Accelerator`` and wraps the
model in DDP. Each test takes ~10-20 s on 2 CPU cores.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("accelerate")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
TEXT = ("The quick brown fox jumps over the lazy dog. Training text for a tiny model, "
        "with numbers 0123456789 and punctuation!? ") * 60
STEPS = 4

# one rank: a tiny random Llama, recipe "post" (GPTQ + FP16 columns, then train the columns), the
# per-rank results written by the script itself (not by the library) so the test can compare ranks
SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[2])
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP
    from gift_quant.nn import MixedPrecisionLinear
    from gift_quant.train import load_recipe, run_recipe
    from tests.conftest import char_tokenizer, tiny_llama

    torch.set_num_threads(1)
    tmp, steps = Path(sys.argv[1]), int(sys.argv[3])
    rank = int(os.environ["RANK"])
    sent = []  # bytes DDP re-broadcasts from rank 0 on every forward (buffers)
    orig = DDP._distributed_broadcast_coalesced
    def spy(self, tensors, *a, **k):
        sent.append(sum(t.numel() * t.element_size() for t in tensors))
        return orig(self, tensors, *a, **k)
    DDP._distributed_broadcast_coalesced = spy

    model = tiny_llama(seed=0)  # the same random weights on every rank
    txt = str(tmp / "train.txt")
    r = load_recipe("post", dict(bits=3, group_size=32, dataset=txt, calib_samples=8, seq_len=32,
                                 train_dataset=txt, train_seq_len=32, batch_size=2, steps=steps, save_every=2,
                                 n_salient=4, salient_ratio=None, max_train_tokens=None, noise="gaussian",
                                 lr=1e-2), device="cpu")
    # every rank is given an output folder of its own: only rank 0 may write one
    s = run_recipe(r, model, char_tokenizer(), out_dir=tmp / f"out{rank}", work_dir=tmp / "work",
                   progress=False, device="cpu")
    sal = {n: m.salient_weight.detach().float().contiguous() for n, m in s.model.named_modules()
           if isinstance(m, MixedPrecisionLinear)}
    save_file(sal, str(tmp / f"rank{rank}.safetensors"))
    dist = torch.distributed
    (tmp / f"rank{rank}.json").write_text(json.dumps({
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "losses": s.train_report.losses, "steps": s.summary["steps"], "rebroadcast_bytes": sum(sent)}))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, tmp_path, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    # a rank's own error comes first in the log, before the launcher's teardown noise
    errors = [ln for ln in (p.stdout + p.stderr).splitlines() if "error" in ln.lower()][:20]
    assert p.returncode == 0, "\n".join(errors) + "\n...\n" + p.stdout[-2000:] + p.stderr[-2000:]
    return p


@pytest.mark.integration
def test_two_rank_gloo_training_all_reduces_and_rank0_writes(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT)
    script = tmp_path / "ddp_post.py"
    script.write_text(SCRIPT)
    _torchrun([str(script), str(tmp_path), str(ROOT), str(STEPS)], tmp_path)

    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(i["world"] == 2 and i["backend"] == "gloo" and i["steps"] == STEPS for i in info)
    # the ranks trained on different batches (and noise seeds): their losses differ ...
    assert info[0]["losses"] != info[1]["losses"]
    # ... yet they end with bit-identical trainable weights: the gradients were all-reduced
    w0, w1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert w0.keys() == w1.keys() and len(w0) == 14  # 2 layers x 7 Linears
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # and the weights moved away from the compressed (pre-training) FP16 columns
    start = load_file(str(tmp_path / "work" / "compressed.safetensors"))
    moved = [float((w0[k] - start[f"{k}.salient_weight"].float()).abs().max()) for k in w0]
    assert min(moved) > 1e-3
    # the frozen buffers were not re-sent from rank 0 on every forward (broadcast_buffers=False)
    assert info[0]["rebroadcast_bytes"] == 0 and info[1]["rebroadcast_bytes"] == 0
    # rank 0 alone wrote the checkpoint and the training state
    assert not (tmp_path / "out1").exists()
    out = tmp_path / "out0"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    saved = load_file(str(out / "model.safetensors"))
    for k, v in w0.items():
        torch.testing.assert_close(saved[f"{k}.salient_weight"].float(), v.half().float(), rtol=0, atol=0)
    state = json.loads((tmp_path / "work" / "train" / "train_state.json").read_text())
    assert state["step"] == STEPS
    train_state = load_file(str(tmp_path / "work" / "train" / "train_state.safetensors"))
    for k, v in w0.items():
        assert torch.equal(train_state[f"param.{k}.salient_weight"].half().float(), v)  # v: fp16 as stored
    leftovers = [p.name for p in (tmp_path / "work").rglob("*") if ".tmp" in p.name]
    assert not leftovers


@pytest.mark.integration
def test_cli_post_recipe_under_two_ranks_writes_a_complete_checkpoint(tmp_path, tiny_model_dir):
    """The documented path: ``accelerate launch -m gift_quant.cli compress --recipe post ...``."""
    txt = tmp_path / "train.txt"
    txt.write_text(TEXT)
    out = tmp_path / "ck"
    _torchrun(["-m", "gift_quant.cli", "compress", "--model", str(tiny_model_dir), "--calib-samples", "8",
               "--seq-len", "32", "--dataset", str(txt), "--train-dataset", str(txt), "--train-seq-len", "32",
               "--bits", "3", "--group-size", "32", "--salient", "4", "--no-eval", "--quiet", "--device", "cpu",
               "--output", str(out), "--recipe", "post", "--steps", "3", "--batch-size", "2",
               "--save-every", "1"], tmp_path)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (tmp_path / "ck.partial").exists()
    assert json.loads((out / "gift_report.json").read_text())["steps"] == 3
