"""Monte Carlo control (Zhao, Chapter 5): MC Basic, MC Exploring Starts and MC epsilon-greedy.

All three estimate action values by averaging sampled discounted returns
``g_t = r_{t+1} + gamma r_{t+2} + ...`` (truncated at the episode length) and improve the policy
greedily (or epsilon-greedily) with respect to them:

* **MC Basic** (Sec. 5.2) is policy iteration with model-free evaluation: at iteration ``k`` every pair
  ``(s, a)`` starts ``episodes_per_pair`` episodes that follow ``pi_k``; ``q_k(s, a)`` is the mean
  return and ``pi_{k+1} = greedy(q_k)``.
* **MC Exploring Starts** (Sec. 5.3) starts each episode from a uniformly random ``(s_0, a_0)``,
  follows the greedy policy of the current estimate and updates every visited pair (every-visit):
  ``Returns(s_t, a_t) += g_t``, ``Num(s_t, a_t) += 1``, ``q = Returns / Num``, ``pi = greedy(q)``.
* **MC epsilon-greedy** (Sec. 5.4) is the same with the epsilon-greedy policy (eq. 5.1) of ``q``, so
  exploring starts are no longer needed (``exploring_starts=False`` starts from the environment's
  start distribution). It converges to the best epsilon-greedy policy
  (:func:`jaxlab.rl.tabular.dynamic_programming.epsilon_greedy_optimum`), not to the optimal one.

Estimates are running averages, ``q <- q + (g - q) / N(s, a)`` (the book's ``Returns / Num``), or with
``step_size=alpha`` constant-step updates that forget the returns of earlier, worse policies.
Episodes are truncated at ``episode_length``; see ``MCConfig.first_visit`` for the visit rule.

Each function is a pure function of a PRNG key, jitted with the loop sizes static and the float
hyper-parameters traced; vmappable over keys.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlab.rl.tabular.common import (
    discounted_returns,
    epsilon_greedy_policy,
    greedy_policy,
    sample_trajectory,
    trajectory_from_noise,
    sample_action,
    uniform_noise,
)
from jaxlab.validation import check_positive

__all__ = ["MCBasicConfig", "MCConfig", "MCResult", "mc_basic", "mc_control", "mc_epsilon_greedy",
           "mc_exploring_starts"]


def _check_common(gamma: float, episode_length: int) -> None:
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma={gamma} must lie in [0, 1)")
    if episode_length < 1:
        raise ValueError(f"episode_length={episode_length} must be >= 1")


@dataclasses.dataclass(frozen=True)
class MCBasicConfig:
    """Hyper-parameters of MC Basic."""

    gamma: float = 0.9
    """Discount rate."""
    episode_length: int = 100
    """Steps per episode (returns are truncated there)."""
    num_iterations: int = 10
    """Policy-iteration steps."""
    episodes_per_pair: int = 1
    """Episodes averaged per (s, a) and iteration (1 suffices for a deterministic world and policy)."""

    def __post_init__(self):
        _check_common(self.gamma, self.episode_length)
        check_positive(self, "num_iterations", "episodes_per_pair")


@dataclasses.dataclass(frozen=True)
class MCConfig:
    """Hyper-parameters of MC Exploring Starts / MC epsilon-greedy."""

    gamma: float = 0.9
    """Discount rate."""
    episode_length: int = 100
    """Steps per episode (returns are truncated there)."""
    num_episodes: int = 1000
    """Episodes to run."""
    epsilon: float = 0.0
    """Exploration of the epsilon-greedy policy (0: greedy)."""
    exploring_starts: bool = True
    """Start episodes from uniformly random (s, a) instead of the environment's start distribution."""
    step_size: float | None = None
    """None: ``q`` is the sample average of the returns (the book); a float ``alpha``: constant-step
    updates ``q <- q + alpha (g - q)`` per used visit, which forget returns of earlier policies."""
    first_visit: bool = True
    """Use only each pair's first visit per episode. The book's algorithms use every visit, which is
    accurate when episodes are far longer than the horizon ``1 / (1 - gamma)``; with short truncated
    episodes the late visits (e.g. staying on the target) carry truncated returns and bias ``q``."""

    def __post_init__(self):
        _check_common(self.gamma, self.episode_length)
        if self.num_episodes < 1:
            raise ValueError(f"num_episodes={self.num_episodes} must be >= 1")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon={self.epsilon} must lie in [0, 1]")


class MCResult(NamedTuple):
    """``q [S, A]`` estimates, the final policy ``pi [S, A]`` and the numbers of returns averaged into
    each estimate, ``counts [S, A]`` (pass a result back as ``init`` to continue a run)."""

    q: jax.Array
    pi: jax.Array
    counts: jax.Array


def mc_basic(key: jax.Array, env: Any, config: MCBasicConfig, pi0: jax.Array | None = None) -> MCResult:
    """MC Basic (Sec. 5.2) from ``pi0 [S, A]`` (default: always ``up``, i.e. action 0)."""
    S, A = env.num_states, env.num_actions
    pi0 = jax.nn.one_hot(jnp.zeros(S, jnp.int32), A) if pi0 is None else pi0
    if pi0.shape != (S, A):
        raise ValueError(f"pi0.shape={pi0.shape} must be [S, A]=({S}, {A})")
    return _mc_basic(key, env, config.num_iterations, config.episode_length, config.episodes_per_pair,
                     jnp.asarray(config.gamma), pi0)


