"""Policy gradient and actor-critic methods (Zhao, Chapters 9-10) on a grid world: REINFORCE, QAC, A2C,
off-policy actor-critic with importance sampling, and the deterministic policy gradient.

**Parametrisation.** The policy is a softmax over linear preferences, ``pi(a|s, theta) =
softmax(theta phi(s))_a`` with ``theta [A, F]`` and features ``phi [S, F]`` (default one-hot, i.e. a
tabular softmax policy), so ``grad_theta ln pi(a|s) = (e_a - pi(.|s, theta)) phi(s)^T``. Critics are
linear in the same features: ``v(s, w) = w . phi(s)`` (``w [F]``) or ``q(s, a, w) = w_a . phi(s)``
(``w [A, F]``).

**Updates** (``delta_t`` is the TD error; bootstraps are zero after terminal states):

    REINFORCE (Sec. 9.4)     theta += a_theta grad ln pi(a_t|s_t) g_t        (g_t the sampled return)
    QAC (Sec. 10.1)          theta += a_theta grad ln pi(a_t|s_t) q(s_t, a_t, w)
                             w_a   += a_w [r + gamma q(s', a', w) - q(s_t, a_t, w)] phi(s_t)   (Sarsa critic)
    A2C (Sec. 10.2)          delta  = r + gamma v(s', w) - v(s_t, w)
                             theta += a_theta delta grad ln pi(a_t|s_t);   w += a_w delta phi(s_t)
    Off-policy AC (10.3)     a_t ~ beta(.|s_t),  rho = pi(a_t|s_t, theta) / beta(a_t|s_t)
                             theta += a_theta rho delta grad ln pi(a_t|s_t); w += a_w rho delta phi(s_t)
    DPG (Sec. 10.4)          theta += a_theta grad_theta mu(s_t) grad_a q(s_t, a, w)|_{a = mu(s_t)}
                             w     += a_w [r + gamma q(s', mu(s'), w) - q(s_t, a_t, w)] grad_w q(s_t, a_t, w)

**Continuous actions for DPG.** The grid's actions are discrete, so DPG runs on its continuous
relaxation: an action is a point ``a`` of the probability simplex over the five moves, executed by the
environment as a move drawn from ``a`` (vertices are the original actions). Then ``p(s'|s, a) =
sum_i a_i p(s'|s, i)`` and ``q(s, a) = sum_i a_i q(s, e_i)`` are *linear* in ``a``, so the critic
``q(s, a, w) = a . (w phi(s))`` represents it exactly. The deterministic policy is
``mu(s, theta) = softmax(theta phi(s))`` (a point of the simplex, not a distribution the agent samples),
``grad_a q = w phi(s)`` and ``grad_theta mu(s) grad_a q = (mu * (q_s - mu . q_s)) phi(s)^T`` with
``q_s = w phi(s)``. Off-policy data come from a behaviour policy over the vertices (no importance
sampling is needed, as the book notes). The optimum of the relaxation is a vertex, the optimal
deterministic policy of the grid.

Every algorithm is a pure function of a PRNG key (jitted, loop sizes static, step sizes traced) and
vmaps over keys.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlab.rl.tabular.common import (
    EpisodeStats,
    discounted_returns,
    one_hot_features,
    sample_trajectory,
    run_episodes,
    sample_action,
)
from jaxlab.validation import check_greater, check_positive

__all__ = [
    "ActorCriticResult",
    "PGConfig",
    "a2c",
    "deterministic_actor_critic",
    "off_policy_actor_critic",
    "qac",
    "reinforce",
    "softmax_policy",
]


@dataclasses.dataclass(frozen=True)
class PGConfig:
    """Hyper-parameters of the policy-gradient and actor-critic algorithms."""

    gamma: float = 0.9
    """Discount rate."""
    alpha_theta: float = 0.1
    """Actor (policy) step size."""
    alpha_w: float = 0.1
    """Critic (value) step size; unused by REINFORCE."""
    num_episodes: int = 1000
    """Episodes to run."""
    max_episode_steps: int = 100
    """Time limit per episode (REINFORCE's fixed rollout length)."""

    def __post_init__(self):
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma={self.gamma} must lie in [0, 1)")
        check_greater(self, "alpha_theta", "alpha_w")
        check_positive(self, "num_episodes", "max_episode_steps")


class ActorCriticResult(NamedTuple):
    """Policy parameters ``theta [A, F]``, critic ``w`` (``[F]`` for v, ``[A, F]`` for q; zeros for
    REINFORCE), the policy table ``pi [S, A]`` (for DPG: ``mu(s)`` as a table) and episode stats."""

    theta: jax.Array
    w: jax.Array
    pi: jax.Array
    stats: EpisodeStats


def softmax_policy(theta: jax.Array, features: jax.Array) -> jax.Array:
    """``pi(a|s) = softmax(theta phi(s))_a`` for every state: ``theta [A, F]``, ``features [S, F]`` -> ``[S, A]``."""
    return jax.nn.softmax(features @ theta.T, axis=-1)


def _grad_log_pi(theta, phi_s, a):
    """``grad_theta ln pi(a|s, theta) = (e_a - pi(.|s)) phi(s)^T``, ``[A, F]``."""
    pi_s = jax.nn.softmax(theta @ phi_s)  # [A]
    return jnp.outer(jax.nn.one_hot(a, theta.shape[0]) - pi_s, phi_s)


def _setup(env, config, features, theta0):
    phi = one_hot_features(env.num_states) if features is None else jnp.asarray(features)
    if phi.ndim != 2 or phi.shape[0] != env.num_states:
        raise ValueError(f"features.shape={phi.shape} must be [S, F] with S={env.num_states}")
    theta0 = jnp.zeros((env.num_actions, phi.shape[1]), phi.dtype) if theta0 is None else jnp.asarray(theta0)
    if theta0.shape != (env.num_actions, phi.shape[1]):
        raise ValueError(f"theta0.shape={theta0.shape} must be [A, F]=({env.num_actions}, {phi.shape[1]})")
    hp = jnp.asarray([config.gamma, config.alpha_theta, config.alpha_w], phi.dtype)
    return phi, theta0, hp


def _check_behaviour(env, behaviour):
    if behaviour.shape != (env.num_states, env.num_actions):
        raise ValueError(f"behaviour.shape={behaviour.shape} must be [S, A]=({env.num_states}, {env.num_actions})")


def reinforce(key: jax.Array, env: Any, config: PGConfig, *, features: jax.Array | None = None,
              theta0: jax.Array | None = None) -> ActorCriticResult:
    """REINFORCE (Sec. 9.4): roll out ``max_episode_steps`` steps with ``pi(theta)`` from the start
    distribution, then for ``t = 0, 1, ...`` move ``theta`` along ``grad ln pi(a_t|s_t) g_t``. In a
    continuing task ``g_t`` is truncated at the rollout's end; terminal states end episodes early."""
    phi, theta0, hp = _setup(env, config, features, theta0)
    return _reinforce(key, env, config.num_episodes, config.max_episode_steps, hp, phi, theta0)


@partial(jax.jit, static_argnames=("env", "num_episodes", "max_episode_steps"))
def _reinforce(key, env, num_episodes, max_episode_steps, hp, phi, theta0):
    gamma, alpha_theta, _ = hp

    def episode(theta, key):
        traj = sample_trajectory(key, env, softmax_policy(theta, phi), max_episode_steps)  # from the start distribution
        g = discounted_returns(traj.rewards, gamma, traj.valid)  # [T]

        def step(theta, x):
            s, a, g_t, valid = x
            return theta + alpha_theta * valid * g_t * _grad_log_pi(theta, phi[s], a), None

        theta, _ = jax.lax.scan(step, theta, (traj.states, traj.actions, g, traj.valid))
        return theta, (jnp.sum(traj.valid), jnp.sum(jnp.where(traj.valid, traj.rewards, 0.0)))

    theta, (lengths, returns) = jax.lax.scan(episode, theta0, jax.random.split(key, num_episodes))
    return ActorCriticResult(theta, jnp.zeros_like(theta), softmax_policy(theta, phi),
                             EpisodeStats(lengths.astype(jnp.int32), returns))


class _AC(NamedTuple):
    theta: jax.Array  # [A, F]
    w: jax.Array  # critic
    action: jax.Array  # pending action (QAC)


def _online(key, env, sizes, theta0, w0, begin, step):
    """Run an online actor-critic ``step`` through :func:`run_episodes`; ``sizes = (episodes, steps)``."""
    init = _AC(theta0, w0, jnp.asarray(0, jnp.int32))
    return run_episodes(key, env, init, begin=begin, step=step, num_episodes=sizes[0],
                        max_episode_steps=sizes[1], num_uniforms=1 + env.num_uniforms)


def qac(key: jax.Array, env: Any, config: PGConfig, *, features: jax.Array | None = None,
        theta0: jax.Array | None = None) -> ActorCriticResult:
    """QAC (Sec. 10.1): softmax actor, Sarsa critic ``q(s, a, w)``; on-policy."""
    phi, theta0, hp = _setup(env, config, features, theta0)
    return _qac(key, env, (config.num_episodes, config.max_episode_steps), hp, phi, theta0)


@partial(jax.jit, static_argnames=("env", "sizes"))
def _qac(key, env, sizes, hp, phi, theta0):
    gamma, alpha_theta, alpha_w = hp

    def begin(c, u, s0):
        return c._replace(action=sample_action(u[0], jax.nn.softmax(c.theta @ phi[s0])))

    def step(c, u, s):
        a = c.action
        s_next, r, terminated = env.transition_from_uniform(u[1:], s, a)
        a_next = sample_action(u[0], jax.nn.softmax(c.theta @ phi[s_next]))
        q_sa = c.w[a] @ phi[s]
        target = r + jnp.where(terminated, 0.0, gamma * c.w[a_next] @ phi[s_next])
        theta = c.theta + alpha_theta * q_sa * _grad_log_pi(c.theta, phi[s], a)
        w = c.w.at[a].add(alpha_w * (target - q_sa) * phi[s])
        return _AC(theta, w, a_next), s_next, r, terminated

    c, stats = _online(key, env, sizes, theta0, jnp.zeros_like(theta0), begin, step)
    return ActorCriticResult(c.theta, c.w, softmax_policy(c.theta, phi), stats)


def a2c(key: jax.Array, env: Any, config: PGConfig, *, features: jax.Array | None = None,
        theta0: jax.Array | None = None) -> ActorCriticResult:
    """A2C, the advantage actor-critic (Sec. 10.2): the TD error of a state-value critic is the
    advantage estimate; on-policy."""
    return off_policy_actor_critic(key, env, config, behaviour=None, features=features, theta0=theta0)


def off_policy_actor_critic(key: jax.Array, env: Any, config: PGConfig, behaviour: jax.Array | None, *,
                            features: jax.Array | None = None,
                            theta0: jax.Array | None = None) -> ActorCriticResult:
    """Off-policy actor-critic (Sec. 10.3): actions from ``behaviour [S, A]``, both updates weighted by
    the importance ratio ``pi(a|s, theta) / beta(a|s)``. ``behaviour=None`` acts with ``pi`` itself
    (ratio 1), which is A2C."""
    phi, theta0, hp = _setup(env, config, features, theta0)
    off_policy = behaviour is not None
    if off_policy:
        _check_behaviour(env, behaviour)
    else:
        behaviour = jnp.full((env.num_states, env.num_actions), 1.0 / env.num_actions, phi.dtype)
    return _advantage_ac(key, env, (config.num_episodes, config.max_episode_steps), hp, phi, theta0, behaviour,
                         jnp.asarray(off_policy))


@partial(jax.jit, static_argnames=("env", "sizes"))
def _advantage_ac(key, env, sizes, hp, phi, theta0, behaviour, off_policy):
    gamma, alpha_theta, alpha_w = hp

    def step(c, u, s):
        pi_s = jax.nn.softmax(c.theta @ phi[s])  # [A]
        beta_s = jnp.where(off_policy, behaviour[s], pi_s)
        a = sample_action(u[0], beta_s)
        s_next, r, terminated = env.transition_from_uniform(u[1:], s, a)
        rho = pi_s[a] / beta_s[a]  # importance ratio; 1 on-policy
        delta = r + jnp.where(terminated, 0.0, gamma * c.w @ phi[s_next]) - c.w @ phi[s]
        theta = c.theta + alpha_theta * rho * delta * _grad_log_pi(c.theta, phi[s], a)
        w = c.w + alpha_w * rho * delta * phi[s]
        return c._replace(theta=theta, w=w), s_next, r, terminated

    c, stats = _online(key, env, sizes, theta0, jnp.zeros(phi.shape[1], phi.dtype), lambda c, u, s0: c, step)
    return ActorCriticResult(c.theta, c.w, softmax_policy(c.theta, phi), stats)


def deterministic_actor_critic(key: jax.Array, env: Any, config: PGConfig, behaviour: jax.Array | None = None, *,
                               features: jax.Array | None = None,
                               theta0: jax.Array | None = None) -> ActorCriticResult:
    """Off-policy deterministic actor-critic (Sec. 10.4) on the simplex relaxation described in the
    module docstring; ``behaviour [S, A]`` over the vertices (default uniform). ``pi`` in the result is
    ``mu(s)``, which as a stochastic policy of the grid has the same value as the relaxed action."""
    phi, theta0, hp = _setup(env, config, features, theta0)
    if behaviour is None:
        behaviour = jnp.full((env.num_states, env.num_actions), 1.0 / env.num_actions, phi.dtype)
    _check_behaviour(env, behaviour)
    return _dpg(key, env, (config.num_episodes, config.max_episode_steps), hp, phi, theta0, behaviour)


@partial(jax.jit, static_argnames=("env", "sizes"))
def _dpg(key, env, sizes, hp, phi, theta0, behaviour):
    gamma, alpha_theta, alpha_w = hp

    def step(c, u, s):
        i = sample_action(u[0], behaviour[s])  # the behaviour's action is the vertex e_i of the simplex
        s_next, r, terminated = env.transition_from_uniform(u[1:], s, i)
        mu_next = jax.nn.softmax(c.theta @ phi[s_next])  # mu(s') [A]
        q_s = c.w @ phi[s]  # [A] = grad_a q(s, a, w), q(s, a, w) = a . q_s
        delta = r + jnp.where(terminated, 0.0, gamma * mu_next @ (c.w @ phi[s_next])) - q_s[i]
        w = c.w.at[i].add(alpha_w * delta * phi[s])  # grad_w q(s, e_i, w) = e_i phi(s)^T
        mu = jax.nn.softmax(c.theta @ phi[s])
        theta = c.theta + alpha_theta * jnp.outer(mu * (q_s - mu @ q_s), phi[s])  # grad mu(s)^T grad_a q
        return c._replace(theta=theta, w=w), s_next, r, terminated

    c, stats = _online(key, env, sizes, theta0, jnp.zeros_like(theta0), lambda c, u, s0: c, step)
    return ActorCriticResult(c.theta, c.w, softmax_policy(c.theta, phi), stats)
