"""``jaxlab train rl``: any deep RL algorithm of ``jaxlab.rl`` on any gymnax env, many seeds at once.

    jaxlab train rl --algo ppo --env CartPole-v1 --seeds 4 --out runs/ppo-cartpole

All seeds train together in one ``jax.jit(jax.vmap(...))`` program, run in ``chunks`` pieces of
``lax.scan``. A progress bar is fed from inside the jitted loop every ``progress_every`` updates;
after each chunk the metrics go to ``OUT/metrics.jsonl`` (one line per window of ``log_every``
updates: seed means and per-seed returns, so the file stays small for any run length) and the
batched train state to an orbax checkpoint in ``OUT/checkpoints``. Running the same command again
resumes from the latest checkpoint and draws the same random numbers as an uninterrupted run
(update ``i`` uses ``fold_in(key, i)``). At the end ``OUT/learning_curve.png`` shows the mean return
and its spread (min to max over seeds) against environment steps, and ``OUT/summary.json`` the
final returns.

``ALGORITHMS``, ``algorithm_config`` and ``train_in_chunks`` are shared with the ``rl-classic-control``
and ``rl-throughput`` experiments and ``benchmarks/rl.py``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import math
import pathlib
import threading
import time
import typing
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxlab.checkpoint import Checkpointer  # noqa: E402
from jaxlab.metrics import JitProgress, MetricsWriter, to_jsonable  # noqa: E402
from jaxlab.registry import register_trainer  # noqa: E402
from jaxlab.rl import a2c, ddpg, dqn, ppo, reinforce, sac, td3, trpo  # noqa: E402
from jaxlab.rl.core import RLConfig, Train  # noqa: E402
from jaxlab.xla_options import FAST_COMPILE  # noqa: E402

__all__ = ["ALGORITHMS", "FAST_COMPILE", "ChunkTiming", "RLTrainConfig", "algorithm_config", "final_return",
           "plot_curves", "train_in_chunks", "train_rl"]

ALGORITHMS: dict[str, tuple[Any, type[RLConfig]]] = {
    "ppo": (ppo, ppo.PPOConfig),
    "dqn": (dqn, dqn.DQNConfig),
    "a2c": (a2c, a2c.A2CConfig),
    "reinforce": (reinforce, reinforce.REINFORCEConfig),
    "trpo": (trpo, trpo.TRPOConfig),
    "ddpg": (ddpg, ddpg.DDPGConfig),
    "td3": (td3, td3.TD3Config),
    "sac": (sac, sac.SACConfig),
}
"""Algorithm name -> (module with ``make_train``, its config class)."""


def _parse_override(cls: type, item: str) -> tuple[str, Any]:
    """``"FIELD=VALUE"`` -> ``(field, value)`` with the value converted to the field's type."""
    if "=" not in item:
        raise ValueError(f"hyperparameter override {item!r} must look like FIELD=VALUE")
    name, raw = (s.strip() for s in item.split("=", 1))
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ValueError(f"{cls.__name__} has no field {name!r}; fields: {', '.join(sorted(fields))}")
    kind = hints[name]
    try:
        if kind is str:
            return name, raw
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return name, raw.lower() in ("true", "1")
        value = ast.literal_eval(raw)
        if kind is float:
            return name, float(value)
        if kind is int:
            if float(value) != int(value):
                raise ValueError(raw)
            return name, int(value)
        return name, tuple(value) if isinstance(value, (list, tuple)) else (value,)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read {item!r}: {name} must be a {getattr(kind, '__name__', kind)}") from e


def algorithm_config(algo: str, env_id: str, total_timesteps: int | None = None,
                     overrides: tuple[str, ...] | dict[str, Any] = ()) -> RLConfig:
    """The validated config of ``algo`` on ``env_id`` (its tuned defaults, then ``overrides``:
    ``"FIELD=VALUE"`` strings or a dict). Unknown algorithms, env ids and action-space mismatches raise."""
    if algo not in ALGORITHMS:
        raise ValueError(f"algo={algo!r} must be one of {', '.join(ALGORITHMS)}")
    cls = ALGORITHMS[algo][1]
    fields = dict(overrides) if isinstance(overrides, dict) else dict(_parse_override(cls, o) for o in overrides)
    if total_timesteps:
        fields["total_timesteps"] = total_timesteps
    return cls(env_id=env_id, **fields)


