"""Building blocks shared by every tabular algorithm: policies from action values, action sampling,
discounted returns, fixed-length rollouts and the online episode loop.

Everything is a pure function of its inputs and a PRNG key, jittable and vmappable. Policies are
tables ``pi [S, A]`` of probabilities ``pi(a|s)``; action values are ``q [S, A]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "EpisodeStats",
    "Trajectory",
    "discounted_returns",
    "epsilon_greedy_policy",
    "greedy_policy",
    "one_hot_features",
    "sample_trajectory",
    "trajectory_from_noise",
    "run_episodes",
    "sample_action",
    "uniform_noise",
    "uniform_policy",
]


def greedy_policy(q: jax.Array) -> jax.Array:
    """One-hot greedy policy ``pi(a|s) = [a = argmax_a' q(s, a')]`` (first maximiser on ties), ``[..., A]``."""
    return jax.nn.one_hot(jnp.argmax(q, axis=-1), q.shape[-1], dtype=q.dtype)


def epsilon_greedy_policy(q: jax.Array, epsilon: float | jax.Array) -> jax.Array:
    """The epsilon-greedy policy of Zhao (eq. 5.1): ``1 - epsilon (|A| - 1) / |A|`` on the greedy action,
    ``epsilon / |A|`` on each other action. ``q [..., A]`` -> ``pi [..., A]``."""
    A = q.shape[-1]
    return (1.0 - epsilon) * greedy_policy(q) + epsilon / A


def uniform_policy(num_states: int, num_actions: int) -> jax.Array:
    """``pi(a|s) = 1 / |A|`` everywhere, ``[S, A]``."""
    return jnp.full((num_states, num_actions), 1.0 / num_actions)


def sample_action(u: jax.Array, probs: jax.Array) -> jax.Array:
    """Draw ``a ~ probs`` (``probs [A]``) by inverse CDF from one uniform variate ``u ~ U[0, 1)``: the
    ``a`` with ``cdf[a-1] <= u < cdf[a]``, so zero-probability actions are never drawn. int32 scalar.

    Loops draw their variates in bulk before they start, which keeps random-number generation (and
    its compile cost) out of the loop body."""
    cdf = jnp.cumsum(probs, axis=-1)  # [A]
    return jnp.minimum(jnp.sum(cdf <= u * cdf[-1]), probs.shape[-1] - 1).astype(jnp.int32)


def uniform_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``U[0, 1)`` draws of ``shape``, generated flat and reshaped: XLA:CPU compiles the threefry of a
    2-D shape with a short last axis (``[T, 3]``) several times slower than the same draws in 1-D."""
    return jax.random.uniform(key, (math.prod(shape),)).reshape(shape)


def one_hot_features(num_states: int) -> jax.Array:
    """Tabular features ``phi(s) = e_s`` (``[S, S]``): linear methods with them are the tabular methods."""
    return jnp.eye(num_states)


def discounted_returns(rewards: jax.Array, gamma: float | jax.Array, valid: jax.Array | None = None,
                       bootstrap: jax.Array | float = 0.0) -> jax.Array:
    """``g_t = r_{t+1} + gamma g_{t+1}`` backwards over a trajectory, ``g_T = bootstrap``.

    ``rewards [T]`` (``rewards[t]`` follows the action at ``t``); ``valid [T]`` masks steps after the
    episode ended. Returns ``g [T]``.
    """
    if valid is not None:
        rewards = jnp.where(valid, rewards, 0.0)

    def back(g, r):
        g = r + gamma * g
        return g, g

    _, g = jax.lax.scan(back, jnp.asarray(bootstrap, rewards.dtype), rewards, reverse=True)
    return g


class Trajectory(NamedTuple):
    """A fixed-length trajectory ``s_0, a_0, r_1, s_1, a_1, ...``; every field is ``[T]``.

    ``valid[t]`` is False for steps after a terminal state was reached (episodic tasks).
    ``final_state`` and ``final_action`` are ``s_T`` and ``a_T`` (for bootstrapping).
    """

    states: jax.Array
    actions: jax.Array
    rewards: jax.Array
    valid: jax.Array
    final_state: jax.Array
    final_action: jax.Array


