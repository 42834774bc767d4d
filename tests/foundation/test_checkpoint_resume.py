"""A run killed (SIGKILL) or preempted (SIGTERM) and restarted ends bit-identical to an uninterrupted one."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).with_name("resumable_train.py")
NUM_STEPS = 40


def _start(out_dir, *extra):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out_dir), str(NUM_STEPS), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"training run failed ({proc.returncode}):\n{err[-3000:]}"


def _checkpoint_steps(out_dir):
    root = out_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def _logged_steps(out_dir):
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def _wait_for(predicate, proc, timeout=90):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run to make progress"
        time.sleep(0.05)


def _params(out_dir):
    with np.load(out_dir / "final_params.npz") as f:
        return {k: f[k] for k in f.files}


def _assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _finish(_start(out))
    return _params(out)


def test_sigkill_then_restart_is_bit_identical(tmp_path, reference_run):
    proc = _start(tmp_path, "--sleep", "0.1")
    _wait_for(lambda: any(s >= 15 for s in _checkpoint_steps(tmp_path)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _logged_steps(tmp_path)
    assert killed_at < NUM_STEPS

    _finish(_start(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == NUM_STEPS
    assert result["resumed_from"] is not None and 15 <= result["resumed_from"] <= killed_at
    _assert_bit_identical(_params(tmp_path), reference_run)


def test_sigterm_saves_exits_cleanly_and_resumes(tmp_path, reference_run):
    proc = _start(tmp_path, "--sleep", "0.1", "--checkpoint-every", "100")
    _wait_for(lambda: _logged_steps(tmp_path) >= 7, proc)
    proc.send_signal(signal.SIGTERM)
    _finish(proc)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["preempted"] is True and result["step"] < NUM_STEPS
    # checkpoint_every=100 would never have saved: the checkpoint is the SIGTERM one, at the current step.
    assert _checkpoint_steps(tmp_path) == [result["step"]]

    _finish(_start(tmp_path, "--checkpoint-every", "100"))
    result2 = json.loads((tmp_path / "result.json").read_text())
    assert result2 == {"step": NUM_STEPS, "resumed_from": result["step"], "preempted": False}
    _assert_bit_identical(_params(tmp_path), reference_run)
