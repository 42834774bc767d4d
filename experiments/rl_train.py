"""``jaxlab train rl``: any deep RL algorithm of ``jaxlab.rl`` on any gymnax env, many seeds at once.

    jaxlab train rl --algo ppo --env CartPole-v1 --seeds 4 --out runs/ppo-cartpole

All seeds train together in one compiled ``jax.vmap`` of a ``lax.scan`` over ``log_every`` updates (a
chunk, :func:`jaxlab.rl.train.compiled_chunk`), driven by the training spine's loop
:func:`jaxlab.loop.fit`: one ``fit`` step is one chunk of every seed (:func:`jaxlab.rl.train.fit_adapter`).
``fit`` writes each chunk's metrics line to ``OUT/metrics.jsonl`` (seed means and per-seed returns of its
updates, with ``update`` and ``env_steps`` counting the run so far, so the file stays small for any run
length), checkpoints the batched state ``checkpoints`` times over the run (and on SIGTERM, after the chunk
in flight) to ``OUT/checkpoints``, and shows the progress in chunks.

Resuming is running the same command again. The ``step`` of a metrics line is the number of chunks done,
the unit ``fit`` numbers its checkpoints in; so when ``fit`` restores the checkpoint of chunk ``c`` it drops
exactly the lines past ``c`` (those of chunks run after that checkpoint, which the resumed run writes
again), and ``metrics.jsonl`` holds every chunk once, in order. The chunk length is part of the run's
identity (``OUT/run.json``). Update ``i`` of a seed draws from ``fold_in(key, i)`` of that seed's key, so
a resumed run ends bit-identical to an uninterrupted one.

At the end ``OUT/learning_curve.png`` shows the mean return and its spread (min to max over seeds) against
environment steps, and ``OUT/summary.json`` the final returns (mean return over the last 10% of the
metrics lines, per seed) and the timing.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np

from jaxlab.loop import LoopConfig, fit
from jaxlab.metrics import MetricsWriter, to_jsonable
from jaxlab.registry import register_trainer
from jaxlab.rl.core import RLConfig
from jaxlab.rl.train import ChunkTiming, algorithm_config, final_return, fit_adapter, save_learning_curve
from jaxlab.validation import check_positive

__all__ = ["RLTrainConfig", "train_rl"]


@dataclasses.dataclass(frozen=True)
class RLTrainConfig:
    """Train a deep RL agent on a gymnax environment, several seeds at once."""

    algo: str = "ppo"
    """Algorithm: ppo, dqn, a2c, reinforce, trpo, ddpg, td3 or sac."""
    env: str = "CartPole-v1"
    """gymnax environment id (or a probe id: Bandit-probe, TimeLimitBandit-probe, Continuous-probe)."""
    seeds: int = 1
    """Independent seeds trained together (vmap)."""
    seed: int = 0
    """Base seed; seed s trains with split(PRNGKey(seed), seeds)[s]."""
    total_timesteps: int = 0
    """Environment steps per seed (0: the algorithm's default)."""
    hparams: tuple[str, ...] = ()
    """Overrides of the algorithm's config, e.g. learning_rate=1e-3 num_envs=8."""
    log_every: int = 0
    """Updates per jitted chunk and metrics.jsonl line (0: about 500 lines for the whole run)."""
    checkpoints: int = 10
    """Checkpoints over the run (evenly spaced in chunks; one more on SIGTERM)."""
    keep: int = 2
    """Checkpoints kept on disk."""
    progress: bool = True
    """Show the progress bar (in chunks)."""
    fast_compile: bool = False
    """Compile without XLA backend optimisation (faster to compile, slower to run: for short runs)."""

    def __post_init__(self):
        check_positive(self, "seeds", "checkpoints", "keep")
        check_positive(self, "total_timesteps", "log_every", minimum=0)
        self.algo_config()  # unknown algo or env, action-space mismatch, bad overrides: ValueError now

    def algo_config(self) -> RLConfig:
        return algorithm_config(self.algo, self.env, self.total_timesteps or None, self.hparams)

    def chunk_updates(self) -> int:
        """Updates per chunk (and per metrics line)."""
        return self.log_every or max(self.algo_config().num_updates // 500, 1)


@register_trainer("rl", description="deep RL (PPO, DQN, A2C, REINFORCE, TRPO, DDPG, TD3, SAC) on gymnax, "
                                    "jit-compiled, many seeds at once", config=RLTrainConfig)
def train_rl(cfg: RLTrainConfig, out_dir: pathlib.Path) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg`` in ``out_dir``; returns the summary (also written to
    ``summary.json``, with ``preempted`` true when SIGTERM stopped the run after a checkpoint)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    algo_cfg = cfg.algo_config()
    chunk_updates = cfg.chunk_updates()
    run_file = out_dir / "run.json"
    identity = to_jsonable({"algo": cfg.algo, "env": cfg.env, "seeds": cfg.seeds, "seed": cfg.seed,
                            "chunk_updates": chunk_updates, "config": algo_cfg})
    if run_file.exists() and json.loads(run_file.read_text()) != identity:
        raise ValueError(f"out_dir={str(out_dir)!r} holds a different run ({run_file}); "
                         f"choose another --out to start a new one")
    run_file.write_text(json.dumps(identity, indent=1))

    timing = ChunkTiming()
    train_step, state, data, num_chunks = fit_adapter(algo_cfg, jax.random.PRNGKey(cfg.seed), cfg.seeds,
                                                      chunk_updates, fast_compile=cfg.fast_compile, timing=timing)
    loop = LoopConfig(num_steps=num_chunks, log_every=1, checkpoint_every=-(-num_chunks // cfg.checkpoints),
                      keep_checkpoints=cfg.keep, progress=cfg.progress)
    result = fit(train_step, state, data, loop, out_dir)

    total = algo_cfg.num_updates
    start = min((result.resumed_from or 0) * chunk_updates, total)
    done = min(int(result.state.step) * chunk_updates, total)
    rows = MetricsWriter.read(out_dir / "metrics.jsonl")
    x = np.array([r["env_steps"] for r in rows])
    returns = np.array([[np.nan if v is None else v for v in r["episode_return_seeds"]] for r in rows],
                       np.float64).reshape(len(rows), cfg.seeds).T  # [S, lines]
    save_learning_curve(out_dir / "learning_curve.png", {cfg.algo: (x, returns)}, "environment steps",
                        f"{cfg.algo} on {cfg.env}, {cfg.seeds} seed(s): mean and min-max")
    final = final_return(returns) if rows else np.full(cfg.seeds, np.nan)
    summary = {"algo": cfg.algo, "env": cfg.env, "updates": total, "env_steps": total * algo_cfg.steps_per_update,
               "updates_done": done, "preempted": result.preempted, "resumed_from_update": start,
               "final_return_seeds": final,
               "final_return_mean": float(np.nanmean(final)) if np.isfinite(final).any() else None,
               "compile_s": timing.compile_s, "run_s": timing.run_s,
               "steps_per_s": ((done - start) * algo_cfg.steps_per_update * cfg.seeds / timing.run_s
                               if timing.run_s else None)}
    (out_dir / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=1))
    return summary
