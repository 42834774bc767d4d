"""Sharded checkpoints: saved under ZeRO-3 on 8 devices, restored onto 1, 2, 4 and 8 devices
and onto other strategies with identical values."""

import _parallel_toy as toy
import jax
import numpy as np
import pytest

from jaxlab.parallel import make_mesh, shard_train_state
from jaxlab.parallel.checkpoint import latest_step, restore_checkpoint, save_checkpoint
from jaxlab.parallel.strategies import ShardedTrainState, abstract_train_state, state_shardings


def _distinct_state():
    """The toy state with every leaf (Adam moments included) filled with distinct values."""
    state = toy.make_state()
    rng = np.random.default_rng(3)
    leaves, treedef = jax.tree.flatten(state)
    leaves = [np.asarray(x) if x.ndim == 0 else rng.normal(size=x.shape).astype(x.dtype)
              for x in leaves]
    return jax.tree.unflatten(treedef, leaves).replace(step=7)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    state = shard_train_state(_distinct_state(), make_mesh(data=8), "zero3")
    assert save_checkpoint(directory, state) == 7
    return directory, state


@pytest.mark.parametrize("devices, strategy", [(1, "ddp"), (2, "zero3"), (4, "zero1"),
                                               (8, "zero2")])
def test_restore_onto_other_meshes_and_strategies(saved, devices, strategy):
    directory, original = saved
    mesh = make_mesh(data=devices)
    target = abstract_train_state(toy.make_state(), mesh, strategy)
    restored = restore_checkpoint(directory, target)
    assert isinstance(restored, ShardedTrainState) and restored.strategy == strategy
    assert latest_step(directory) == 7 and int(restored.step) == 7
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(original),
                                   jax.tree.leaves(state_shardings(restored, mesh, strategy))):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_restore_into_concrete_target_and_later_step(saved, tmp_path):
    _, original = saved
    mesh = make_mesh(data=4)
    save_checkpoint(tmp_path, original, step=3)
    save_checkpoint(tmp_path, original.replace(params=jax.tree.map(lambda p: p * 2, original.params)))
    target = shard_train_state(toy.make_state(), mesh, "zero3")  # arrays also describe a target
    latest = restore_checkpoint(tmp_path, target)
    first = restore_checkpoint(tmp_path, target, step=3)
    np.testing.assert_allclose(np.asarray(latest.params["w1"]), 2 * np.asarray(first.params["w1"]))


def test_restore_errors(saved, tmp_path):
    directory, _ = saved
    mesh = make_mesh(data=2)
    target = abstract_train_state(toy.make_state(), mesh, "zero1")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        restore_checkpoint(tmp_path / "empty", target)
    with pytest.raises(FileNotFoundError, match="step=99"):
        restore_checkpoint(directory, target, step=99)
    with pytest.raises(ValueError, match="abstract_train_state"):
        restore_checkpoint(directory, toy.make_state())
    wrong = toy.make_state()
    wrong = wrong.replace(params={**wrong.params, "w1": np.zeros((3, toy.D_HIDDEN), np.float32)})
    with pytest.raises(ValueError, match=r"leaf \S*w1 has shape \(16, 32\) but the target expects \(3, 32\)"):
        restore_checkpoint(directory, abstract_train_state(wrong, mesh, "ddp"))
