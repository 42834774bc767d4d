"""Losses and bootstrap targets shared by the deep RL algorithms.

All are means over a batch axis ``[B]`` (or ``[B, A]`` for action values) and differentiate only
through what a learner updates: advantages, returns and targets are wrapped in ``stop_gradient``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "huber",
    "normalize_advantages",
    "policy_gradient_loss",
    "ppo_clip_loss",
    "q_learning_target",
    "value_loss",
]

sg = jax.lax.stop_gradient


def normalize_advantages(advantages: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Zero mean, unit standard deviation over the batch (a per-minibatch variance reduction)."""
    return (advantages - advantages.mean()) / (advantages.std() + eps)


def policy_gradient_loss(log_prob: jax.Array, advantages: jax.Array) -> jax.Array:
    """REINFORCE/A2C surrogate ``-E[log pi(a|s) A]`` (Williams 1992); its gradient is the policy gradient."""
    return -jnp.mean(log_prob * sg(advantages))


def ppo_clip_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
                  clip_eps: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated for minimisation.

    ``L = -E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)]`` with ``rho = pi(a|s) / pi_old(a|s)``.
    Also returns the fraction of clipped ratios, the ``k3`` estimate of ``KL(pi_old || pi)``,
    ``E[(rho - 1) - log rho]`` (Schulman 2020, "Approximating KL divergence"), and the mean ratio.
    """
    log_ratio = log_prob - sg(old_log_prob)
    ratio = jnp.exp(log_ratio)
    advantages = sg(advantages)
    surrogate = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages)
    stats = {"clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)),
             "approx_kl": sg(jnp.mean((ratio - 1.0) - log_ratio)), "ratio": sg(jnp.mean(ratio))}
    return -jnp.mean(surrogate), stats


def value_loss(values: jax.Array, targets: jax.Array, old_values: jax.Array | None = None,
               clip_eps: float | None = None) -> jax.Array:
    """``0.5 E[(V - target)^2]``; with ``old_values`` and ``clip_eps``, PPO's pessimistic clipped form
    ``0.5 E[max((V - t)^2, (V_old + clip(V - V_old, -eps, eps) - t)^2)]`` (as in OpenAI baselines)."""
    targets = sg(targets)
    err = (values - targets) ** 2
    if clip_eps is not None and old_values is not None:
        old_values = sg(old_values)
        clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        err = jnp.maximum(err, (clipped - targets) ** 2)
    return 0.5 * jnp.mean(err)


def huber(x: jax.Array, delta: float = 1.0) -> jax.Array:
    """Elementwise Huber loss: ``x^2 / 2`` for ``|x| <= delta``, ``delta (|x| - delta / 2)`` beyond."""
    abs_x = jnp.abs(x)
    return jnp.where(abs_x <= delta, 0.5 * x**2, delta * (abs_x - 0.5 * delta))


def q_learning_target(reward: jax.Array, terminated: jax.Array, gamma: float, next_q_target: jax.Array,
                      next_q_online: jax.Array | None = None) -> jax.Array:
    """``y = r + gamma (1 - terminated) Q'(s', a*)``, ``[B]``, from ``next_q_* [B, A]``.

    Without ``next_q_online``: ``a* = argmax_a Q'(s', a)`` (DQN, Mnih et al. 2015). With it: Double DQN
    (van Hasselt et al. 2016, eq. 4), ``a* = argmax_a Q(s', a)`` chosen by the online network and
    evaluated by the target network. Truncated transitions bootstrap (pass ``terminated``, not ``done``).
    """
    chooser = next_q_target if next_q_online is None else next_q_online
    best = jnp.argmax(chooser, axis=-1)
    next_value = jnp.take_along_axis(next_q_target, best[:, None], axis=-1)[:, 0]
    return sg(reward + gamma * (1.0 - terminated.astype(reward.dtype)) * next_value)
