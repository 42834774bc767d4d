"""Running deep RL algorithms: the algorithm table, configs from overrides, many seeds in jitted chunks,
final returns and learning curves.

Every algorithm of ``jaxlab.rl`` is a pure ``make_train(cfg) -> Train`` (``rl/core.py``). Here all seeds of
one config train together: ``init_states(cfg, keys)`` gives the batched state ``[S, ...]`` and
``train_in_chunks`` runs the updates in ``num_chunks`` calls of one compiled, ``vmap``-ed ``lax.scan``
(timed apart from its compilation), the structure of PureJaxRL (Lu et al. 2022) with a host between chunks
for checkpoints and logs.

Compiled chunks are kept by :func:`compiled_chunk`, an ``lru_cache`` keyed by the (frozen, hashable)
algorithm config, the number of seeds, the chunk length and the compiler options, so a second run of the
same shapes (a resumed run, the next repeat of a timing, another experiment in the same process) does not
compile again; :func:`init_states` caches its program the same way. ``compiled_chunk.cache_clear()``
empties the cache of chunks.

:func:`fit_adapter` lets ``jaxlab.loop.fit`` drive such a run (``jaxlab train rl``): one ``fit`` step is one
chunk of all seeds.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import math
import pathlib
import time
import typing
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlab.rl import a2c, ddpg, dqn, ppo, reinforce, sac, td3, trpo
from jaxlab.rl.core import RLConfig, Train
from jaxlab.xla_options import FAST_COMPILE

__all__ = ["ALGORITHMS", "ChunkTiming", "SeedsState", "ChunkCounter", "algorithm_config", "compiled_chunk",
           "final_return", "fit_adapter", "init_states", "make_train", "plot_curves", "save_learning_curve",
           "train_in_chunks", "window_row"]

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


def make_train(config: RLConfig) -> Train:
    """``make_train`` of the algorithm whose config class ``config`` is (one of ``ALGORITHMS``)."""
    for module, cls in ALGORITHMS.values():
        if type(config) is cls:
            return module.make_train(config)
    raise ValueError(f"config of type {type(config).__name__} is not the config of an algorithm of "
                     f"{', '.join(ALGORITHMS)}")


def init_states(config: RLConfig, keys: jax.Array, fast_compile: bool = False) -> Any:
    """The initial states of the seeds ``keys [S, 2]``: leaves ``[S, ...]``.

    The compiled ``jax.vmap(init)`` is cached like :func:`compiled_chunk`; ``fast_compile`` compiles it
    without XLA backend optimisation (about 3x faster to compile; the values may differ in the last bits).
    """
    keys = jnp.asarray(keys)
    return _compiled_init(config, tuple(keys.shape), keys.dtype, fast_compile)(keys)


@functools.lru_cache(maxsize=8)
def _compiled_init(config: RLConfig, shape: tuple[int, ...], dtype: Any, fast_compile: bool) -> Callable:
    init = jax.vmap(make_train(config).init)
    return jax.jit(init).lower(jax.ShapeDtypeStruct(shape, dtype)).compile(FAST_COMPILE if fast_compile else None)


def final_return(returns: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Mean episode return over the last ``fraction`` of updates, per seed: ``[S, U] -> [S]``."""
    returns = np.asarray(returns, np.float64)
    tail = returns[:, -max(int(math.ceil(returns.shape[1] * fraction)), 1):]
    ok = np.isfinite(tail)
    return np.where(ok.any(1), np.where(ok, tail, 0).sum(1) / np.maximum(ok.sum(1), 1), np.nan)


# ----------------------------------------------------------------------------- chunks of updates

@dataclasses.dataclass
class ChunkTiming:
    """Wall-clock of a chunked run: compilation (0 when the program was cached), then each chunk (seconds)."""

    compile_s: float = 0.0
    chunk_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def run_s(self) -> float:
        return float(sum(self.chunk_s))


