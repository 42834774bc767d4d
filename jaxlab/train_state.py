"""The train-state convention: a flax ``TrainState`` that also carries the base PRNG key.

Every jaxlab training loop has the shape

    train_step(state, batch, key) -> (state, metrics)        # pure; jitted with donation

where ``key = jax.random.fold_in(state.key, state.step)``: the randomness of step ``t`` is a
function of the stored base key and ``t`` only, so a run resumed from a checkpoint draws
exactly the numbers an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

__all__ = ["TrainState", "create_train_state", "jit_train_step", "make_train_step", "step_key"]


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` (step, apply_fn, params, tx, opt_state) plus ``key``.

    ``key`` is the run's base PRNG key (raw ``uint32[2]``, checkpointable); per-step keys are
    derived from it with ``step_key``.
    """

    key: jax.Array = struct.field(pytree_node=True, default=None)


def create_train_state(params: Any, tx: optax.GradientTransformation, key: jax.Array,
                       apply_fn: Callable | None = None) -> TrainState:
    """A fresh ``TrainState`` at step 0; ``key`` becomes the base key of the run."""
    if key is None or jnp.shape(key) != (2,) or jnp.asarray(key).dtype != jnp.uint32:
        raise ValueError(f"key must be a raw jax.random.PRNGKey (uint32[2]), got {key!r}")
    state = TrainState.create(apply_fn=apply_fn, params=params, tx=tx, key=key)
    return state.replace(step=jnp.zeros((), jnp.int32))  # the dtype a jitted step returns


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the step about to run: ``fold_in(state.key, state.step)``."""
    return jax.random.fold_in(state.key, state.step)


def make_train_step(loss_fn: Callable[..., Any], *, has_aux: bool = False) -> Callable:
    """Build ``train_step(state, batch, key) -> (state, metrics)`` from a loss.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> loss`` or ``-> (loss, aux)`` with
        ``has_aux``; ``aux`` must be a dict of scalars and is merged into the metrics.

    The metrics always hold ``loss`` and ``grad_norm`` (global L2 norm before the optimizer).
    """

    def train_step(state: TrainState, batch: Any, key: jax.Array):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)
        out, grads = grad_fn(state.params, batch, key)
        loss, aux = out if has_aux else (out, {})
        state = state.apply_gradients(grads=grads)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return state, metrics

    return train_step


def jit_train_step(train_step: Callable) -> Callable:
    """``jax.jit`` with the state donated: its buffers are reused for the new state."""
    return jax.jit(train_step, donate_argnums=0)