@partial(jax.jit, static_argnames=("env", "num_iterations", "episode_length", "episodes_per_pair"))
def _mc_basic(key, env, num_iterations, episode_length, episodes_per_pair, gamma, pi0):
    S, A, N = env.num_states, env.num_actions, episodes_per_pair
    states = jnp.repeat(jnp.arange(S), A * N)  # [S*A*N]
    actions = jnp.tile(jnp.repeat(jnp.arange(A), N), S)  # [S*A*N]

    def episode_return(key, pi, s0, a0):
        traj = sample_trajectory(key, env, pi, episode_length, s0, a0)
        return discounted_returns(traj.rewards, gamma, traj.valid)[0]

    def iteration(pi, key):
        keys = jax.random.split(key, S * A * N)
        g = jax.vmap(episode_return, in_axes=(0, None, 0, 0))(keys, pi, states, actions)  # [S*A*N]
        q = g.reshape(S, A, N).mean(-1)  # [S, A] policy evaluation
        return greedy_policy(q), q  # policy improvement

    pi, qs = jax.lax.scan(iteration, pi0, jax.random.split(key, num_iterations))
    return MCResult(qs[-1], pi, jnp.full((S, A), float(N)))


def mc_control(key: jax.Array, env: Any, config: MCConfig, init: MCResult | None = None) -> MCResult:
    """Every-visit (or first-visit) MC control with an epsilon-greedy policy (``config.epsilon = 0``:
    greedy) and optional exploring starts; ``init`` continues from an earlier result."""
    S, A = env.num_states, env.num_actions
    q0 = jnp.zeros((S, A)) if init is None else init.q
    counts0 = jnp.zeros((S, A)) if init is None else init.counts
    if q0.shape != (S, A) or counts0.shape != (S, A):
        raise ValueError(f"init.q / init.counts must be [S, A]=({S}, {A})")
    alpha = -1.0 if config.step_size is None else config.step_size
    return _mc_control(key, env, config.num_episodes, config.episode_length, config.first_visit,
                       jnp.asarray(config.gamma), jnp.asarray(config.epsilon), jnp.asarray(config.exploring_starts),
                       jnp.asarray(alpha), q0, counts0)


def mc_exploring_starts(key: jax.Array, env: Any, config: MCConfig, init: MCResult | None = None) -> MCResult:
    """MC Exploring Starts (Sec. 5.3): greedy policy, uniformly random ``(s_0, a_0)``."""
    if config.epsilon != 0.0 or not config.exploring_starts:
        raise ValueError(f"MC Exploring Starts is greedy with exploring starts; got epsilon={config.epsilon}, "
                         f"exploring_starts={config.exploring_starts} (use mc_epsilon_greedy)")
    return mc_control(key, env, config, init)


def mc_epsilon_greedy(key: jax.Array, env: Any, config: MCConfig, init: MCResult | None = None) -> MCResult:
    """MC epsilon-greedy (Sec. 5.4): the epsilon-greedy policy of the current estimate generates the data."""
    if config.epsilon <= 0.0:
        raise ValueError(f"epsilon={config.epsilon} must be > 0 for MC epsilon-greedy (0 is MC Exploring Starts)")
    return mc_control(key, env, config, init)


@partial(jax.jit, static_argnames=("env", "num_episodes", "episode_length", "first_visit"))
def _mc_control(key, env, num_episodes, episode_length, first_visit, gamma, epsilon, exploring_starts, alpha,
                q0, counts0):
    S, A = env.num_states, env.num_actions
    explore_cdf = jnp.cumsum(~jnp.asarray(env.terminal)) / jnp.sum(~jnp.asarray(env.terminal))  # [S]

    def episode(carry, key):
        q, counts = carry
        pi = epsilon_greedy_policy(q, epsilon)  # [S, A]
        noise = uniform_noise(key, (episode_length + 1, env.num_uniforms + 1))  # row 0: the start
        u = noise[0]
        # Exploring start: (s0, a0) uniform over non-terminal states and all actions.
        s_explore = jnp.minimum(jnp.sum(explore_cdf <= u[1]), S - 1)
        a_explore = jnp.minimum((u[2] * A).astype(jnp.int32), A - 1)
        s0 = jnp.where(exploring_starts, s_explore, env.start_from_uniform(u[1])).astype(jnp.int32)
        a0 = jnp.where(exploring_starts, a_explore, sample_action(u[0], pi[s0]))
        traj = trajectory_from_noise(noise, env, pi, s0, a0)
        g = discounted_returns(traj.rewards, gamma, traj.valid)  # [T]
        used = traj.valid.astype(q.dtype)
        if first_visit:
            # Each pair is used at most once per episode, so the updates are independent: one scatter.
            t = jnp.arange(episode_length)
            first_t = jnp.full((S, A), episode_length).at[traj.states, traj.actions].min(t)  # [S, A]
            used = used * (first_t[traj.states, traj.actions] == t)
            n = counts.at[traj.states, traj.actions].add(used)  # [S, A]
            step = jnp.where(alpha > 0, alpha, 1.0 / jnp.maximum(n, 1.0))[traj.states, traj.actions] * used  # [T]
            q = q.at[traj.states, traj.actions].add(step * (g - q[traj.states, traj.actions]))
            return (q, n), None

        def visit(carry, x):  # every visit: backwards over the episode, as in the book's algorithms
            q, counts = carry
            s, a, g_t, used_t = x
            n = counts[s, a] + used_t
            step = jnp.where(alpha > 0, alpha, 1.0 / jnp.maximum(n, 1.0)) * used_t  # 1/N: running average
            return (q.at[s, a].add(step * (g_t - q[s, a])), counts.at[s, a].set(n)), None

        carry, _ = jax.lax.scan(visit, (q, counts), (traj.states, traj.actions, g, used), reverse=True)
        return carry, None

    (q, counts), _ = jax.lax.scan(episode, (q0, counts0), jax.random.split(key, num_episodes))
    return MCResult(q, epsilon_greedy_policy(q, epsilon), counts)