@functools.lru_cache(maxsize=8)
def compiled_chunk(config: RLConfig, num_seeds: int, chunk_updates: int, fast_compile: bool = False
                   ) -> Callable[[Any, jax.Array], tuple[Any, dict[str, jax.Array]]]:
    """The compiled ``(states [S, ...], start) -> (states, metrics [S, chunk_updates])`` of ``config``.

    Runs updates ``start + i`` for ``i < chunk_updates`` of every seed (``jax.vmap`` of a ``lax.scan``),
    skipping those at or past ``config.num_updates`` (their metrics are zeros: the last chunk of a run may
    be short). ``start`` is an unbatched int32 scalar, so the skip stays a branch under ``vmap``.

    Cached (``functools.lru_cache``, the 8 most recent) by its arguments: the config is a frozen dataclass
    and so hashable, and equal configs make the same program. ``fast_compile`` turns XLA's backend
    optimisation off (``FAST_COMPILE``): about twice as fast to compile, slower to run.
    """
    train = make_train(config)
    abstract = jax.eval_shape(lambda key: jax.vmap(train.init)(jax.random.split(key, num_seeds)),
                              jax.random.PRNGKey(0))
    metric_shapes = jax.eval_shape(train.update, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                                              abstract))[1]

    def skip(state):
        return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)

    def body(state, i):
        return jax.lax.cond(i < train.num_updates, train.update, skip, state)

    def chunk(states, start):
        updates = start + jnp.arange(chunk_updates)  # unbatched: the cond stays a branch under vmap
        return jax.vmap(lambda s: jax.lax.scan(body, s, updates))(states)

    return jax.jit(chunk).lower(abstract, jax.ShapeDtypeStruct((), jnp.int32)).compile(
        FAST_COMPILE if fast_compile else None)


def _num_seeds(states: Any) -> int:
    return int(jax.tree.leaves(states)[0].shape[0])


def train_in_chunks(config: RLConfig, states: Any, *, num_chunks: int, start: int = 0,
                    on_chunk: Callable[[Any, int, dict[str, np.ndarray]], None] | None = None,
                    fast_compile: bool = False) -> tuple[Any, dict[str, np.ndarray], ChunkTiming]:
    """Run the updates ``start .. config.num_updates - 1`` of every seed of ``states`` (leaves ``[S, ...]``,
    from :func:`init_states`) in ``num_chunks`` calls of one :func:`compiled_chunk` over the whole run.

    After each chunk, ``on_chunk(states, updates_done, chunk_metrics)`` is called with host metrics
    ``[S, n]``. Returns the final states, the metrics of the updates run (``[S, num_updates - start]`` per
    name) and the timing (compilation apart from the chunks).
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks={num_chunks} must be >= 1")
    total = config.num_updates
    if not 0 <= start <= total:
        raise ValueError(f"start={start} must be in [0, num_updates={total}]")
    chunk_updates = max(math.ceil(total / num_chunks), 1)
    timing = ChunkTiming()
    collected: list[dict[str, np.ndarray]] = []
    if start < total:
        t0 = time.perf_counter()
        chunk = compiled_chunk(config, _num_seeds(states), chunk_updates, fast_compile)
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


# ----------------------------------------------------------------------------- driving by jaxlab.loop.fit

@struct.dataclass
class SeedsState:
    """What ``jaxlab.loop.fit`` drives and checkpoints: the batched algorithm states and a chunk counter.

    ``fit`` needs ``step`` and ``key``; the chunks draw nothing from ``key`` (each seed's state carries its
    own key, and update ``i`` uses ``fold_in`` of it with ``i``): it is the run's base key, for the record.
    """

    step: jax.Array
    """Chunks done, int32 ``[]``."""
    key: jax.Array
    """Base PRNG key of the run, which the seeds' keys are split from (unused by the chunks)."""
    states: Any
    """The algorithm's state of every seed, leaves ``[S, ...]``."""


class ChunkCounter:
    """``fit``'s data source for a chunked RL run: yields the index of the next chunk (the RL data are
    generated inside the jitted updates); its position is that index, checkpointed with the state."""

    def __init__(self):
        self.index = 0

    def __iter__(self) -> ChunkCounter:
        return self

    def __next__(self) -> int:
        self.index += 1
        return self.index - 1

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


