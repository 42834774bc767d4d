"""The one training loop: ``fit`` drives a pure ``train_step(state, batch, key) -> (state, metrics)``.

``fit`` restores the newest valid checkpoint in ``out_dir`` (state, base PRNG key and data position),
runs to ``num_steps``, logs JSONL metrics, checkpoints every ``checkpoint_every`` steps, and on
SIGTERM saves a checkpoint at the current step and returns cleanly. Since step ``t`` draws its
key from ``fold_in(state.key, t)`` and its batch from the restored data position, a run killed
at any point and restarted ends with bit-identical parameters to an uninterrupted run.

Runs survive faults:

* a corrupt newest checkpoint (unreadable files) is moved aside with a warning and the run resumes
  from the newest one that reads back (:meth:`Checkpointer.restore_latest_valid`);
* after a resume, lines of ``metrics.jsonl`` past the restored step are dropped, so the file holds
  each step once;
* a non-finite loss or gradient (``metrics["nonfinite"]``, set by
  :func:`jaxlab.train_state.make_train_step`, which never applies such an update; or a NaN ``loss``
  from any other step) stops the run with :class:`NonFiniteError` naming the step, before any later
  checkpoint is written; with ``skip_nonfinite`` the step is skipped and counted
  (``skipped_nonfinite`` in the metrics);
* an output folder that cannot be written fails before training starts.

Data sources follow a three-method protocol (``ArrayIterator`` is the in-memory one; ``KeyedBatches`` the base of
sources whose batch ``i`` is drawn from ``fold_in(key, i)``):

    next(data) -> batch;  data.get_state() -> dict (JSON);  data.set_state(dict)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pathlib
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.checkpoint import Checkpointer
from jaxlab.metrics import MetricsWriter
from jaxlab.train_state import step_key
from jaxlab.validation import check_positive

__all__ = ["ArrayIterator", "DataIterator", "FitResult", "KeyedBatches", "LoopConfig", "NonFiniteError",
           "check_writable", "fit"]


class DataIterator(Protocol):
    def __next__(self) -> Any: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


class KeyedBatches:
    """The base of a data source whose batch ``i`` is a pure function of ``fold_in(key, i)``, so the position
    ``index`` is its whole state; a subclass's ``__next__`` draws from :meth:`next_key`."""

    def __init__(self, key: jax.Array):
        self.key, self.index = key, 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def next_key(self) -> jax.Array:
        """``fold_in(key, index)``, and the position moves on by one batch."""
        self.index += 1
        return jax.random.fold_in(self.key, self.index - 1)

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


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
    skip_nonfinite: bool = False
    """Skip steps whose loss or gradient is not finite (counted in the metrics) instead of stopping."""

    def __post_init__(self):
        check_positive(self, "num_steps", "log_every", "checkpoint_every", "keep_checkpoints")


@dataclasses.dataclass(frozen=True)
class FitResult:
    state: Any
    resumed_from: int | None
    """Step of the checkpoint the run started from (None for a fresh run)."""
    preempted: bool
    """True when SIGTERM stopped the run early (a checkpoint was saved at the current step)."""
    skipped_nonfinite: int = 0
    """Steps skipped for a non-finite loss or gradient (only with ``skip_nonfinite``)."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradient of a step was NaN or infinite."""

    def __init__(self, step: int, last_checkpoint: int | None, metrics: dict):
        self.step, self.last_checkpoint = step, last_checkpoint
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        kept = (f"the last good checkpoint (step {last_checkpoint}) is kept" if last_checkpoint is not None
                else "no checkpoint was written")
        super().__init__(f"non-finite loss or gradient at step {step} ({shown}); training stopped and {kept}. "
                         f"Lower the learning rate, or pass skip_nonfinite (--skip-nonfinite) to skip such steps.")


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