def sample_trajectory(key: jax.Array, env: Any, policy: jax.Array, length: int,
                      s0: jax.Array | None = None, a0: jax.Array | None = None) -> Trajectory:
    """Follow ``policy [S, A]`` for ``length`` steps (a ``lax.scan``; ``length`` static) from ``s0`` with
    first action ``a0``; either may be None: ``s0`` is then drawn from the environment's start
    distribution, ``a0`` from the policy."""
    return trajectory_from_noise(uniform_noise(key, (length + 1, env.num_uniforms + 1)), env, policy, s0, a0)


def trajectory_from_noise(noise: jax.Array, env: Any, policy: jax.Array, s0: jax.Array | None = None,
                          a0: jax.Array | None = None) -> Trajectory:
    """:func:`sample_trajectory` driven by pre-drawn ``noise [T + 1, env.num_uniforms + 1] ~ U[0, 1)``:
    row 0 draws the start (``noise[0, 1]`` the state, ``noise[0, 0]`` the action; callers may use its
    other entries for their own choices), row ``t + 1`` step ``t`` (column 0 the next action, the rest
    the world)."""
    s0 = env.start_from_uniform(noise[0, 1]) if s0 is None else jnp.asarray(s0, jnp.int32)
    a0 = sample_action(noise[0, 0], policy[s0]) if a0 is None else jnp.asarray(a0, jnp.int32)

    def step(carry, u):
        s, a, alive = carry
        s_next, r, terminated = env.transition_from_uniform(u[1:], s, a)
        a_next = sample_action(u[0], policy[s_next])
        return (s_next, a_next, alive & ~terminated), (s, a, r, alive)

    (s_T, a_T, _), (states, actions, rewards, valid) = jax.lax.scan(step, (s0, a0, jnp.asarray(True)), noise[1:])
    return Trajectory(states, actions, rewards, valid, s_T, a_T)


class EpisodeStats(NamedTuple):
    """Per-episode statistics of an online run: ``lengths [E]`` (steps) and ``returns [E]`` (undiscounted)."""

    lengths: jax.Array
    returns: jax.Array


Carry = Any


def run_episodes(
    key: jax.Array,
    env: Any,
    carry: Carry,
    *,
    begin: Callable[[Carry, jax.Array, jax.Array], Carry],
    step: Callable[[Carry, jax.Array, jax.Array], tuple[Carry, jax.Array, jax.Array, jax.Array]],
    end: Callable[[Carry, jax.Array, jax.Array], Carry] | None = None,
    num_episodes: int,
    max_episode_steps: int,
    num_uniforms: int,
) -> tuple[Carry, EpisodeStats]:
    """The online learning loop: ``num_episodes`` episodes, each from the environment's start
    distribution, each running until a terminal state or ``max_episode_steps`` steps (the only ending
    of continuing tasks).

    The learner is three pure callbacks on its own ``carry`` (parameters, pending action, buffers),
    each handed ``u [num_uniforms] ~ U[0, 1)`` (its share of the episode's pre-drawn noise):

    * ``begin(carry, u, s0) -> carry`` at the start of an episode (e.g. choose ``a_0``);
    * ``step(carry, u, s) -> (carry, s_next, r, terminated)`` acts once in state ``s`` through
      ``env.transition_from_uniform`` and learns from the transition;
    * ``end(carry, s_T, terminated) -> carry`` after the last step (e.g. flush n-step updates).

    Episodes are a ``lax.scan``, steps a ``lax.while_loop``; vmapping over keys runs seeds in lockstep.
    """

    def episode(carry, key_e):
        noise = uniform_noise(key_e, (max_episode_steps + 1, num_uniforms + 1))  # [T + 1, m + 1]
        s0 = env.start_from_uniform(noise[0, -1])
        carry = begin(carry, noise[0, :-1], s0)

        def cond(c):
            _, _, t, _, done = c
            return (~done) & (t < max_episode_steps)

        def body(c):
            carry, s, t, ret, _ = c
            carry, s_next, r, terminated = step(carry, noise[t + 1, :-1], s)
            return carry, s_next, t + 1, ret + r.astype(jnp.float32), terminated

        init = (carry, s0, jnp.asarray(0, jnp.int32), jnp.asarray(0.0, jnp.float32), jnp.asarray(False))
        carry, s_T, t, ret, terminated = jax.lax.while_loop(cond, body, init)
        if end is not None:
            carry = end(carry, s_T, terminated)
        return carry, (t, ret)

    carry, (lengths, returns) = jax.lax.scan(episode, carry, jax.random.split(key, num_episodes))
    return carry, EpisodeStats(lengths, returns)
