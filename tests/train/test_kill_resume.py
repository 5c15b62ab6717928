"""SIGKILL at every file replace of a short training run, then --resume: the same bytes as a run never
killed, or a one-line refusal; never a silently different model."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import interrupted_at
from tests.train.test_train import TEXT

# One process imports once, then forks each run (the reference, every killed run, every resume). The kill
# is the test's own: os.replace is wrapped in the forked child only, the production code has no hook.
_DRIVER = r'''
import hashlib, json, os, signal, sys
import torch
torch.set_num_threads(1)
from gift_quant.cli.main import main

args, root, when = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
real_replace = os.replace


def run(out, extra=(), kill_at=None, count_file=None):
    pid = os.fork()
    if pid == 0:
        n = [0]

        def replace(a, b, *k, **kw):
            n[0] += 1
            if n[0] == kill_at and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(a, b, *k, **kw)
            if n[0] == kill_at and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
        code = main([*args, "--output", out, *extra])
        if count_file:
            with open(count_file, "w") as f:
                f.write(str(n[0]))
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def sha(out):
    f = os.path.join(out, "model.safetensors")
    return hashlib.sha256(open(f, "rb").read()).hexdigest() if os.path.isfile(f) else None


ref = os.path.join(root, "ref")
assert run(ref, count_file=os.path.join(root, "n")) == 0
n = int(open(os.path.join(root, "n")).read())
rows = []
for k in range(1, n + 1):
    out = os.path.join(root, f"k{k}")
    killed = run(out, kill_at=k)
    resumed = run(out, ["--resume"]) if killed == -9 else None
    rows.append({"kill_at": k, "killed": killed, "resumed": resumed, "same": sha(out) == sha(ref)})
print(json.dumps({"replaces": n, "rows": rows}))
'''


def _run_driver(model_dir, tmp_path, when, steps=12, save_every=3):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    args = ["compress", "--model", str(model_dir), "--recipe", "post", "--bits", "2", "--group-size", "32",
            "--calib-samples", "4", "--seq-len", "64", "--train-seq-len", "32", "--batch-size", "1",
            "--steps", str(steps), "--save-every", str(save_every), "--lr", "1e-3", "--no-eval", "--quiet",
            "--dataset", str(text), "--train-dataset", str(text)]
    r = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(args), str(tmp_path), when],
                       capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check(res):
    # several training checkpoints, the compressed stage, the GPTQ layers and the output each replace files
    assert res["replaces"] >= 8, res
    for row in res["rows"]:
        assert row["killed"] in (-9, 0), row  # a kill point after the last replace may let the run finish
        if row["killed"] == -9:
            assert row["resumed"] == 0, row
        assert row["same"], row
    assert sum(row["killed"] == -9 for row in res["rows"]) >= res["replaces"] - 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_before_every_replace_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    _check(_run_driver(tiny_model_dir, tmp_path, "before"))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_after_every_replace_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    _check(_run_driver(tiny_model_dir, tmp_path, "after", steps=9, save_every=2))


def test_a_checkpoint_whose_tensors_do_not_match_is_refused(tmp_path):
    """The JSON names the digest of its tensors: a stray tensors file from another step is refused."""
    import torch

    from gift_quant import GiftError
    from gift_quant.train.settings import TrainReport, TrainSettings
    from gift_quant.train.state import STATE_DIR, STATE_TENSORS, load_state, save_state
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(4)
    opt.step()
    names = [("w", p)]
    save_state(tmp_path, 3, names, opt, None, TrainReport(), "fp", TrainSettings())
    q = torch.nn.Parameter(torch.zeros(4))
    start, _ = load_state(tmp_path, "fp", [("w", q)], torch.optim.AdamW([q]), TrainReport())
    assert start == 3 and torch.equal(q.detach(), p.detach())
    f = tmp_path / STATE_DIR / STATE_TENSORS
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(GiftError, match="step 3 does not match its tensors file"):
        load_state(tmp_path, "fp", [("w", q)], torch.optim.AdamW([q]), TrainReport())
    assert hashlib.sha256(bytes(data)).hexdigest()  # the file stays for the user to inspect


def test_an_older_versions_loose_checkpoint_is_refused_not_ignored(tmp_path):
    """A partial folder from before the train/ unit holds train_state.json at its root: resuming must not
    silently start over at step 0."""
    import torch

    from gift_quant import GiftError
    from gift_quant.train.settings import TrainReport
    from gift_quant.train.state import STATE_JSON, load_state
    (tmp_path / STATE_JSON).write_text('{"step": 6, "fingerprint": "fp"}')
    q = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(GiftError, match="older gift-quant"):
        load_state(tmp_path, "fp", [("w", q)], torch.optim.AdamW([q]), TrainReport())


def test_patience_counts_on_across_a_resume(tmp_path, tiny_model_dir, monkeypatch):
    """Evaluations without improvement before the interruption still count after it: early stopping
    falls on the same step as in the uninterrupted run."""
    from transformers import AutoModelForCausalLM

    from gift_quant.train import run_recipe
    from tests.conftest import char_tokenizer
    from tests.train.test_recipes import _recipe
    r = _recipe(tmp_path, "post", noise="none", lr=0.3, steps=12, save_every=1, eval_every=1, val_windows=2,
                patience=2)
    tok = char_tokenizer()

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    full = run_recipe(r, fresh(), tok, work_dir=tmp_path / "w1", progress=False, device="cpu").train_report
    assert full.stopped_early, full.val_losses  # the setting this test needs
    bad_since = [s for s, _ in full.val_losses if s > full.best_step]
    stop_at = bad_since[0]  # interrupt after the first evaluation without improvement
    with interrupted_at(monkeypatch, stop_at), pytest.raises(KeyboardInterrupt):
        run_recipe(r, fresh(), tok, work_dir=tmp_path / "w2", progress=False, device="cpu")
    resumed = run_recipe(r, fresh(), tok, work_dir=tmp_path / "w2", resume=True, progress=False,
                         device="cpu").train_report
    assert resumed.resumed_from == stop_at
    assert (resumed.steps_done, resumed.best_step, resumed.stopped_early) == \
        (full.steps_done, full.best_step, full.stopped_early)
