"""``jaxlab launch``: argument handling, failure propagation, and a real 2-process job on
localhost whose training and checkpoint agree with one process."""

import json
import pathlib
import sys

import _parallel_toy as toy
import jax
import numpy as np
import pytest

from jaxlab.child_process import python_module_command
from jaxlab.parallel import launch, make_mesh, shard_train_state
from jaxlab.parallel.checkpoint import restore_checkpoint
from jaxlab.parallel.strategies import abstract_train_state
from jaxlab.train_state import make_train_step, step_key

WORKER = pathlib.Path(__file__).with_name("_mp_worker.py")


def test_child_command():
    py = sys.executable
    jaxlab_cmd = python_module_command("jaxlab")  # the working directory stays off the child's sys.path
    assert launch.child_command(["run", "zero-memory", "--quick"]) == [*jaxlab_cmd, "run", "zero-memory",
                                                                       "--quick"]
    assert launch.child_command(["jaxlab", "reproduce", "x"]) == [*jaxlab_cmd, "reproduce", "x"]
    assert launch.child_command(["run.py", "--a"]) == [py, "run.py", "--a"]
    assert launch.child_command(["python", "-m", "pkg"]) == [py, "-m", "pkg"]
    with pytest.raises(ValueError, match="no command"):
        launch.child_command([])


def test_distributed_env(monkeypatch):
    assert launch.distributed_env({}) is None
    env = {launch.ENV_COORDINATOR: "h:1", launch.ENV_NUM_PROCESSES: "4", launch.ENV_PROCESS_ID: "3"}
    assert launch.distributed_env(env) == ("h:1", 4, 3)
    with pytest.raises(ValueError, match="must be in"):
        launch.distributed_env({**env, launch.ENV_PROCESS_ID: "4"})
    with pytest.raises(ValueError, match="must be too"):
        launch.distributed_env({launch.ENV_NUM_PROCESSES: "2"})
    monkeypatch.delenv(launch.ENV_NUM_PROCESSES, raising=False)
    assert launch.maybe_initialize_distributed() is False  # a plain run stays single-process


def test_usage_errors(capsys):
    assert launch.main(["--nproc", "2", "train"]) == 2
    assert "after '--'" in capsys.readouterr().err
    for argv, message in [(["--nproc", "0", "--", "x.py"], "--nproc=0"),
                          (["--nproc", "2", "--process-id", "1", "--", "x.py"], "needs --coordinator"),
                          (["--nproc", "2", "--process-id", "2", "--coordinator", "h:1", "--", "x.py"],
                           "--process-id=2"),
                          (["--nproc", "2", "--"], "no command")]:
        with pytest.raises(SystemExit) as e:
            launch.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_failing_child_stops_the_job():
    """Process 1 fails at once; process 0 would sleep a minute but is stopped."""
    code = ("import os, sys, time; pid = os.environ['JAXLAB_PROCESS_ID']; "
            "sys.exit(5) if pid == '1' else time.sleep(60)")
    assert launch.main(["--nproc", "2", "--", "python", "-c", code]) == 5
    ok = "import os; assert os.environ['JAXLAB_NUM_PROCESSES'] == '3'"
    assert launch.main(["--nproc", "3", "--", "python", "-c", ok]) == 0


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    """2 processes x 2 CPU devices train ZeRO-3 on a 4-device mesh spanning both processes."""
    argv = ["--nproc", "2", "--cpu-devices", "2", "--", "python", str(WORKER), str(tmp_path), "zero3"]
    assert launch.main(argv) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["process_count"], result["device_count"], result["local_device_count"]) == (2, 4, 2)
    got = dict(np.load(tmp_path / "params.npz"))

    # the same job in this one process, on 4 of its 8 devices
    mesh = make_mesh(data=4)
    state = shard_train_state(toy.make_state(), mesh, "zero3")
    step = make_train_step(toy.loss_fn, toy.TX, mesh=mesh, strategy="zero3")
    losses = []
    for batch in toy.batches():
        state, metrics = step(state, batch, step_key(state))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-6)
    for name, value in state.params.items():
        np.testing.assert_allclose(got[name], np.asarray(value), rtol=1e-6, atol=1e-7)

    # the checkpoint both processes wrote restores here onto 8 devices under another strategy
    restored = restore_checkpoint(tmp_path / "ckpt",
                                  abstract_train_state(toy.make_state(), make_mesh(data=8), "ddp"))
    assert int(restored.step) == toy.STEPS
    for name, value in restored.params.items():
        np.testing.assert_array_equal(np.asarray(value), got[name])  # exactly what was trained
    for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
