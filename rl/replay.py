"""A jittable uniform experience-replay buffer for arbitrary pytree transitions.

The buffer is a fixed-capacity circular array per leaf: ``storage`` mirrors the transition pytree with
a leading ``[capacity]`` axis, ``position`` is the next slot to write and ``size`` the number of filled
slots. Adding a batch of ``B`` transitions (e.g. one step of ``B`` parallel environments) writes slots
``position, ..., position + B - 1`` modulo ``capacity``, overwriting the oldest data once full;
sampling draws indices uniformly from the filled slots, with replacement. Everything is a pure function
of explicit state and a key, so it lives inside ``jit``/``scan`` training loops and vmaps over seeds.

    buffer = UniformReplay(capacity=10_000)
    state = buffer.init({"obs": jnp.zeros(4), "action": jnp.int32(0), "reward": 0.0})
    state = buffer.add(state, batch)                  # every leaf [B, ...]
    minibatch = buffer.sample(state, key, batch_size=64)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["ReplayState", "UniformReplay"]


@struct.dataclass
class ReplayState:
    """Buffer contents: ``storage`` (leaves ``[capacity, ...]``), next write slot, filled slots."""

    storage: Any
    position: jax.Array
    size: jax.Array


@dataclasses.dataclass(frozen=True)
class UniformReplay:
    """Uniform replay of fixed ``capacity`` (static; hashable, so usable as a static jit argument)."""

    capacity: int

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError(f"capacity={self.capacity} must be >= 1")

    def init(self, example: Any) -> ReplayState:
        """Empty buffer shaped after ``example``, one transition without a batch axis."""
        storage = jax.tree.map(
            lambda x: jnp.zeros((self.capacity, *jnp.shape(x)), jnp.asarray(x).dtype), example)
        return ReplayState(storage, jnp.asarray(0, jnp.int32), jnp.asarray(0, jnp.int32))

    def add(self, state: ReplayState, batch: Any) -> ReplayState:
        """Write a batch of transitions (every leaf ``[B, ...]``, ``B <= capacity``), oldest first out."""
        leaves = jax.tree.leaves(batch)
        stored = jax.tree.leaves(state.storage)
        if jax.tree.structure(batch) != jax.tree.structure(state.storage):
            raise ValueError(f"batch structure {jax.tree.structure(batch)} differs from the buffer's "
                             f"{jax.tree.structure(state.storage)}")
        sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"every batch leaf needs the same leading batch axis, got leading sizes {sizes}")
        (B,) = sizes
        if B > self.capacity:
            raise ValueError(f"batch size B={B} exceeds capacity={self.capacity}")
        for x, s in zip(leaves, stored):
            if jnp.shape(x)[1:] != s.shape[1:]:
                raise ValueError(f"batch leaf shape {jnp.shape(x)} does not match stored [B, *{s.shape[1:]}]")
        slots = (state.position + jnp.arange(B)) % self.capacity  # [B]
        storage = jax.tree.map(lambda s, x: s.at[slots].set(jnp.asarray(x, s.dtype)), state.storage, batch)
        return ReplayState(storage, (state.position + B) % self.capacity,
                           jnp.minimum(state.size + B, self.capacity))

    def add_one(self, state: ReplayState, transition: Any) -> ReplayState:
        """Write a single transition (no batch axis)."""
        return self.add(state, jax.tree.map(lambda x: jnp.asarray(x)[None], transition))

    def sample(self, state: ReplayState, key: jax.Array, batch_size: int) -> Any:
        """``batch_size`` transitions drawn uniformly (with replacement) from the filled slots; leaves
        ``[batch_size, ...]``. An empty buffer yields its zero-initialised slot 0: check
        :meth:`can_sample` first."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(state.size, 1))  # [batch_size]
        return jax.tree.map(lambda s: s[idx], state.storage)

    def can_sample(self, state: ReplayState, batch_size: int = 1) -> jax.Array:
        """Whether at least ``batch_size`` transitions are stored."""
        return state.size >= batch_size
