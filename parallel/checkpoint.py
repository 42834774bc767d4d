"""Sharded orbax checkpoints that restore onto any mesh and strategy.

Every device (every process, in a multi-process run) writes only the shards it owns; a
restore reads, for each target device, the slices its target sharding asks for. So a state
saved under ZeRO-3 on 8 devices comes back on 1, 2 or 4 devices, or laid out by another
strategy, with identical values:

    save_checkpoint(ckpt_dir, state)                                   # step = state.step
    target = abstract_train_state(fresh_state, make_mesh(data=2), "zero1")
    state = restore_checkpoint(ckpt_dir, target)                       # latest step

``target`` describes the result: a ``ShardedTrainState`` whose leaves are arrays or
``jax.ShapeDtypeStruct``s carrying the wanted shardings (``abstract_train_state`` builds one
without allocating). Only the arrays (``step``, ``params``, ``opt_state`` and the base ``key`` of
the spine's ``TrainState``) are stored; the optimizer ``tx`` and ``apply_fn`` come from the target,
so a restored state trains on with ``make_train_step(loss_fn, target.tx, mesh=..., strategy=...)``.

Saving is synchronous here (orbax's ``CheckpointManager`` saves asynchronously by default;
this module waits for completion so a checkpoint is complete when the call returns).
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlab.parallel.strategies import ShardedTrainState, is_sharded_state

__all__ = ["latest_step", "restore_checkpoint", "save_checkpoint"]


@contextlib.contextmanager
def _manager(directory: str | pathlib.Path, max_to_keep: int | None = None
             ) -> Iterator[ocp.CheckpointManager]:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    # The handler is named on both sides: without it a restoring manager cannot read the
    # saved item's metadata.
    manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                    item_handlers=ocp.StandardCheckpointHandler())
    try:
        yield manager
    finally:
        manager.close()


def _step_of(state: Any) -> int:
    return int(np.asarray(jax.device_get(state.step)))


def save_checkpoint(directory: str | pathlib.Path, state: ShardedTrainState,
                    step: int | None = None, *, max_to_keep: int | None = None) -> int:
    """Write ``state``'s arrays under ``directory/<step>``; returns the step written.

    Every process of a multi-process run must call this with its part of the same global
    state; ``step`` defaults to ``state.step``.
    """
    step = _step_of(state) if step is None else int(step)
    if step < 0:
        raise ValueError(f"step={step} must be non-negative")
    with _manager(directory, max_to_keep) as manager:
        manager.save(step, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    return step


def latest_step(directory: str | pathlib.Path) -> int | None:
    """The newest step saved under ``directory`` (``None`` when there is none)."""
    if not pathlib.Path(directory).exists():
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        if leaf.sharding is None:
            raise ValueError(f"target leaf {leaf} has no sharding; build the target with "
                             "abstract_train_state(state, mesh, strategy)")
        return leaf
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)


def restore_checkpoint(directory: str | pathlib.Path, target: ShardedTrainState,
                       step: int | None = None) -> ShardedTrainState:
    """Read the checkpoint at ``step`` (default: latest) laid out like ``target``.

    Raises:
      FileNotFoundError: no checkpoint under ``directory`` (or not that step).
      ValueError: ``target`` lacks shardings, or its shapes differ from the saved ones.
    """
    if not is_sharded_state(target):
        raise ValueError(f"target is a {type(target).__name__}; build it with "
                         "abstract_train_state(state, mesh, strategy)")
    abstract = jax.tree.map(_abstract, target)
    with _manager(directory) as manager:
        steps = manager.all_steps()
        if step is None:
            step = max(steps) if steps else None
        if step is None or step not in steps:
            raise FileNotFoundError(f"no checkpoint for step={step} under {directory} "
                                    f"(saved steps: {sorted(steps)})")
        _check_shapes(manager.item_metadata(step), abstract)
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _names(path: tuple) -> tuple[str, ...]:
    """A key path as plain names: ``.opt_state[0].mu['w']`` and ``['opt_state'][0]['mu']['w']`` agree."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _check_shapes(saved: Any, abstract: Any) -> None:
    """Name the first leaf whose saved shape differs from the target's (before reading anything)."""
    want = {_names(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    for path, meta in jax.tree_util.tree_flatten_with_path(saved)[0]:
        shape, name = getattr(meta, "shape", None), _names(path)
        if shape is not None and name in want and tuple(shape) != tuple(want[name]):
            raise ValueError(f"checkpoint leaf {'/'.join(name)} has shape {tuple(shape)} but the "
                             f"target expects {tuple(want[name])}")