@contextlib.contextmanager
def _quiet_nan():
    """Silence numpy's all-NaN-slice warnings (updates before the first finished episode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield


def window_row(metrics: dict[str, np.ndarray], updates_done: int, steps_per_update: int) -> dict[str, Any]:
    """One metrics line of the updates ``metrics [S, n]`` (those ending at ``updates_done``).

    Every metric is averaged over updates and seeds, ignoring NaN (learner metrics are NaN before an
    off-policy agent starts learning; returns are NaN in updates where no episode ended), except ``loss``
    (reported by PPO, A2C and REINFORCE, always defined): its plain mean is NaN as soon as one seed's loss
    is, which is what ``fit``'s non-finite check looks at. ``episode_return_seeds`` is the return of each
    seed ``[S]``; ``update`` and ``env_steps`` count the run so far (per seed).
    """
    with _quiet_nan():
        per_seed = np.nanmean(np.asarray(metrics["episode_return"], np.float64), axis=1)  # [S]
        row: dict[str, Any] = {k: float(np.nanmean(np.asarray(v, np.float64))) for k, v in metrics.items()
                               if k not in ("env_steps", "episode_return", "loss")}
    if "loss" in metrics:
        row["loss"] = float(np.mean(np.asarray(metrics["loss"], np.float64)))
    row.update(episode_return=float(np.nanmean(per_seed)) if np.isfinite(per_seed).any() else None,
               episode_return_seeds=per_seed, update=updates_done, env_steps=updates_done * steps_per_update)
    return row


def fit_adapter(config: RLConfig, key: jax.Array, num_seeds: int, chunk_updates: int, *,
                fast_compile: bool = False, timing: ChunkTiming | None = None,
                ) -> tuple[Callable, SeedsState, ChunkCounter, int]:
    """``(train_step, state, data, num_steps)`` for ``jaxlab.loop.fit`` to run ``config`` for ``num_seeds``
    seeds (seed ``s`` starts from ``split(key, num_seeds)[s]``), one ``fit`` step per chunk of
    ``chunk_updates`` updates of every seed.

    ``train_step(state, chunk_index, key)`` runs the chunk (the :func:`compiled_chunk` of the config, cached)
    and returns its :func:`window_row` as the metrics, so ``fit`` writes one metrics line per chunk with
    ``step`` = chunks done and truncates them with its checkpoints. ``num_steps`` (for ``LoopConfig.num_steps``)
    is the number of chunks (the last one may be short). The compile time (at the first chunk run) and the
    time of every chunk go to ``timing``.
    """
    if chunk_updates < 1:
        raise ValueError(f"chunk_updates={chunk_updates} must be >= 1")
    total = config.num_updates
    timing = ChunkTiming() if timing is None else timing
    compiled: list[Callable] = []  # compiled at the first chunk: a finished run resumed compiles nothing

    def train_step(state: SeedsState, index: int, key: jax.Array) -> tuple[SeedsState, dict[str, Any]]:
        del key  # every seed's state carries its own key
        if not compiled:
            t0 = time.perf_counter()
            compiled.append(compiled_chunk(config, num_seeds, chunk_updates, fast_compile))
            timing.compile_s += time.perf_counter() - t0
        chunk = compiled[0]
        t0 = time.perf_counter()
        first = index * chunk_updates
        states, metrics = chunk(state.states, jnp.int32(first))
        n = min(chunk_updates, total - first)
        metrics = {k: np.asarray(v)[:, :n] for k, v in jax.device_get(metrics).items()}
        timing.chunk_s.append(time.perf_counter() - t0)
        return (state.replace(step=state.step + 1, states=states),
                window_row(metrics, first + n, config.steps_per_update))

    state = SeedsState(step=jnp.zeros((), jnp.int32), key=key,
                       states=init_states(config, jax.random.split(key, num_seeds), fast_compile))
    return train_step, state, ChunkCounter(), -(-total // chunk_updates)


# ----------------------------------------------------------------------------- plots

def plot_curves(ax, curves: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str, title: str) -> None:
    """Mean return and its min-max band over seeds on the matplotlib axes ``ax``:
    ``curves[label] = (x [U], returns [S, U])``."""
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


def save_learning_curve(path: str | pathlib.Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str,
                        title: str) -> None:
    """Write :func:`plot_curves` of ``curves`` to the image ``path``. Draws on a bare
    ``matplotlib.figure.Figure`` (no pyplot), so it works headless under any backend and selects none."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    plot_curves(fig.add_subplot(), curves, xlabel, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
