"""The ``jaxlab train rl`` trainer (``fit`` over jitted chunks of all seeds: JSONL, orbax checkpoints, exact
resume, plot), the library of ``jaxlab.rl.train``, and the ``rl-classic-control`` and ``rl-throughput``
experiments at tiny sizes."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from jaxlab.context import RunContext
from jaxlab.experiments.rl_classic_control import ClassicControlConfig, rl_classic_control
from jaxlab.experiments.rl_throughput import ThroughputConfig, rl_throughput
from jaxlab.experiments.rl_train import RLTrainConfig, train_rl
from jaxlab.metrics import MetricsWriter, to_jsonable
from jaxlab.registry import Claim, get_experiment, get_trainer
from jaxlab.rl.train import algorithm_config, compiled_chunk, final_return, make_train


def _rows(path):
    return [{k: v for k, v in r.items() if k != "time"} for r in MetricsWriter.read(path)]


def test_trainer_learns_checkpoints_and_resumes_exactly(tmp_path):
    """A2C on the time-limited bandit (its probe test), two seeds in one program, 50 chunks of 2 updates
    (one ``fit`` step and one metrics line each), 2 checkpoints. Deleting the last checkpoint (as if killed
    during the second half) and running the same command again resumes from chunk 25, drops the metrics
    lines written after it and reproduces the run bit for bit."""
    cfg = RLTrainConfig(algo="a2c", env="TimeLimitBandit-probe", seeds=2, total_timesteps=8_000, log_every=2,
                        checkpoints=2, hparams=("num_envs=16", "rollout_length=5", "learning_rate=1e-2", "gamma=0.9",
                                                "hidden_sizes=(32,)"), progress=False, fast_compile=True)
    assert get_trainer("rl").config_cls is RLTrainConfig
    summary = train_rl(cfg, tmp_path)
    assert summary["updates"] == summary["updates_done"] == 100 and summary["env_steps"] == 8_000
    assert summary["resumed_from_update"] == 0 and not summary["preempted"]
    assert np.all(np.asarray(summary["final_return_seeds"]) > 4.6), summary  # out of 5; context-blind: 2.5
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 51))  # fit's steps: chunks done
    assert [r["update"] for r in rows] == list(range(2, 101, 2))
    assert rows[-1]["env_steps"] == 8_000 and len(rows[-1]["episode_return_seeds"]) == 2
    assert all(np.isfinite(r["loss"]) for r in rows)  # A2C's loss: what fit's non-finite check reads
    returns = np.array([r["episode_return_seeds"] for r in rows], float).T  # [S, lines]
    np.testing.assert_array_equal(final_return(returns), summary["final_return_seeds"])
    assert summary["final_return_mean"] == pytest.approx(np.mean(summary["final_return_seeds"]))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["25", "50"]
    assert (tmp_path / "learning_curve.png").stat().st_size > 0

    shutil.rmtree(tmp_path / "checkpoints" / "50")  # lines 26..50 are now past the last checkpoint
    hits = compiled_chunk.cache_info().hits
    resumed = train_rl(cfg, tmp_path)
    assert compiled_chunk.cache_info().hits == hits + 1  # the compiled chunk is reused, not compiled again
    assert resumed["resumed_from_update"] == 50 and resumed["updates_done"] == 100
    assert _rows(tmp_path / "metrics.jsonl") == rows  # same numbers, each chunk once, in order
    np.testing.assert_array_equal(resumed["final_return_seeds"], summary["final_return_seeds"])

    again = train_rl(cfg, tmp_path)  # a finished run: nothing to do, nothing rewritten
    assert again["resumed_from_update"] == 100 and again["run_s"] == 0 and again["compile_s"] == 0
    assert _rows(tmp_path / "metrics.jsonl") == rows

    with pytest.raises(ValueError, match="holds a different run"):
        train_rl(dataclasses.replace(cfg, seed=1), tmp_path)
    with pytest.raises(ValueError, match="holds a different run"):  # another chunk length
        train_rl(dataclasses.replace(cfg, log_every=4), tmp_path)


def test_trainer_and_experiment_configs_reject_bad_input():
    with pytest.raises(ValueError, match="algo='dqm' must be one of"):
        RLTrainConfig(algo="dqm")
    with pytest.raises(ValueError, match="DDPG needs a continuous action space"):
        RLTrainConfig(algo="ddpg", env="CartPole-v1")
    with pytest.raises(ValueError, match="PPOConfig has no field 'lr'"):
        RLTrainConfig(hparams=("lr=1e-3",))
    with pytest.raises(ValueError, match="num_envs must be a int"):
        RLTrainConfig(hparams=("num_envs=2.5",))
    with pytest.raises(ValueError, match="seeds=0"):
        RLTrainConfig(seeds=0)
    with pytest.raises(ValueError, match="checkpoints=0"):
        RLTrainConfig(checkpoints=0)
    with pytest.raises(ValueError, match="DQN needs a discrete action space"):
        ClassicControlConfig(runs=("dqn/Pendulum-v1",))
    with pytest.raises(ValueError, match="must be ALGO/ENV"):
        ClassicControlConfig(runs=("ppo/MountainCar-v0",))
    with pytest.raises(ValueError, match="num_envs=\\(\\)"):
        ThroughputConfig(num_envs=())
    cfg = algorithm_config("sac", "Pendulum-v1", 5_000, ("autotune_alpha=false", "hidden_sizes=(8, 8)"))
    assert cfg.total_timesteps == 5_000 and cfg.autotune_alpha is False and cfg.hidden_sizes == (8, 8)
    np.testing.assert_allclose(final_return(np.array([[np.nan, 1.0, 3.0], [np.nan] * 3]), 0.5), [2.0, np.nan])
    with pytest.raises(ValueError, match="not the config of an algorithm"):
        make_train(ClassicControlConfig())


# The two experiment smoke tests train the same PPO config (CartPole, 4 envs, 2 updates, one seed): in one
# process the second reuses the first's compiled program (``compiled_chunk`` caches it).

def test_classic_control_experiment_smoke(tmp_path):
    quick = get_experiment("rl-classic-control").quick
    assert quick.seeds >= 2 and quick.timesteps_fraction == 1.0  # the claims are on full step budgets
    cfg = ClassicControlConfig(runs=("ppo/CartPole-v1",), seeds=1, timesteps_fraction=1_024 / 500_000, chunks=1,
                               fast_compile=True, workers=2)
    result = rl_classic_control(cfg, RunContext("rl-classic-control", tmp_path, quick=True, show_progress=False))
    run = result.metrics["runs"]["ppo/CartPole-v1"]
    assert run["env_steps"] == 1_024 and run["seeds"] == 1 and run["target"] == 475.0
    assert run["steps_per_s"] > 0 and run["run_s"] > 0
    # the curve has a point per update (2); the final return is the mean over the last 10% of updates (the
    # last one), so with one seed it is the curve's last point
    np.testing.assert_array_equal(run["curve_env_steps"], [512, 1_024])
    np.testing.assert_array_equal(run["final_return_seeds"], np.asarray(run["curve_mean_return"])[-1:])
    assert run["final_return_mean"] == run["final_return_seeds"][0]
    assert len(result.comparisons) == 1 and "target >= 475" in result.comparisons[0].quantity
    (claim,) = result.claims  # 2 updates do not balance a pole: the claim is stated and fails
    assert isinstance(claim, Claim) and ">= 475" in claim.claim and not claim.holds
    json.dumps(to_jsonable(result.metrics))
    assert (tmp_path / "rl-classic-control.png").stat().st_size > 0


def test_throughput_experiment_smoke(tmp_path):
    cfg = ThroughputConfig(num_envs=(4,), seeds=(1,), env_steps=1_024, repeats=2, fast_compile=True, loop_steps=20)
    result = rl_throughput(cfg, RunContext("rl-throughput", tmp_path, quick=True, show_progress=False))
    (point,) = result.metrics["points"]
    assert point["num_envs"] == 4 and point["seeds"] == 1 and point["env_steps"] == 1_024
    assert point["steps_per_s"] > 0 and result.metrics["backend"] == jax.default_backend()
    loop = result.metrics["python_loop"]
    assert loop["env_steps"] == 80 and loop["steps_per_s"] > 0 and result.metrics["speedup_over_python_loop"] > 0
    assert len(result.claims) == 3 and all(isinstance(c, Claim) for c in result.claims)
    assert result.claims[1].holds and result.claims[2].holds  # one point per sweep: trivially rising
    json.dumps(to_jsonable(result.metrics))
    assert (tmp_path / "rl-throughput.png").stat().st_size > 0
