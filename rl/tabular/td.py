"""Temporal-difference learning (Zhao, Chapter 7): TD(0) for state values, Sarsa, Expected Sarsa, n-step
Sarsa, on-policy and off-policy Q-learning.

All of them are written once, for linear value functions ``q(s, a) = w[a] . phi(s)`` (``w [A, F]``,
features ``phi [S, F]``) and ``v(s) = w . phi(s)``; the default features ``phi(s) = e_s`` make that the
tabular case exactly (``w[a, s] = q(s, a)``), and Chapter 8's TD-linear / Sarsa / Q-learning with
function approximation are the same functions with other features (Sec. 8.2-8.3). The (semi-)gradient of
``q(s, a)`` w.r.t. ``w`` is ``e_a phi(s)^T``, so every update below reads

    w[a_t] <- w[a_t] + alpha (target_t - q(s_t, a_t)) phi(s_t)

with the TD targets (``a'`` drawn from the behaviour policy at ``s_{t+1}``, bootstraps are zero after a
terminal state):

    Sarsa (Sec. 7.2)               r_{t+1} + gamma q(s_{t+1}, a_{t+1})
    Expected Sarsa (Sec. 7.2)      r_{t+1} + gamma sum_a pi(a|s_{t+1}) q(s_{t+1}, a)
    n-step Sarsa (Sec. 7.3)        r_{t+1} + gamma r_{t+2} + ... + gamma^{n-1} r_{t+n} + gamma^n q(s_{t+n}, a_{t+n})
    Q-learning (Sec. 7.4)          r_{t+1} + gamma max_a q(s_{t+1}, a)
    TD(0) for v (Sec. 7.1)         v(s_t) <- v(s_t) + alpha (r_{t+1} + gamma v(s_{t+1}) - v(s_t))

On-policy methods act epsilon-greedily on the current ``q``; off-policy Q-learning acts with a fixed
behaviour policy ``behaviour [S, A]`` and learns the greedy one. n-step Sarsa keeps the last ``n``
``(s, a, r)`` in a ring buffer and, when an episode ends, flushes the pending updates with the
shortened returns (bootstrapping from ``q(s_T, a_T)`` after a time-limit truncation).

Each algorithm is a pure function of a PRNG key, jitted with ``env`` and ``config`` static; ``jax.vmap``
over keys runs seeds in parallel.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlab.rl.tabular.common import (
    EpisodeStats,
    epsilon_greedy_policy,
    one_hot_features,
    run_episodes,
    sample_action,
)
from jaxlab.validation import check_positive

__all__ = [
    "TDConfig",
    "TDControlResult",
    "TDValueResult",
    "expected_sarsa",
    "n_step_sarsa",
    "q_learning",
    "sarsa",
    "td_control",
    "td_state_values",
]

METHODS = ("sarsa", "expected_sarsa", "q_learning")


@dataclasses.dataclass(frozen=True)
class TDConfig:
    """Hyper-parameters of the online TD algorithms (defaults: the book's Sarsa example, Sec. 7.2)."""

    gamma: float = 0.9
    """Discount rate."""
    alpha: float = 0.1
    """Constant step size."""
    epsilon: float = 0.1
    """Exploration of the epsilon-greedy policies (on-policy methods and Expected Sarsa's target)."""
    num_episodes: int = 500
    """Episodes to run."""
    max_episode_steps: int = 1000
    """Time limit per episode (the only ending of continuing tasks)."""
    n_step: int = 1
    """Steps of the n-step Sarsa return (1 is Sarsa)."""

    def __post_init__(self):
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma={self.gamma} must lie in [0, 1)")
        if not self.alpha > 0.0:
            raise ValueError(f"alpha={self.alpha} must be > 0")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon={self.epsilon} must lie in [0, 1]")
        check_positive(self, "num_episodes", "max_episode_steps", "n_step")


class TDControlResult(NamedTuple):
    """Learned weights ``w [A, F]``, the action values ``q [S, A] = phi w^T`` and per-episode stats."""

    w: jax.Array
    q: jax.Array
    stats: EpisodeStats


class TDValueResult(NamedTuple):
    """Learned weights ``w [F]``, the state values ``v [S] = phi w`` and per-episode stats."""

    w: jax.Array
    v: jax.Array
    stats: EpisodeStats


class _Learner(NamedTuple):
    w: jax.Array  # [A, F]
    action: jax.Array  # pending a_t, int32
    t: jax.Array  # steps taken in this episode
    buf_s: jax.Array  # [n] s_tau at slot tau % n
    buf_a: jax.Array  # [n] a_tau
    buf_r: jax.Array  # [n] r_{tau+1}


def _features(env: Any, features: jax.Array | None) -> jax.Array:
    phi = one_hot_features(env.num_states) if features is None else jnp.asarray(features)
    if phi.ndim != 2 or phi.shape[0] != env.num_states:
        raise ValueError(f"features.shape={phi.shape} must be [S, F] with S={env.num_states}")
    return phi


def td_control(key: jax.Array, env: Any, config: TDConfig, method: str = "sarsa", *,
               features: jax.Array | None = None, w0: jax.Array | None = None,
               behaviour: jax.Array | None = None) -> TDControlResult:
    """Online TD control with ``method`` in ``("sarsa", "expected_sarsa", "q_learning")`` and
    ``config.n_step``-step returns (Sarsa-type methods only). ``behaviour [S, A]`` (Q-learning only)
    makes it off-policy; ``features [S, F]`` make it linear function approximation; ``w0 [A, F]``
    continues from earlier weights.

    The method, the off-policy switch and the float hyper-parameters are traced values, so all
    one-step methods share one compiled program per (env, episode sizes, n_step)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    if method == "q_learning" and config.n_step != 1:
        raise ValueError(f"n_step={config.n_step} must be 1 for q_learning (n-step returns would need "
                         "importance sampling off-policy)")
    if behaviour is not None and method != "q_learning":
        raise ValueError(f"a behaviour policy makes learning off-policy; method={method!r} is on-policy, "
                         "use method='q_learning'")
    S, A = env.num_states, env.num_actions
    if behaviour is not None and behaviour.shape != (S, A):
        raise ValueError(f"behaviour.shape={behaviour.shape} must be [S, A]=({S}, {A})")
    phi = _features(env, features)
    w0 = jnp.zeros((A, phi.shape[1]), phi.dtype) if w0 is None else jnp.asarray(w0)
    if w0.shape != (A, phi.shape[1]):
        raise ValueError(f"w0.shape={w0.shape} must be [A, F]=({A}, {phi.shape[1]})")
    hp = _TDHyper(jnp.asarray(config.gamma, phi.dtype), jnp.asarray(config.alpha, phi.dtype),
                  jnp.asarray(config.epsilon, phi.dtype), jnp.asarray(METHODS.index(method), jnp.int32),
                  jnp.asarray(behaviour is not None))
    behaviour = jnp.full((S, A), 1.0 / A, phi.dtype) if behaviour is None else jnp.asarray(behaviour, phi.dtype)
    return _td_control(key, env, config.num_episodes, config.max_episode_steps, config.n_step, hp, phi, w0,
                       behaviour)


class _TDHyper(NamedTuple):
    gamma: jax.Array
    alpha: jax.Array
    epsilon: jax.Array
    method: jax.Array  # index into METHODS
    off_policy: jax.Array  # act with `behaviour` instead of epsilon-greedy


@partial(jax.jit, static_argnames=("env", "num_episodes", "max_episode_steps", "n"))
def _td_control(key, env, num_episodes, max_episode_steps, n, hp, phi, w0, behaviour):
    discounts = hp.gamma ** jnp.arange(n, dtype=phi.dtype)  # [n]

    def q_values(w, s):
        return w @ phi[s]  # [A]

    def act(w, u, s):
        probs = jnp.where(hp.off_policy, behaviour[s], epsilon_greedy_policy(q_values(w, s), hp.epsilon))
        return sample_action(u, probs)

    def bootstrap(w, s, a, terminated):
        q = q_values(w, s)
        candidates = jnp.stack([q[a], epsilon_greedy_policy(q, hp.epsilon) @ q, jnp.max(q)])  # METHODS order
        return jnp.where(terminated, 0.0, candidates[hp.method])

    def update(c, tau, h, boot):
        """Move q(s_tau, a_tau) towards the h-step return sum_{i<h} gamma^i r_{tau+i+1} + gamma^h boot."""
        slots = (tau + jnp.arange(n)) % n  # [n] ring-buffer slots of r_{tau+1}, ..., r_{tau+n}
        g = jnp.sum(jnp.where(jnp.arange(n) < h, discounts * c.buf_r[slots], 0.0)) + hp.gamma**h * boot
        s, a = c.buf_s[tau % n], c.buf_a[tau % n]
        delta = g - q_values(c.w, s)[a]
        return c._replace(w=c.w.at[a].add(hp.alpha * delta * phi[s]))

    def begin(c, u, s0):
        return c._replace(action=act(c.w, u[0], s0), t=jnp.asarray(0, jnp.int32))

    def step(c, u, s):
        s_next, r, terminated = env.transition_from_uniform(u[1:], s, c.action)
        slot = c.t % n
        c = c._replace(buf_s=c.buf_s.at[slot].set(s), buf_a=c.buf_a.at[slot].set(c.action),
                       buf_r=c.buf_r.at[slot].set(r))
        a_next = act(c.w, u[0], s_next)
        boot = bootstrap(c.w, s_next, a_next, terminated)
        if n == 1:
            c = update(c, c.t, 1, boot)
        else:  # the n-step return of tau = t + 1 - n is complete once t + 1 >= n
            updated = update(c, c.t + 1 - n, n, boot)
            c = jax.tree.map(lambda new, old: jnp.where(c.t + 1 >= n, new, old), updated, c)
        return c._replace(action=a_next, t=c.t + 1), s_next, r, terminated

    def end(c, s_T, terminated):
        """Flush the n - 1 updates still pending: tau = T - n + 1 + j with horizon h = n - 1 - j."""
        boot = bootstrap(c.w, s_T, c.action, terminated)

        def flush(j, c):
            tau = c.t - n + 1 + j
            updated = update(c, tau, n - 1 - j, boot)
            return jax.tree.map(lambda new, old: jnp.where(tau >= 0, new, old), updated, c)

        return jax.lax.fori_loop(0, n - 1, flush, c)

    zeros = jnp.zeros(n, jnp.int32)
    init = _Learner(w0, jnp.asarray(0, jnp.int32), jnp.asarray(0, jnp.int32), zeros, zeros, jnp.zeros(n, phi.dtype))
    c, stats = run_episodes(key, env, init, begin=begin, step=step, end=end if n > 1 else None,
                            num_episodes=num_episodes, max_episode_steps=max_episode_steps,
                            num_uniforms=1 + env.num_uniforms)
    return TDControlResult(c.w, phi @ c.w.T, stats)


def sarsa(key: jax.Array, env: Any, config: TDConfig, **kwargs: Any) -> TDControlResult:
    """Sarsa (Sec. 7.2) with epsilon-greedy exploration; ``config.n_step > 1`` gives n-step Sarsa."""
    return td_control(key, env, config, "sarsa", **kwargs)


def n_step_sarsa(key: jax.Array, env: Any, config: TDConfig, **kwargs: Any) -> TDControlResult:
    """n-step Sarsa (Sec. 7.3), ``n = config.n_step``: Sarsa at ``n = 1``, Monte Carlo as ``n -> inf``."""
    return td_control(key, env, config, "sarsa", **kwargs)


def expected_sarsa(key: jax.Array, env: Any, config: TDConfig, **kwargs: Any) -> TDControlResult:
    """Expected Sarsa (Sec. 7.2): the target averages ``q(s_{t+1}, .)`` under the epsilon-greedy policy."""
    return td_control(key, env, config, "expected_sarsa", **kwargs)


def q_learning(key: jax.Array, env: Any, config: TDConfig, behaviour: jax.Array | None = None,
               **kwargs: Any) -> TDControlResult:
    """Q-learning (Sec. 7.4): on-policy (epsilon-greedy on the current ``q``) when ``behaviour`` is None,
    off-policy from the fixed behaviour policy ``behaviour [S, A]`` otherwise."""
    return td_control(key, env, config, "q_learning", behaviour=behaviour, **kwargs)


def td_state_values(key: jax.Array, env: Any, pi: jax.Array, config: TDConfig, *,
                    features: jax.Array | None = None, w0: jax.Array | None = None) -> TDValueResult:
    """TD(0) estimate of ``v_pi`` (Sec. 7.1) following ``pi [S, A]``; with ``features [S, F]`` it is
    TD-linear (Sec. 8.2): ``w <- w + alpha (r + gamma phi(s')^T w - phi(s)^T w) phi(s)``."""
    if pi.shape != (env.num_states, env.num_actions):
        raise ValueError(f"pi.shape={pi.shape} must be [S, A]=({env.num_states}, {env.num_actions})")
    phi = _features(env, features)
    w0 = jnp.zeros(phi.shape[1], phi.dtype) if w0 is None else w0
    if w0.shape != (phi.shape[1],):
        raise ValueError(f"w0.shape={w0.shape} must be [F]=({phi.shape[1]},)")
    return _td_state_values(key, env, config.num_episodes, config.max_episode_steps,
                            jnp.asarray(config.gamma, phi.dtype), jnp.asarray(config.alpha, phi.dtype), pi, phi, w0)


@partial(jax.jit, static_argnames=("env", "num_episodes", "max_episode_steps"))
def _td_state_values(key, env, num_episodes, max_episode_steps, gamma, alpha, pi, phi, w0):
    def step(w, u, s):
        s_next, r, terminated = env.transition_from_uniform(u[1:], s, sample_action(u[0], pi[s]))
        target = r + jnp.where(terminated, 0.0, gamma * phi[s_next] @ w)
        return w + alpha * (target - phi[s] @ w) * phi[s], s_next, r, terminated

    w, stats = run_episodes(key, env, w0, begin=lambda w, u, s0: w, step=step, num_episodes=num_episodes,
                            max_episode_steps=max_episode_steps, num_uniforms=1 + env.num_uniforms)
    return TDValueResult(w, phi @ w, stats)
