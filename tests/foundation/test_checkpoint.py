"""Checkpointer: keep-K, interval, restore, and clear errors for corrupt or incompatible checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.checkpoint import CheckpointError, Checkpointer
from jaxlab.loop import ArrayIterator, KeyedBatches
from jaxlab.train_state import create_train_state, make_train_step, step_key


def _state(width=3):
    params = {"w": jnp.arange(width * 2, dtype=jnp.float32).reshape(width, 2), "b": jnp.zeros(2)}
    return create_train_state(params, optax.adam(1e-2), jax.random.PRNGKey(7))


def test_interval_keep_and_roundtrip(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        started = [ckpt.save(s, state.replace(step=jnp.int32(s)), {"epoch": 0, "index": s}) for s in range(1, 8)]
        ckpt.wait()
        assert started == [False, True, False, True, False, True, False]
        assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
        assert ckpt.save(7, state, {}, force=True)
        ckpt.wait()
        restored, data_state = ckpt.restore(_state())
    assert data_state == {}
    assert int(restored.step) == 0  # the forced save at 7 stored `state` itself, step 0
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
    np.testing.assert_array_equal(restored.key, state.key)
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        restored, data_state = ckpt.restore(_state(), step=6)
    assert int(restored.step) == 6 and data_state == {"epoch": 0, "index": 6}


def test_incompatible_checkpoint_names_path_and_leaf(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, _state(width=3), {})
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(CheckpointError, match=r"incompatible checkpoint at .*1: params/w has shape \(3, 2\) .* but \(5, 2\)"):
            ckpt.restore(_state(width=5))
        other = create_train_state({"w": jnp.zeros((3, 2))}, optax.sgd(0.1), jax.random.PRNGKey(0))
        with pytest.raises(CheckpointError, match="tree structure differs"):
            ckpt.restore(other)
        with pytest.raises(CheckpointError, match="no checkpoint for step 9"):
            ckpt.restore(_state(), step=9)


def test_corrupt_checkpoint_names_path(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, _state(), {"epoch": 0, "index": 0})
    state_dir = tmp_path / "1" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(CheckpointError, match=f"corrupt checkpoint at {tmp_path / '1'}"):
            ckpt.restore(_state())


def test_empty_directory_and_bad_options(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(CheckpointError, match="no checkpoint to restore"):
            ckpt.restore(_state())
    with pytest.raises(ValueError, match="save_every=0"):
        Checkpointer(tmp_path, save_every=0)


def test_step_key_depends_only_on_base_key_and_step():
    state = _state()
    assert not np.array_equal(step_key(state), step_key(state.replace(step=state.step + 1)))
    np.testing.assert_array_equal(step_key(state.replace(step=5)), jax.random.fold_in(state.key, 5))
    with pytest.raises(ValueError, match="PRNGKey"):
        create_train_state({}, optax.sgd(0.1), jax.random.key(0))


def test_train_step_metrics_and_update():
    state = _state()
    step = make_train_step(lambda p, batch, key: (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"]), {"w0": p["w"][0, 0]}),
                           state.tx)
    new_state, metrics = jax.jit(step)(state, None, step_key(state))
    assert int(new_state.step) == 1
    assert set(metrics) == {"loss", "grad_norm", "nonfinite", "w0"}
    assert float(metrics["loss"]) == pytest.approx(float(jnp.sum(state.params["w"] ** 2)))
    assert int(metrics["nonfinite"]) == 0
    assert not np.allclose(new_state.params["w"], state.params["w"])


def test_array_iterator_state_roundtrip():
    x = np.arange(10)
    a = ArrayIterator(x, batch_size=3, seed=5)
    seen = [next(a) for _ in range(4)]          # crosses into epoch 1 (3 batches per epoch)
    assert a.get_state() == {"epoch": 1, "index": 3}
    assert len(set(np.concatenate(seen[:3]).tolist())) == 9                   # no repeats in an epoch
    b = ArrayIterator(x, batch_size=3, seed=5)
    b.set_state(a.get_state())
    for _ in range(5):
        np.testing.assert_array_equal(next(a), next(b))
    with pytest.raises(ValueError, match="batch_size=11"):
        ArrayIterator(x, batch_size=11)
    with pytest.raises(ValueError, match="same leading size"):
        ArrayIterator((x, np.arange(4)), batch_size=2)


def test_keyed_batches_draw_batch_i_from_fold_in_key_i_and_resume():
    key = jax.random.PRNGKey(5)
    data = KeyedBatches(key)
    keys = [data.next_key() for _ in range(3)]
    for i, k in enumerate(keys):
        np.testing.assert_array_equal(k, jax.random.fold_in(key, i))
    assert data.get_state() == {"index": 3}
    again = KeyedBatches(key)
    again.set_state({"index": 1})
    np.testing.assert_array_equal(again.next_key(), keys[1])
