"""Checkpoints with orbax: save every N steps, keep the last K, resume from the latest.

A checkpoint holds two items: ``state`` (any pytree of arrays, typically a ``TrainState``
carrying params, optimizer state, step and the base PRNG key) and ``data`` (a JSON dict: the
data iterator's position). Restoring checks the stored tree against the caller's target and
raises ``CheckpointError`` naming the path and the first mismatching leaf, instead of
orbax's internal errors or a silently reshaped array.

    ckpt = Checkpointer(out_dir / "checkpoints", save_every=100, keep=3)
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(state)      # target gives structure, shapes, shardings
    ...
    ckpt.save(step, state, data.get_state())          # no-op unless step % save_every == 0
    ckpt.close()                                      # waits for the async write to finish
"""

from __future__ import annotations

import pathlib
import shutil
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer", "CorruptCheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not fit the state it is restored into."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files cannot be read (truncated, overwritten, partly deleted)."""


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (keeping shardings) for every array leaf of ``tree``."""

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        x = jax.numpy.asarray(x) if not hasattr(x, "shape") else x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf, tree)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    """Leaves keyed by a path string that ignores container kinds: orbax stores a dataclass or a
    tuple as nested dicts, so ``.params['w']`` and ``['params']['w']`` must compare equal."""

    def name(entry) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {"/".join(name(e) for e in keys): leaf for keys, leaf in flat if leaf is not None}


class Checkpointer:
    """Periodic orbax checkpoints of ``(state, data_state)``.

    Args:
      directory: checkpoint root; step ``s`` lives in ``directory/s``.
      save_every: ``save`` writes only when ``step % save_every == 0`` (or ``force=True``).
      keep: number of most recent checkpoints kept on disk.
      async_save: write in a background thread (orbax's default). Either way a checkpoint
        becomes visible only once complete, so a process killed mid-write leaves the previous
        checkpoint as the latest.
    """

    def __init__(self, directory: str | pathlib.Path, *, save_every: int, keep: int = 3,
                 async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"{save_every=} must be >= 1")
        if keep < 1:
            raise ValueError(f"{keep=} must be >= 1")
        self.directory = pathlib.Path(directory).absolute()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(),
                               "data": ocp.JsonCheckpointHandler()})
        except Exception as e:  # an unreadable or foreign directory
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e}") from e

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Save if ``step`` is on the interval (or ``force``); returns whether a save started."""
        if (not force and step % self.save_every != 0) or step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(dict(data_state or {})))
        return self._manager.save(step, args=args, force=True)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``(state, data_state)`` at ``step`` (default: latest) into ``target``'s structure.

        ``target`` is a pytree of arrays or ``jax.ShapeDtypeStruct``s (with shardings, to restore
        onto another device layout).
        """
        step = self.latest_step() if step is None else step
        path = self.directory / str(step)
        if step is None:
            raise CheckpointError(f"no checkpoint to restore in {self.directory}")
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(available: {self.all_steps()})")
        abstract = _abstract(target)
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception as e:
            raise CorruptCheckpointError(f"corrupt checkpoint at {path}: cannot read metadata ({e})") from e
        if stored is None:
            raise CorruptCheckpointError(f"corrupt checkpoint at {path}: the 'state' item has no metadata")
        self._check_compatible(getattr(stored, "tree", stored), abstract, path)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:
            raise CorruptCheckpointError(f"corrupt checkpoint at {path}: {type(e).__name__}: {e}") from e
        return restored["state"], dict(restored["data"] or {})

    def restore_latest_valid(self, target: Any) -> tuple[int, Any, dict] | None:
        """Restore the newest checkpoint that reads back: ``(step, state, data_state)``, or None when
        there is none.

        A corrupt checkpoint (unreadable files) is moved aside to ``<directory>.corrupt/<step>`` with a
        one-line warning naming it and the step resumed from instead, and the next older one is tried.
        A checkpoint that reads but does not fit ``target`` is a configuration error and raises.
        """
        for step in reversed(self.all_steps()):
            try:
                state, data = self.restore(target, step)
            except CorruptCheckpointError as e:
                older = [s for s in self.all_steps() if s < step]
                self._quarantine(step)
                warnings.warn(f"checkpoint {self.directory / str(step)} is corrupt ({str(e).splitlines()[0][:160]}); "
                              f"moved to {self.directory}.corrupt/{step}; "
                              + (f"resuming from step {older[-1]}" if older else "no older checkpoint: starting afresh"),
                              RuntimeWarning, stacklevel=2)
                continue
            return step, state, data
        return None

    def _quarantine(self, step: int) -> None:
        aside = pathlib.Path(f"{self.directory}.corrupt")
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / str(step)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(self.directory / str(step)), str(target))
        self._manager.reload()

    @staticmethod
    def _check_compatible(stored: Any, abstract: Any, path: pathlib.Path) -> None:
        """Raise ``CheckpointError`` unless ``stored`` has ``abstract``'s tree, shapes and dtypes."""
        stored_leaves = _leaves_by_path(stored)
        target_leaves = _leaves_by_path(abstract)
        missing = [k for k in target_leaves if k not in stored_leaves]
        extra = [k for k in stored_leaves if k not in target_leaves]
        if missing or extra:
            raise CheckpointError(
                f"incompatible checkpoint at {path}: tree structure differs "
                f"(missing from checkpoint: {missing[:5]}, unexpected in checkpoint: {extra[:5]})")
        for k, want in target_leaves.items():
            have = stored_leaves[k]
            have_shape = tuple(getattr(have, "shape", ()) or ())
            if have_shape != tuple(want.shape):
                raise CheckpointError(
                    f"incompatible checkpoint at {path}: {k} has shape "
                    f"{have_shape} in the checkpoint but {tuple(want.shape)} in the model")
            have_dtype = getattr(have, "dtype", None)
            if have_dtype is not None and np.dtype(have_dtype) != np.dtype(want.dtype):
                raise CheckpointError(
                    f"incompatible checkpoint at {path}: {k} has dtype "
                    f"{np.dtype(have_dtype)} in the checkpoint but {np.dtype(want.dtype)} in the model")

    def wait(self) -> None:
        """Block until any in-flight asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
