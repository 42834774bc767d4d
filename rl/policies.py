"""Action distributions (distrax) built from network outputs, and action scaling.

* ``categorical(logits [B, A])`` for discrete actions; ``categorical_sample_and_log_prob(logits, gumbel)`` is its
  ``sample_and_log_prob`` from Gumbel noise drawn beforehand (``categorical_gumbel``, for many keys in one
  call), the same numbers as ``categorical_sample_and_log_prob_reference`` (distrax) with the same key;
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

__all__ = ["categorical", "categorical_gumbel", "categorical_sample_and_log_prob",
           "categorical_sample_and_log_prob_reference", "diag_gaussian", "scale_action", "tanh_gaussian",
           "tanh_gaussian_log_prob_reference", "unscale_action"]


def categorical(logits: jax.Array) -> distrax.Categorical:
    """``pi(a|s) = softmax(logits)_a``; ``logits [B, A]``."""
    return distrax.Categorical(logits=logits)


def categorical_gumbel(keys: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """The Gumbel noise ``[N, B, A]`` that ``categorical(logits [B, A]).sample(seed=keys[i])`` draws for logits of
    ``dtype``, for ``N`` keys in one PRNG call (distrax samples ``jax.random.categorical(key, logits, shape=(1, B))``,
    which adds ``gumbel(key, (1, B, A))`` to the logits; the Gumbel-max trick)."""
    return jax.vmap(lambda k: jax.random.gumbel(k, (1, *shape), dtype)[0])(keys)


def categorical_sample_and_log_prob(logits: jax.Array, gumbel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a = argmax(log_softmax(logits) + g)`` and ``log pi(a|s)`` for ``logits [B, A]`` and Gumbel noise ``g [B, A]``
    (a row of ``categorical_gumbel``); equal to ``categorical(logits).sample_and_log_prob`` with that key.

    As distrax, a row whose probabilities are not finite (a NaN or +inf logit, or every logit -inf) gives action
    -1 with log-probability -inf: ``max_a log_softmax`` is finite exactly when ``softmax`` is finite and >= 0."""
    if gumbel.shape != logits.shape:
        raise ValueError(f"gumbel noise of shape {gumbel.shape} must match logits of shape {logits.shape}")
    log_pi = jax.nn.log_softmax(logits, axis=-1)  # [B, A], distrax's normalised logits
    valid = jnp.isfinite(jnp.max(log_pi, axis=-1))  # [B]
    draws = jnp.argmax(gumbel + log_pi, axis=-1).astype(int)  # [B]
    action = jnp.where(valid, draws, -1)
    log_prob = jnp.take_along_axis(log_pi, jnp.maximum(action, 0)[:, None], axis=-1)[:, 0]
    return action, jnp.where(valid, log_prob, -jnp.inf)


def categorical_sample_and_log_prob_reference(logits: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``categorical_sample_and_log_prob`` through distrax with the key the noise came from (a test oracle)."""
    return categorical(logits).sample_and_log_prob(seed=key)


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
