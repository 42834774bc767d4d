"""Advantage and return estimators over rollouts, with correct time-limit handling.

All functions take time-major arrays ``[T, ...]`` (any trailing batch axes, e.g. ``[T, E]``) of a
``Transition``'s fields and the critic's values of both ends of every transition:

* ``values[t] = V(s_t)`` of ``obs[t]``;
* ``next_values[t] = V(s'_t)`` of ``next_obs[t]`` (the pre-reset observation), used where the
  trajectory is cut: at truncation (``truncated[t]``) and at the rollout's end ``t = T - 1``;
* ``terminated[t]`` zeroes the bootstrap, ``done[t] = terminated[t] | truncated[t]`` cuts the sum.

So a time limit is bootstrapped with the value of the true last state, a terminal state is not, and
neither leaks into the next episode (Pardo et al. 2018, "Time Limits in Reinforcement Learning").
Each fast form has a ``*_reference`` written as a plain Python loop over time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["gae", "gae_reference", "n_step_returns", "n_step_returns_reference"]


def _check(gamma: float, **arrays) -> None:
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"{gamma=} must be in [0, 1]")
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if len(set(shapes.values())) != 1 or not next(iter(shapes.values())):
        raise ValueError(f"arrays must share one time-major shape [T, ...], got {shapes}")


def gae(rewards: jax.Array, values: jax.Array, next_values: jax.Array, terminated: jax.Array,
        truncated: jax.Array, gamma: float, gae_lambda: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), cut at episode ends.

    ``delta_t = r_t + gamma (1 - terminated_t) V(s'_t) - V(s_t)`` and
    ``A_t = delta_t + gamma lambda (1 - done_t) A_{t+1}`` with ``A_T = 0``.

    All inputs ``[T, ...]``; returns ``(advantages, targets = advantages + values)``, each ``[T, ...]``.
    ``gae_lambda = 1`` gives Monte-Carlo returns (bootstrapped only where the trajectory is cut),
    ``gae_lambda = 0`` one-step TD targets.
    """
    _check(gamma, rewards=rewards, values=values, next_values=next_values, terminated=terminated,
           truncated=truncated)
    if not 0.0 <= float(gae_lambda) <= 1.0:
        raise ValueError(f"{gae_lambda=} must be in [0, 1]")
    not_terminal = 1.0 - terminated.astype(rewards.dtype)
    not_done = 1.0 - jnp.logical_or(terminated, truncated).astype(rewards.dtype)
    deltas = rewards + gamma * not_terminal * next_values - values  # [T, ...]

    def backward(advantage, xs):
        delta, keep = xs
        advantage = delta + gamma * gae_lambda * keep * advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(deltas[0]), (deltas, not_done), reverse=True)
    return advantages, advantages + values


def gae_reference(rewards, values, next_values, terminated, truncated, gamma, gae_lambda):
    """``gae`` as a Python loop in float64 numpy (a test oracle)."""
    r, v, nv = (np.asarray(x, np.float64) for x in (rewards, values, next_values))
    term, trunc = np.asarray(terminated, bool), np.asarray(truncated, bool)
    adv = np.zeros_like(r)
    following = np.zeros_like(r[0])
    for t in reversed(range(r.shape[0])):
        delta = r[t] + gamma * (~term[t]) * nv[t] - v[t]
        following = delta + gamma * gae_lambda * (~(term[t] | trunc[t])) * following
        adv[t] = following
    return adv, adv + v


def n_step_returns(rewards: jax.Array, next_values: jax.Array, terminated: jax.Array, truncated: jax.Array,
                   gamma: float, n: int) -> jax.Array:
    """``n``-step returns, truncated at the episode's end and at the rollout's end.

    ``G_t = sum_{k<m} gamma^k r_{t+k} + gamma^m (1 - terminated_{t+m-1}) V(s'_{t+m-1})`` where ``m`` is
    the smallest of ``n``, the steps to the episode's end (inclusive) and ``T - t``. With ``n >= T``
    every step uses the longest return the rollout holds, the A3C/A2C target of Mnih et al. 2016
    (Algorithm S3), equal to ``gae(..., gae_lambda=1)``'s targets. ``n = 1`` is the one-step TD target.

    Inputs ``[T, ...]``; returns ``[T, ...]``. Cost ``O(min(n, T) T)`` (``O(T)`` for ``n >= T``).
    """
    _check(gamma, rewards=rewards, next_values=next_values, terminated=terminated, truncated=truncated)
    if n < 1:
        raise ValueError(f"{n=} must be >= 1")
    T = rewards.shape[0]
    not_terminal = 1.0 - terminated.astype(rewards.dtype)
    done = jnp.logical_or(terminated, truncated)
    bootstrap = not_terminal * next_values  # value after each step where a return is cut there, [T, ...]

    if n >= T:  # one backward pass: G_t = r_t + gamma * (done_t or t = T-1 ? bootstrap_t : G_{t+1})
        def backward(following, xs):
            r, b, d = xs
            g = r + gamma * jnp.where(d, b, following)
            return g, g

        _, returns = jax.lax.scan(backward, bootstrap[-1], (rewards, bootstrap, done), reverse=True)
        return returns

    # G^(k)_t = r_t + gamma * (done_t or t = T-1 ? bootstrap_t : G^(k-1)_{t+1}),  G^(0)_{t+1} = V(s'_t).
    cut = done.at[-1].set(True)

    def increase_horizon(_, g_prev):
        shifted = jnp.concatenate([g_prev[1:], bootstrap[-1:]], axis=0)  # G^(k-1)_{t+1}, [T, ...]
        return rewards + gamma * jnp.where(cut, bootstrap, shifted)

    # G^(0)_t = V(s_t) = V(s'_{t-1}) wherever it is read (the episode goes on after t - 1).
    g0 = jnp.concatenate([jnp.zeros_like(next_values[:1]), next_values[:-1]], axis=0)
    return jax.lax.fori_loop(0, n, increase_horizon, g0)


def n_step_returns_reference(rewards, next_values, terminated, truncated, gamma, n):
    """``n_step_returns`` as a double Python loop in float64 numpy (a test oracle)."""
    r, nv = np.asarray(rewards, np.float64), np.asarray(next_values, np.float64)
    term, trunc = np.asarray(terminated, bool), np.asarray(truncated, bool)
    T = r.shape[0]
    out = np.zeros_like(r)
    for idx in np.ndindex(r.shape[1:]):
        for t in range(T):
            g, discount = 0.0, 1.0
            for k in range(t, min(t + n, T)):
                g += discount * r[(k, *idx)]
                discount *= gamma
                if term[(k, *idx)]:
                    discount = 0.0
                    break
                if trunc[(k, *idx)] or k == min(t + n, T) - 1:
                    break
            last = k
            g += discount * nv[(last, *idx)]
            out[(t, *idx)] = g
    return out
