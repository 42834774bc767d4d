"""The uniform replay buffer: circular overwrite, pytree transitions, batched adds from parallel
environments, uniform sampling over filled slots, jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.replay import UniformReplay


def _batch(start, n):
    idx = jnp.arange(start, start + n)
    return {"obs": jnp.stack([idx, -idx], -1).astype(jnp.float32), "action": idx.astype(jnp.int32),
            "extra": {"done": idx % 2 == 0}}


def test_add_sample_wraparound_and_vmap():
    buffer = UniformReplay(capacity=5)
    example = {"obs": jnp.zeros(2), "action": jnp.int32(0), "extra": {"done": jnp.bool_(False)}}
    one = {"obs": jnp.ones(2), "action": jnp.int32(9), "extra": {"done": jnp.bool_(True)}}

    @jax.jit
    def scenario(key):
        s0 = buffer.init(example)
        s1 = buffer.add(s0, _batch(0, 3))  # a batch from 3 parallel environments
        s2 = buffer.add(s1, _batch(3, 3))  # wraps: slot 0 now holds item 5, the oldest (0) is gone
        s3 = buffer.add_one(s2, one)
        return s0, s1, s2, s3, buffer.sample(s3, key, 2000)

    s0, s1, s2, s3, sample = scenario(jax.random.PRNGKey(0))
    assert s0.storage["obs"].shape == (5, 2) and int(s0.size) == 0 and not bool(buffer.can_sample(s0))
    assert int(s1.size) == 3 and int(s1.position) == 3 and bool(buffer.can_sample(s1, 3))
    assert int(s2.size) == 5 and int(s2.position) == 1
    np.testing.assert_array_equal(s2.storage["action"], [5, 1, 2, 3, 4])
    np.testing.assert_array_equal(s2.storage["extra"]["done"], [False, False, True, False, True])
    np.testing.assert_array_equal(s3.storage["action"], [5, 9, 2, 3, 4])
    counts = np.bincount(np.asarray(sample["action"]), minlength=10)
    assert set(np.flatnonzero(counts)) == {2, 3, 4, 5, 9}
    assert counts.max() - counts.min(where=counts > 0, initial=2000) < 150  # uniform over 5 slots
    np.testing.assert_array_equal(sample["obs"][:, 1], np.where(sample["action"] == 9, 1, -sample["action"]))

    # Independent buffers per seed under vmap.
    @jax.jit
    @jax.vmap
    def per_seed(key):
        return buffer.sample(buffer.add(buffer.init(example), _batch(0, 2)), key, 4)

    batches = per_seed(jax.random.split(jax.random.PRNGKey(1), 3))
    assert batches["obs"].shape == (3, 4, 2) and jnp.all(batches["action"] < 2)


def test_partial_fill_samples_only_filled_slots():
    buffer = UniformReplay(capacity=100)

    @jax.jit
    def fill_and_sample(key):
        state = buffer.add(buffer.init({"x": jnp.float32(0)}), {"x": jnp.array([7.0, 8.0])})
        return buffer.sample(state, key, 500)["x"]

    xs = fill_and_sample(jax.random.PRNGKey(3))
    assert set(np.unique(np.asarray(xs))) == {7.0, 8.0}


def test_validation():
    with pytest.raises(ValueError, match="capacity"):
        UniformReplay(capacity=0)
    buffer = UniformReplay(capacity=2)
    state = buffer.init({"x": jnp.zeros(3)})
    with pytest.raises(ValueError, match="exceeds capacity"):
        buffer.add(state, {"x": jnp.zeros((3, 3))})
    with pytest.raises(ValueError, match="does not match"):
        buffer.add(state, {"x": jnp.zeros((1, 4))})
    with pytest.raises(ValueError, match="structure"):
        buffer.add(state, {"y": jnp.zeros((1, 3))})
