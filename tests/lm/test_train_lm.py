"""`jaxlab train lm` end to end: a run interrupted after a checkpoint and restarted ends with
parameters bit-identical to the uninterrupted run (state, PRNG key and data position restored)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlab.models.lm_training import LMTrainConfig

STEPS = 12
ARGS = ["--steps", str(STEPS), "--warmup-steps", "2", "--batch-size", "2", "--seq-len", "32", "--d-model", "16",
        "--num-layers", "1", "--num-heads", "2", "--eval-every", "6", "--eval-batches", "2", "--sample-tokens", "8",
        "--log-every", "1", "--checkpoint-every", "4", "--no-progress"]


def _train(data, out, sample_every, *extra, returncode=0):
    # Tiny programs: XLA's backend optimisations cost more compile time than they save.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.run([sys.executable, "-m", "jaxlab", "train", "lm", "--data", str(data), "--out", str(out),
                           *ARGS, "--sample-every", str(sample_every), *extra], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc


def _state(out, step):
    return ocp.StandardCheckpointer().restore((out / "checkpoints" / str(step) / "state").absolute())


def _flat(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_interrupted_run_resumes_bit_identical(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        words = rng.choice(["def", "return", "x", "=", "(", ")", ":", "\n", "    ", "if", "1"], size=60)
        (data / f"f{i}.py").write_text(" ".join(words))
    out = tmp_path / "run"
    first = _train(data, out, sample_every=STEPS)
    assert "packing:" in first.stderr + first.stdout and "sample at step 12" in first.stderr + first.stdout
    reference = _flat(_state(out, STEPS))
    # interrupt: the process died after step 4's checkpoint (later checkpoints never written)
    for step in (8, 12):
        shutil.rmtree(out / "checkpoints" / str(step))
    _train(data, out, sample_every=0)  # sampling only reads the state; skip its compile here
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["step"] == STEPS and not summary["preempted"]
    resumed = _flat(_state(out, STEPS))
    assert reference.keys() == resumed.keys() and any("params" in k for k in reference)
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/bpb" in r]
    assert evals and all(r["eval/bpb"] == pytest.approx(r["eval/loss"] / np.log(2)) for r in evals)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # rows after step 4 were rewritten, not doubled
    assert train[-1]["loss"] < train[0]["loss"]
    assert summary["packing_efficiency"] > 0.99
    assert len((out / "samples.jsonl").read_text().splitlines()) == 1


def test_diverging_run_stops_with_a_clear_error_and_keeps_the_good_checkpoint(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "run"
    proc = _train(data, out, 0, "--lr", "1e4", returncode=1)
    assert "jaxlab: error: non-finite loss or gradient at step" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    bad = int(proc.stderr.split("at step ")[1].split()[0])
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert all(s < bad for s in kept)  # nothing saved at or after the first non-finite step
    for step in kept:
        assert all(np.isfinite(v).all() for v in _flat(_state(out, step)).values())


def test_short_runs_work_with_default_warmup():
    cfg = LMTrainConfig(steps=30)
    assert cfg.optimizer_config().warmup_steps == 3
    assert LMTrainConfig().optimizer_config().warmup_steps == 100


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="mixer='rnn'"):
        LMTrainConfig(mixer="rnn")
    with pytest.raises(ValueError, match="warmup_steps=100 must be in"):
        LMTrainConfig(steps=50, warmup_steps=100)
    with pytest.raises(ValueError, match="d_model=30 must be divisible by num_heads=4"):
        LMTrainConfig(d_model=30)
    with pytest.raises(ValueError, match="dtype='float16'"):
        LMTrainConfig(dtype="float16")


def test_eval_batches_spread_over_the_whole_validation_split():
    """The fixed validation set samples every part of the split, not only its first documents."""
    from jaxlab.models.lm_training import eval_batches

    docs = [np.full(40, i + 1, np.int32) for i in range(10)]  # document i is the token i + 1, 400 tokens
    batches = eval_batches(docs, batch_size=2, seq_len=8, max_batches=2)  # 4 of the 50 rows
    seen = set(np.unique(np.concatenate([b["inputs"].ravel() for b in batches])))
    assert {1, 10} <= seen and len(seen) >= 4, seen  # first and last documents, and some in between
    assert all(b["inputs"].shape == (2, 8) for b in batches)
    small = eval_batches(docs[:1], batch_size=4, seq_len=8, max_batches=3)  # 5 rows: all kept, one padded batch
    assert len(small) == 2 and int(small[1]["mask"].sum()) > 0 and int(small[1]["mask"][1:].sum()) == 0
