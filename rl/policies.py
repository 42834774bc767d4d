"""Action distributions (distrax) built from network outputs, and action scaling.

* ``categorical(logits [B, A])`` for discrete actions;
* ``diag_gaussian(mean, log_std)`` (``[B, A]`` each) for PPO/TRPO on continuous actions: actions are
  unbounded and clipped into the box by the rollout, the log-probability is of the unclipped action;
* ``tanh_gaussian(mean, log_std, low, high)`` for SAC: ``a = low + (high - low) (tanh(u) + 1) / 2``
  with ``u ~ N(mean, std^2)``, whose density carries the change-of-variables term of Haarnoja et al.
  2018, eq. 21: ``log pi(a|s) = log N(u) - sum_i log(1 - tanh(u_i)^2) - sum_i log((high - low)_i / 2)``.
  Use ``sample_and_log_prob``: it computes the term from ``u``, never ``atanh(a)``, so it stays finite
  when ``tanh`` saturates. ``tanh_gaussian_log_prob_reference`` is that formula written out.
"""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp

__all__ = ["categorical", "diag_gaussian", "scale_action", "tanh_gaussian", "tanh_gaussian_log_prob_reference",
           "unscale_action"]


def categorical(logits: jax.Array) -> distrax.Categorical:
    """``pi(a|s) = softmax(logits)_a``; ``logits [B, A]``."""
    return distrax.Categorical(logits=logits)


def diag_gaussian(mean: jax.Array, log_std: jax.Array) -> distrax.MultivariateNormalDiag:
    """``N(mean, diag(exp(log_std)^2))`` over the last axis; ``mean, log_std [B, A]``."""
    return distrax.MultivariateNormalDiag(mean, jnp.exp(log_std))


def _affine_from_unit(low: jax.Array, high: jax.Array) -> distrax.ScalarAffine:
    return distrax.ScalarAffine(shift=(high + low) / 2.0, scale=(high - low) / 2.0)


def tanh_gaussian(mean: jax.Array, log_std: jax.Array, low: jax.Array | float = -1.0,
                  high: jax.Array | float = 1.0) -> distrax.Transformed:
    """A Gaussian squashed by ``tanh`` and mapped onto ``[low, high]`` (broadcast to ``[A]``)."""
    low = jnp.broadcast_to(jnp.asarray(low, mean.dtype), mean.shape[-1:])
    high = jnp.broadcast_to(jnp.asarray(high, mean.dtype), mean.shape[-1:])
    # Chain applies right to left: a = affine(tanh(u)).
    bijector = distrax.Block(distrax.Chain([_affine_from_unit(low, high), distrax.Tanh()]), ndims=1)
    return distrax.Transformed(diag_gaussian(mean, log_std), bijector)


def tanh_gaussian_log_prob_reference(u: jax.Array, mean: jax.Array, log_std: jax.Array, low, high) -> jax.Array:
    """``log pi(a|s)`` of ``a = scale(tanh(u))`` by Haarnoja et al. 2018, eq. 21 (plain jnp). ``[B, A] -> [B]``."""
    std = jnp.exp(log_std)
    log_normal = -0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    log_det = jnp.log(1.0 - jnp.tanh(u) ** 2) + jnp.log((jnp.asarray(high) - jnp.asarray(low)) / 2.0)
    return jnp.sum(log_normal - log_det, axis=-1)


def scale_action(unit: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    """Map ``[-1, 1]`` onto ``[low, high]``."""
    return low + (high - low) * (unit + 1.0) / 2.0


def unscale_action(action: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    """Map ``[low, high]`` onto ``[-1, 1]`` (inverse of ``scale_action``)."""
    return 2.0 * (action - low) / (high - low) - 1.0