def final_return(returns: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Mean episode return over the last ``fraction`` of updates, per seed: ``[S, U] -> [S]``."""
    returns = np.asarray(returns, np.float64)
    tail = returns[:, -max(int(math.ceil(returns.shape[1] * fraction)), 1):]
    ok = np.isfinite(tail)
    return np.where(ok.any(1), np.where(ok, tail, 0).sum(1) / np.maximum(ok.sum(1), 1), np.nan)


@dataclasses.dataclass
class ChunkTiming:
    """Wall-clock of a chunked run: compilation, then each chunk (seconds)."""

    compile_s: float = 0.0
    chunk_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def run_s(self) -> float:
        return float(sum(self.chunk_s))


def _masked_chunk(train: Train, chunk_updates: int, example_state: Any,
                  progress: JitProgress | None) -> Callable[[Any, jax.Array], tuple[Any, dict]]:
    """``(states [S, ...], start) -> (states, metrics [S, chunk_updates])``: updates ``start + i`` for
    ``i < chunk_updates``, skipping those at or past ``train.num_updates`` (the last chunk may be short)."""
    metric_shapes = jax.eval_shape(train.update, example_state)[1]

    def skip(state):
        return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)

    def body(state, i):
        if progress is not None:
            progress.update(i)
        return jax.lax.cond(i < train.num_updates, train.update, skip, state)

    def chunk(states, start):
        steps = start + jnp.arange(chunk_updates)  # unbatched: the cond stays a branch under vmap
        return jax.vmap(lambda s: jax.lax.scan(body, s, steps))(states)

    return chunk


_COMPILED: dict[tuple, Any] = {}  # compiled chunks by (config class, config, chunk size, state shapes, options)
_MAX_COMPILED = 4
_COMPILED_LOCK = threading.Lock()  # runs may train from several threads at once


def train_in_chunks(train: Train, states: Any, *, num_chunks: int, start: int = 0,
                    progress: JitProgress | None = None,
                    on_chunk: Callable[[Any, int, dict[str, np.ndarray]], None] | None = None,
                    fast_compile: bool = False) -> tuple[Any, dict[str, np.ndarray], ChunkTiming]:
    """Run the updates ``start .. train.num_updates - 1`` of every seed of ``states`` (leaves ``[S, ...]``,
    from ``jax.vmap(train.init)``) in ``num_chunks`` jitted pieces over the whole run.

    After each chunk, ``on_chunk(states, updates_done, chunk_metrics)`` is called (checkpointing,
    logging) with host metrics ``[S, n]``. Without a progress bar the compiled chunk is kept for the next
    run of the same algorithm config and shapes in this process (a resumed run, a notebook).
    ``fast_compile`` turns XLA's backend optimisation off: compiles about twice as fast and runs slower,
    the better trade for short runs. Returns the final states, the metrics of the updates run
    (``[S, num_updates - start]`` per name) and the timing (compile time apart from run time).
    """
    if num_chunks < 1:
        raise ValueError(f"{num_chunks=} must be >= 1")
    total = train.num_updates
    if not 0 <= start <= total:
        raise ValueError(f"{start=} must be in [0, num_updates={total}]")
    chunk_updates = max(math.ceil(total / num_chunks), 1)
    timing = ChunkTiming()
    collected: list[dict[str, np.ndarray]] = []
    if start < total:
        t0 = time.perf_counter()
        shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(states))
        cache_key = (type(train.config), train.config, chunk_updates, shapes, fast_compile)
        with _COMPILED_LOCK:
            chunk = _COMPILED.get(cache_key) if progress is None else None
        if chunk is None:
            example = jax.tree.map(lambda x: x[0], states)
            chunk = jax.jit(_masked_chunk(train, chunk_updates, example, progress)).lower(
                states, jnp.int32(start)).compile(FAST_COMPILE if fast_compile else None)
            if progress is None and train.config is not None:
                with _COMPILED_LOCK:
                    _COMPILED[cache_key] = chunk
                    while len(_COMPILED) > _MAX_COMPILED:
                        _COMPILED.pop(next(iter(_COMPILED)))
        timing.compile_s = time.perf_counter() - t0
    done = start
    while done < total:
        t0 = time.perf_counter()
        states, metrics = chunk(states, jnp.int32(done))
        n = min(chunk_updates, total - done)
        metrics = {k: np.asarray(v)[:, :n] for k, v in jax.device_get(metrics).items()}
        timing.chunk_s.append(time.perf_counter() - t0)
        done += n
        collected.append(metrics)
        if on_chunk is not None:
            on_chunk(states, done, metrics)
    names = collected[0].keys() if collected else ()
    return states, {k: np.concatenate([m[k] for m in collected], axis=1) for k in names}, timing


def plot_curves(ax, curves: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str, title: str) -> None:
    """Mean return and its min-max band over seeds: ``curves[label] = (x [U], returns [S, U])``."""
    for label, (x, returns) in curves.items():
        returns = np.asarray(returns, np.float64)
        with _quiet_nan():
            mean, lo, hi = np.nanmean(returns, 0), np.nanmin(returns, 0), np.nanmax(returns, 0)
        (line,) = ax.plot(x, mean, label=label, lw=1.2)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("episode return")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


@contextlib.contextmanager
def _quiet_nan():
    """Silence numpy's all-NaN-slice warnings (updates before the first finished episode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield


# ----------------------------------------------------------------------------- the trainer

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
    chunks: int = 10
    """Jitted pieces of the run; metrics are written and the state checkpointed after each."""
    keep: int = 2
    """Checkpoints kept on disk."""
    log_every: int = 0
    """Updates per metrics.jsonl line (0: about 500 lines for the whole run)."""
    progress_every: int = 0
    """Updates between progress-bar refreshes from inside jit (0: about 100 refreshes)."""
    progress: bool = True
    """Show the progress bar."""
    fast_compile: bool = False
    """Compile without XLA backend optimisation (faster to compile, slower to run: for short runs)."""

    def __post_init__(self):
        for name in ("seeds", "chunks", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("total_timesteps", "log_every", "progress_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        self.algo_config()  # unknown algo or env, action-space mismatch, bad overrides: ValueError now

    def algo_config(self) -> RLConfig:
        return algorithm_config(self.algo, self.env, self.total_timesteps or None, self.hparams)


def _windows(metrics: dict[str, np.ndarray], first_update: int, log_every: int, env_steps_per_update: int):
    """JSONL rows of ``metrics [S, n]``: one per window of ``log_every`` updates (seed and window means)."""
    n = next(iter(metrics.values())).shape[1]
    for lo in range(0, n, log_every):
        hi = min(lo + log_every, n)
        with _quiet_nan():
            per_seed = np.nanmean(np.asarray(metrics["episode_return"][:, lo:hi], np.float64), axis=1)  # [S]
            row = {k: float(np.nanmean(np.asarray(v[:, lo:hi], np.float64))) for k, v in metrics.items()
                   if k not in ("env_steps", "episode_return")}
        row.update(episode_return=float(np.nanmean(per_seed)) if np.isfinite(per_seed).any() else None,
                   episode_return_seeds=per_seed, env_steps=(first_update + hi) * env_steps_per_update)
        yield first_update + hi, row


def _read_rows(path: pathlib.Path, last_step: int | None = None) -> list[dict]:
    rows = {r["step"]: r for r in MetricsWriter.read(path)} if path.exists() else {}
    return [rows[s] for s in sorted(rows) if last_step is None or s <= last_step]


@register_trainer("rl", description="deep RL (PPO, DQN, A2C, REINFORCE, TRPO, DDPG, TD3, SAC) on gymnax, "
                                    "jit-compiled, many seeds at once", config=RLTrainConfig)
def train_rl(cfg: RLTrainConfig, out_dir: pathlib.Path) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg`` in ``out_dir``; returns the summary."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    algo_cfg = cfg.algo_config()
    run_file = out_dir / "run.json"
    identity = to_jsonable({"algo": cfg.algo, "env": cfg.env, "seeds": cfg.seeds, "seed": cfg.seed,
                            "config": algo_cfg})
    if run_file.exists() and json.loads(run_file.read_text()) != identity:
        raise ValueError(f"out_dir={str(out_dir)!r} holds a different run ({run_file}); "
                         f"choose another --out to start a new one")
    run_file.write_text(json.dumps(identity, indent=1))

    train = ALGORITHMS[cfg.algo][0].make_train(algo_cfg)
    total = train.num_updates
    log_every = cfg.log_every or max(total // 500, 1)
    states = jax.jit(jax.vmap(train.init))(jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.seeds))
    metrics_path = out_dir / "metrics.jsonl"
    ckpt = Checkpointer(out_dir / "checkpoints", save_every=1, keep=cfg.keep)
    start = ckpt.latest_step() or 0
    if start:
        states, _ = ckpt.restore(states)
        rows = _read_rows(metrics_path, start)  # drop lines written after the last checkpoint
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif metrics_path.exists():
        metrics_path.unlink()

    with (MetricsWriter(metrics_path) as writer,
          JitProgress(total, cfg.progress_every or max(total // 100, 1), desc=f"{cfg.algo} {cfg.env}",
                      disable=not cfg.progress) as progress):
        progress.bar.update(start)
        progress.done = start

        def on_chunk(states, done, metrics):
            for step, row in _windows(metrics, done - next(iter(metrics.values())).shape[1], log_every,
                                      algo_cfg.steps_per_update):
                writer.write(step, row)
            ckpt.save(done, states, {"env_steps": done * algo_cfg.steps_per_update}, force=True)

        states, _, timing = train_in_chunks(train, states, num_chunks=cfg.chunks, start=start,
                                            progress=progress if cfg.progress else None, on_chunk=on_chunk,
                                            fast_compile=cfg.fast_compile)
    ckpt.close()

    rows = _read_rows(metrics_path)
    x = np.array([r["env_steps"] for r in rows])
    returns = np.array([[np.nan if v is None else v for v in r["episode_return_seeds"]] for r in rows]).T  # [S, W]
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_curves(ax, {cfg.algo: (x, returns)}, "environment steps",
                f"{cfg.algo} on {cfg.env}, {cfg.seeds} seed(s): mean and min-max")
    fig.tight_layout()
    fig.savefig(out_dir / "learning_curve.png", dpi=110)
    plt.close(fig)
    final = final_return(returns)
    summary = {"algo": cfg.algo, "env": cfg.env, "updates": total, "env_steps": total * algo_cfg.steps_per_update,
               "resumed_from_update": start, "final_return_seeds": final,
               "final_return_mean": float(np.nanmean(final)) if np.isfinite(final).any() else None,
               "compile_s": timing.compile_s, "run_s": timing.run_s,
               "steps_per_s": ((total - start) * algo_cfg.steps_per_update * cfg.seeds / timing.run_s
                               if timing.run_s else None)}
    (out_dir / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=1))
    return summary