def check_writable(out_dir: str | pathlib.Path, need_bytes: int = 0) -> pathlib.Path:
    """Create ``out_dir`` and prove it takes a file (and has ``need_bytes`` free); ``OSError`` naming the
    folder otherwise. Run before training, so a read-only or full disk fails at once."""
    out_dir = pathlib.Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        with probe.open("wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"cannot write to the output folder {out_dir}: {e.strerror or e}") from e
    free = shutil.disk_usage(out_dir).free
    if free < need_bytes:
        raise OSError(errno.ENOSPC, f"the output folder {out_dir} has {free / 2**20:.1f} MiB free; "
                                    f"checkpoints of this run need about {need_bytes / 2**20:.1f} MiB")
    return out_dir


def _state_bytes(state: Any) -> int:
    return sum(int(np.prod(np.shape(x))) * np.dtype(getattr(x, "dtype", np.float32)).itemsize
               for x in jax.tree.leaves(state))


class _NonFiniteWatch:
    """Per-step non-finite flags, kept on device and read at sync points (log lines, checkpoints)."""

    def __init__(self, skip: bool, skipped: int):
        self.skip, self.skipped, self.pending = skip, skipped, []

    def add(self, step: int, metrics: dict) -> None:
        if "nonfinite" in metrics:
            self.pending.append((step, metrics["nonfinite"], metrics))
        elif "loss" in metrics:  # a step built without the spine's guard
            self.pending.append((step, ~jnp.isfinite(metrics["loss"]), metrics))

    def check(self, last_checkpoint: int | None) -> None:
        if not self.pending:
            return
        flags = np.asarray(jax.device_get([f for _, f, _ in self.pending])).astype(bool)
        for (step, _, metrics), bad in zip(self.pending, flags, strict=True):
            if bad and not self.skip:
                values = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
                self.pending = []
                raise NonFiniteError(step, last_checkpoint, values)
            self.skipped += int(bad)
        self.pending = []


def fit(train_step: Callable, state: Any, data: DataIterator, cfg: LoopConfig, out_dir: str | pathlib.Path,
        *, eval_fn: Callable[[Any], dict] | None = None, eval_every: int | None = None,
        on_step: Callable[[int, Any, dict], None] | None = None) -> FitResult:
    """Train ``state`` to ``cfg.num_steps`` with checkpoints and metrics under ``out_dir``.

    Args:
      train_step: jitted ``(state, batch, key) -> (state, metrics)``; donation is fine.
      state: the initial state (with ``step`` and ``key``, e.g. a ``TrainState``); its structure is the
        restore target.
      data: a ``DataIterator``; its position is checkpointed with the state.
      eval_fn: ``eval_fn(state) -> metrics``, logged with an ``eval/`` prefix every ``eval_every``.
      on_step: optional host hook ``on_step(step, state, metrics)`` after every step.

    Raises:
      NonFiniteError: a step's loss or gradient was not finite (unless ``cfg.skip_nonfinite``); no
        checkpoint of that step or later is written.
      OSError: ``out_dir`` cannot be written.
    """
    out_dir = check_writable(out_dir, need_bytes=2 * _state_bytes(state))
    ckpt = Checkpointer(out_dir / "checkpoints", save_every=cfg.checkpoint_every,
                        keep=cfg.keep_checkpoints)
    resumed_from, fit_state = None, {}
    restored = ckpt.restore_latest_valid(state) if cfg.resume else None
    if restored is not None:
        resumed_from, state, saved = restored
        data.set_state(saved.get("data", saved))
        fit_state = saved.get("fit", {})
    watch = _NonFiniteWatch(cfg.skip_nonfinite, int(fit_state.get("skipped_nonfinite", 0)))

    def saved_state() -> dict:
        return {"data": data.get_state(), "fit": {"skipped_nonfinite": watch.skipped}}

    preempted = False
    from tqdm.auto import tqdm

    try:
        with MetricsWriter(out_dir / "metrics.jsonl", keep_through=resumed_from or 0) as writer, \
                _stop_on_sigterm() as stop, \
                tqdm(total=cfg.num_steps, initial=int(state.step), disable=not cfg.progress,
                     desc="train", dynamic_ncols=True) as bar:
            step = int(state.step)
            while step < cfg.num_steps:
                batch = next(data)
                state, metrics = train_step(state, batch, step_key(state))
                step += 1
                watch.add(step, metrics)
                last = step == cfg.num_steps
                if step % cfg.log_every == 0 or last:
                    watch.check(ckpt.latest_step())
                    writer.write(step, {**metrics, "skipped_nonfinite": watch.skipped}
                                 if cfg.skip_nonfinite else metrics)
                    bar.set_postfix(loss=float(metrics["loss"]) if "loss" in metrics else None)
                if eval_fn is not None and eval_every and (step % eval_every == 0 or last):
                    writer.write(step, {f"eval/{k}": v for k, v in eval_fn(state).items()})
                if on_step is not None:
                    on_step(step, state, metrics)
                bar.update(1)
                if stop.is_set() or last or step % cfg.checkpoint_every == 0:
                    watch.check(ckpt.latest_step())  # never checkpoint past a non-finite step
                    ckpt.save(step, state, saved_state(), force=stop.is_set() or last)
                if stop.is_set():
                    preempted = True
                    break
    finally:
        ckpt.close()
    return FitResult(state=state, resumed_from=resumed_from, preempted=preempted, skipped_nonfinite=watch.skipped)
