"""A resumable training loop around a pure ``train_step(state, batch, key) -> (state, metrics)``.

``fit`` restores the latest checkpoint in ``out_dir`` (state, base PRNG key and data position),
runs to ``num_steps``, logs JSONL metrics, checkpoints every ``checkpoint_every`` steps, and on
SIGTERM saves a checkpoint at the current step and returns cleanly. Since step ``t`` draws its
key from ``fold_in(state.key, t)`` and its batch from the restored data position, a run killed
at any point and restarted ends with bit-identical parameters to an uninterrupted run.

Data sources follow a three-method protocol (``ArrayIterator`` is the in-memory one):

    next(data) -> batch;  data.get_state() -> dict (JSON);  data.set_state(dict)
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import numpy as np

from jaxlab.checkpoint import Checkpointer
from jaxlab.metrics import MetricsWriter
from jaxlab.train_state import step_key

__all__ = ["ArrayIterator", "DataIterator", "FitResult", "LoopConfig", "fit"]


class DataIterator(Protocol):
    def __next__(self) -> Any: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


class ArrayIterator:
    """Minibatches of in-memory arrays (a pytree with a shared leading axis), reshuffled each epoch.

    The order of epoch ``e`` is ``permutation(fold_in(PRNGKey(seed), e))``, so the position is just
    ``(epoch, index)``. An incomplete last batch of an epoch is dropped.
    """

    def __init__(self, arrays: Any, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        sizes = {np.shape(x)[0] for x in jax.tree.leaves(arrays)}
        if len(sizes) != 1:
            raise ValueError(f"all arrays need the same leading size, got {sorted(sizes)}")
        (self.size,) = sizes
        if not 1 <= batch_size <= self.size:
            raise ValueError(f"{batch_size=} must be in [1, {self.size}] (the data size)")
        self.arrays = jax.tree.map(np.asarray, arrays)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self.epoch)
        return np.asarray(jax.random.permutation(key, self.size))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.index + self.batch_size > self.size:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order()
        idx = self._order[self.index: self.index + self.batch_size]
        self.index += self.batch_size
        return jax.tree.map(lambda x: x[idx], self.arrays)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order()


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to log and checkpoint."""

    num_steps: int
    """Total optimizer steps (counted across restarts)."""
    log_every: int = 50
    """Write a JSONL metrics line every this many steps."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints stay on disk."""
    resume: bool = True
    """Continue from the latest checkpoint in the output folder when there is one."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")


@dataclasses.dataclass(frozen=True)
class FitResult:
    state: Any
    resumed_from: int | None
    """Step of the checkpoint the run started from (None for a fresh run)."""
    preempted: bool
    """True when SIGTERM stopped the run early (a checkpoint was saved at the current step)."""


@contextlib.contextmanager
def _stop_on_sigterm():
    """Yield an Event set on SIGTERM (main thread only; elsewhere the handler is not installed)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def fit(train_step: Callable, state: Any, data: DataIterator, cfg: LoopConfig, out_dir: str | pathlib.Path,
        *, eval_fn: Callable[[Any], dict] | None = None, eval_every: int | None = None,
        on_step: Callable[[int, Any, dict], None] | None = None) -> FitResult:
    """Train ``state`` to ``cfg.num_steps`` with checkpoints and metrics under ``out_dir``.

    Args:
      train_step: jitted ``(state, batch, key) -> (state, metrics)``; donation is fine.
      state: the initial state (a ``TrainState``); its structure is the restore target.
      data: a ``DataIterator``; its position is checkpointed with the state.
      eval_fn: ``eval_fn(state) -> metrics``, logged with an ``eval/`` prefix every ``eval_every``.
      on_step: optional host hook ``on_step(step, state, metrics)`` after every step.
    """
    out_dir = pathlib.Path(out_dir)
    ckpt = Checkpointer(out_dir / "checkpoints", save_every=cfg.checkpoint_every,
                        keep=cfg.keep_checkpoints)
    resumed_from = ckpt.latest_step() if cfg.resume else None
    if resumed_from is not None:
        state, data_state = ckpt.restore(state)
        data.set_state(data_state)
    preempted = False
    from tqdm.auto import tqdm

    with MetricsWriter(out_dir / "metrics.jsonl") as writer, _stop_on_sigterm() as stop, \
            tqdm(total=cfg.num_steps, initial=int(state.step), disable=not cfg.progress,
                 desc="train", dynamic_ncols=True) as bar:
        step = int(state.step)
        while step < cfg.num_steps:
            batch = next(data)
            state, metrics = train_step(state, batch, step_key(state))
            step += 1
            if step % cfg.log_every == 0 or step == cfg.num_steps:
                writer.write(step, metrics)
                bar.set_postfix(loss=float(metrics["loss"]) if "loss" in metrics else None)
            if eval_fn is not None and eval_every and (step % eval_every == 0 or step == cfg.num_steps):
                writer.write(step, {f"eval/{k}": v for k, v in eval_fn(state).items()})
            if on_step is not None:
                on_step(step, state, metrics)
            ckpt.save(step, state, data.get_state(), force=step == cfg.num_steps)
            bar.update(1)
            if stop.is_set():
                ckpt.save(step, state, data.get_state(), force=True)
                preempted = True
                break
    ckpt.close()
    return FitResult(state=state, resumed_from=resumed_from, preempted=preempted)
