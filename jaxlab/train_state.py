"""The training spine's state and step: one ``TrainState``, one ``make_train_step``.

Every jaxlab trainer has the shape

    state = create_train_state(params, optimizer, key)               # step 0, base key
    train_step = jax.jit(make_train_step(loss_fn, optimizer), donate_argnums=0)
    state, metrics = train_step(state, batch, step_key(state))        # key = fold_in(state.key, state.step)

with ``loss_fn(params, batch, key) -> (loss, metrics)``. The randomness of step ``t`` is a function of the
stored base key and ``t`` only, so a run resumed from a checkpoint draws exactly the numbers an
uninterrupted run would. The step

* splits the batch into ``grad_accum`` microbatches (leading axis) and sums their gradients in a
  ``lax.scan`` (microbatch ``i`` draws ``fold_in(key, i)``), so a batch larger than memory trains as one;
* never applies a non-finite update: when the loss or the gradient norm is NaN/inf, parameters and
  optimizer state stay as they were (the step counter still advances) and ``metrics["nonfinite"]`` is 1.
  :func:`jaxlab.loop.fit` then stops the run with an error naming the step, or counts the skip;
* with ``mesh=`` runs sharded under a strategy (``ddp``, ``zero1``, ``zero2``, ``zero3``; see
  :mod:`jaxlab.parallel`), compiled as one SPMD program with the strategy's shardings.

``metrics`` always holds ``loss`` (the microbatch mean), ``grad_norm`` (global L2 norm of the gradient
before the optimizer) and ``nonfinite``, plus the loss function's own metrics (microbatch means).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

__all__ = ["LOSS_WEIGHT", "LossFn", "TrainState", "apply_update", "check_step_arguments", "create_train_state", "jit_train_step",
           "loss_and_grads", "make_train_step", "step_key"]

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
"""``loss_fn(params, batch, key) -> (scalar loss, {name: scalar metric})``."""


class TrainState(train_state.TrainState):
    """Parameters, optimizer state, step counter and the run's base PRNG key.

    (A flax ``TrainState``, whose static ``tx`` is the optimizer the state was created for, plus
    ``key``: the base key, raw ``uint32[2]`` so it checkpoints as plain data. Per-step keys come
    from :func:`step_key`.)
    """

    key: jax.Array = struct.field(pytree_node=True, default=None)


def create_train_state(params: Any, optimizer: optax.GradientTransformation, key: jax.Array,
                       apply_fn: Callable | None = None) -> TrainState:
    """A fresh state at step 0; ``key`` becomes the base key of the run."""
    if key is None or jnp.shape(key) != (2,) or jnp.asarray(key).dtype != jnp.uint32:
        raise ValueError(f"key must be a raw jax.random.PRNGKey (uint32[2]), got {key!r}")
    state = TrainState.create(apply_fn=apply_fn, params=params, tx=optimizer, key=key)
    return state.replace(step=jnp.zeros((), jnp.int32))  # the dtype a jitted step returns


LOSS_WEIGHT = "loss_weight"
"""Metric a loss may report: the number of terms its mean is over; gradient accumulation weighs
microbatches by it (see :func:`loss_and_grads`)."""


def step_key(state: Any) -> jax.Array:
    """The PRNG key of the step about to run: ``fold_in(state.key, state.step)``."""
    return jax.random.fold_in(state.key, state.step)


def _split_microbatches(batch: Any, grad_accum: int) -> Any:
    """``[B, ...] -> [grad_accum, B / grad_accum, ...]`` for every leaf (B must divide evenly)."""

    def split(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % grad_accum:
            raise ValueError(f"grad_accum={grad_accum} must divide the batch's leading axis; got a leaf of "
                             f"shape {x.shape}")
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])  # [K, B/K, ...]

    return jax.tree.map(split, batch)


def _loss_with_metrics(loss_fn: LossFn):
    def f(params, batch, key):
        out = loss_fn(params, batch, key)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise TypeError("loss_fn must return (loss, metrics) with metrics a dict of scalars; got "
                            f"{type(out).__name__}")
        loss, metrics = out
        if jnp.ndim(loss) != 0:
            raise ValueError(f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}")
        return loss, metrics

    return f


def loss_and_grads(loss_fn: LossFn, params: Any, batch: Any, key: jax.Array,
                   grad_accum: int = 1) -> tuple[jax.Array, dict, Any]:
    """``(loss, metrics, grads)`` of ``loss_fn`` at ``params``, accumulated over ``grad_accum`` microbatches.

    With ``grad_accum=K`` the batch's leading axis is cut into K equal microbatches, run one after
    another in a ``lax.scan`` (activation memory of one microbatch). The loss, metrics and gradients
    are the microbatches' means, weighted by ``metrics[LOSS_WEIGHT]`` when the loss reports it (the
    number of terms its mean is over, e.g. the LM's unmasked targets): then a loss that is a mean over
    tokens gets exactly the whole batch's gradient even when microbatches hold different numbers of
    tokens (packed rows); without it, microbatches weigh equally, exact for a mean over equal-sized
    rows. The returned ``metrics[LOSS_WEIGHT]`` is the total weight.
    """
    grad_fn = jax.value_and_grad(_loss_with_metrics(loss_fn), has_aux=True)
    if grad_accum == 1:
        (loss, metrics), grads = grad_fn(params, batch, key)
        return loss, metrics, grads
    micro = _split_microbatches(batch, grad_accum)

    def body(carry, inputs):
        i, mb = inputs
        (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(key, i))
        weight = jnp.asarray(metrics.get(LOSS_WEIGHT, 1.0), jnp.float32)
        weighted = jax.tree.map(lambda x: x * weight.astype(x.dtype), (loss, metrics, grads))
        return jax.tree.map(jnp.add, carry, (*weighted, weight)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, params, first, key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         (shapes[0][0], shapes[0][1], shapes[1], jax.ShapeDtypeStruct((), jnp.float32)))
    (loss, metrics, grads, total), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
    total_safe = jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
    loss, metrics, grads = jax.tree.map(lambda x: x / total_safe.astype(x.dtype), (loss, metrics, grads))
    if LOSS_WEIGHT in metrics:
        metrics = {**metrics, LOSS_WEIGHT: total}
    return loss, metrics, grads


def apply_update(state: TrainState, grads: Any, optimizer: optax.GradientTransformation,
                 loss: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step, skipped (parameters and optimizer state kept) when ``loss`` or the
    gradient norm is not finite. Returns the new state and ``{grad_norm, nonfinite}``."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    state = state.replace(step=state.step + 1, params=jax.tree.map(keep, params, state.params),
                          opt_state=jax.tree.map(keep, opt_state, state.opt_state))
    return state, {"grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.int32)}


def check_step_arguments(loss_fn: Any, optimizer: Any, grad_accum: Any) -> None:
    """``ValueError`` naming the argument unless ``loss_fn`` is callable, ``optimizer`` an optax
    transformation and ``grad_accum`` an int >= 1 (shared by the one-device and the sharded step)."""
    if not callable(loss_fn):
        raise ValueError(f"loss_fn={loss_fn!r} must be callable as loss_fn(params, batch, key)")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(f"optimizer={optimizer!r} must be an optax GradientTransformation")
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum!r} must be an int >= 1")


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, mesh: Any = None,
                    strategy: Any = None, grad_accum: int = 1, **sharded_options) -> Callable:
    """Build ``train_step(state, batch, key) -> (state, metrics)`` from a loss and an optimizer.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (loss, metrics)``: a scalar mean loss over the rows of
        ``batch`` and a dict of scalar metrics.
      optimizer: the ``optax`` transformation (see :func:`jaxlab.optim.make_optimizer`); the state's
        ``opt_state`` must come from it (``create_train_state(params, optimizer, key)``).
      mesh: a ``jax.sharding.Mesh`` with a ``data`` axis: the step runs sharded (the state must first be
        laid out with ``jaxlab.parallel.shard_train_state(state, mesh, strategy)``). None: one device,
        and the step is a plain function for the caller to ``jax.jit`` (with ``donate_argnums=0``).
      strategy: ``ddp`` | ``zero1`` | ``zero2`` | ``zero3`` over the mesh's ``data`` axis (default ddp;
        only with ``mesh``).
      grad_accum: microbatches per step (the batch's leading axis must divide evenly).
      sharded_options: further options of the sharded step (``impl``, ``regather``, ``allreduce``,
        ``donate``; see :func:`jaxlab.parallel.train_step.sharded_train_step`).
    """
    check_step_arguments(loss_fn, optimizer, grad_accum)
    if mesh is not None:
        from jaxlab.parallel.train_step import sharded_train_step  # the glue imports parallel lazily

        return sharded_train_step(loss_fn, optimizer, mesh, strategy or "ddp", grad_accum=grad_accum,
                                  **sharded_options)
    if strategy is not None or sharded_options:
        raise ValueError(f"strategy={strategy!r} and {sorted(sharded_options)} need a mesh (mesh=None)")

    def train_step(state: TrainState, batch: Any, key: jax.Array):
        loss, aux, grads = loss_and_grads(loss_fn, state.params, batch, key, grad_accum)
        state, metrics = apply_update(state, grads, optimizer, loss)
        return state, {"loss": loss, **metrics, **aux}

    return train_step


def jit_train_step(train_step: Callable) -> Callable:
    """``jax.jit`` with the state donated: its buffers are reused for the new state."""
    return jax.jit(train_step, donate_argnums=0)
