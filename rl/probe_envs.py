"""Probe environments with known answers, in the gymnax 1.x API, for testing deep RL agents in seconds.

Each probe isolates what an agent must get right (Andy Jones, "Debugging RL, Without the Agonizing
Pain", 2021): the contextual bandit checks that the policy (or Q-function) reads its observation; its
time-limited form also checks that truncation is bootstrapped rather than treated as termination;
the survival probe's random termination checks that a learnt value is the mean of its bootstrap target;
the one-step continuous task checks continuous-action actors, and its time-limited form the
continuous agents' bootstrapped critic targets (DDPG, TD3, SAC). ``jaxlab.rl.wrappers.make_env`` knows
them by id, so every algorithm config accepts them.

| id | observation | optimal return | what a wrong agent shows |
|---|---|---|---|
| ``Bandit-probe`` | one-hot context ``c`` of 2 | 1 (reward ``[a == c]``, one step) | 1/2 for a context-blind policy |
| ``TimeLimitBandit-probe`` | a fresh context every step | 5 (cut after 5 steps); ``V = 1/(1 - gamma)`` | ``V <= (1 - gamma^5)/(1 - gamma)`` if the cut is taken as terminal |
| ``Survival-probe`` | constant | ``1/p = 5`` (reward 1 per step, terminates with probability ``p = 0.2``) | ``Q != 1/(1 - gamma (1 - p))``: a value estimate that is not the mean of its target (below) |
| ``Continuous-probe`` | target ``x ~ U[-1, 1]`` | 0 (reward ``-(a - x)^2``, one step) | -2/3 for a random action |
| ``ContinuousTimeLimit-probe`` | a fresh target every step | 5 (reward ``1 - (a - x)^2``, cut after 5 steps); ``Q(s, x) = 1/(1 - gamma)`` | 5/3 for a random action; ``Q <= (1 - gamma^5)/(1 - gamma)`` if the cut is taken as terminal |
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

__all__ = ["PROBE_ENVS", "BanditProbe", "ContinuousProbe", "ProbeParams", "ProbeState", "SurvivalProbe"]


@struct.dataclass
class ProbeState(environment.EnvState):
    obs: jax.Array     # [O] current observation
    time: int


@struct.dataclass
class ProbeParams(environment.EnvParams):
    max_steps_in_episode: int = 1


class _Probe(environment.Environment[ProbeState, ProbeParams]):
    """A probe whose observation is stored in its state; subclasses define ``_start`` and ``_transition``."""

    obs_dim: int = 1
    max_steps: int = 1

    @property
    def default_params(self) -> ProbeParams:
        return ProbeParams(max_steps_in_episode=self.max_steps)

    def _start(self, key: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _transition(self, key, obs, action) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(next_obs [O], reward, terminated)``."""
        raise NotImplementedError

    def reset_env(self, key: jax.Array, params: ProbeParams) -> tuple[jax.Array, ProbeState]:
        obs = self._start(key)
        return obs, ProbeState(obs=obs, time=0)

    def step_env(self, key, state: ProbeState, action, params: ProbeParams):
        obs, reward, terminated = self._transition(key, state.obs, action)
        state = ProbeState(obs=obs, time=state.time + 1)
        return obs, state, jnp.asarray(reward, jnp.float32), jnp.asarray(terminated), {}

    def get_obs(self, state: ProbeState, params=None, key=None) -> jax.Array:
        return state.obs

    def is_terminated(self, state: ProbeState, params: ProbeParams) -> jax.Array:
        return jnp.array(False)

    def observation_space(self, params: ProbeParams) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, (self.obs_dim,), jnp.float32)


class BanditProbe(_Probe):
    """Contextual bandit: observe a one-hot context ``c``, reward 1 for action ``c``, else 0.

    ``episode_steps=None``: one step, then the episode terminates. ``episode_steps=k``: a fresh context
    every step, never terminating, truncated after ``k`` steps. The observation carries no time, so
    under the optimal policy every state is worth ``V = 1 / (1 - gamma)`` (and ``Q(s, c) = V``,
    ``Q(s, a != c) = gamma V``) -- but only for an agent that bootstraps through the time limit; one that
    treats it as termination sees the values of a ``k``-step horizon, at most ``(1 - gamma^k) / (1 - gamma)``.
    """

    def __init__(self, num_actions: int = 2, episode_steps: int | None = None):
        if num_actions < 2:
            raise ValueError(f"{num_actions=} must be >= 2")
        if episode_steps is not None and episode_steps < 1:
            raise ValueError(f"{episode_steps=} must be >= 1 or None")
        self._num_actions = num_actions
        self.obs_dim = num_actions
        self.episode_steps = episode_steps
        self.max_steps = episode_steps or 1

    def _start(self, key):
        return jax.nn.one_hot(jax.random.randint(key, (), 0, self._num_actions), self._num_actions)

    def _transition(self, key, obs, action):
        reward = (jnp.argmax(obs) == action).astype(jnp.float32)
        if self.episode_steps is None:
            return obs, reward, jnp.array(True)
        return self._start(key), reward, jnp.array(False)

    @property
    def num_actions(self) -> int:
        return self._num_actions

    def action_space(self, params=None) -> spaces.Discrete:
        return spaces.Discrete(self._num_actions)


class SurvivalProbe(_Probe):
    """Reward 1 every step whatever the action (of 2); after each step the episode terminates with probability
    ``p``. The observation is constant, so every value is a number: ``Q(s, a) = 1 / (1 - gamma (1 - p))``,
    the mean of the bootstrap target ``y = 1 + gamma (1 - terminated) Q``, which takes two values.

    A loss whose minimiser is not the mean of ``y`` converges elsewhere: the Huber loss with threshold
    ``delta`` below ``|y - Q|`` at the terminal steps balances ``p delta`` against the non-terminal steps' TD
    error, ``Q = (1 - delta p / (1 - p)) / (1 - gamma)`` (for ``p <= 1/2`` and ``Q > 1 + delta``; gamma 0.9,
    p 0.2: 7.5 instead of 3.57).
    """

    max_steps = 1000

    def __init__(self, terminate_prob: float = 0.2):
        if not 0.0 < terminate_prob < 1.0:
            raise ValueError(f"{terminate_prob=} must be in (0, 1)")
        self.terminate_prob = terminate_prob

    def _start(self, key):
        return jnp.ones((1,), jnp.float32)

    def _transition(self, key, obs, action):
        return obs, jnp.float32(1.0), jax.random.uniform(key) < self.terminate_prob

    @property
    def num_actions(self) -> int:
        return 2

    def action_space(self, params=None) -> spaces.Discrete:
        return spaces.Discrete(2)


class ContinuousProbe(_Probe):
    """Continuous task: observe a target ``x ~ U[-1, 1]``, act ``a`` in ``[-1, 1]``.

    ``episode_steps=None``: reward ``-(a - x)^2``, then the episode terminates. ``episode_steps=k``: reward
    ``1 - (a - x)^2`` and a fresh target every step, never terminating, truncated after ``k`` steps. The
    reward of 1 per step gives the bootstrapped part of the value a known size: under the optimal policy
    (``a = x``) every state is worth ``V = 1 / (1 - gamma)`` and ``Q(s, a) = V - (a - x)^2``, for an agent
    that bootstraps through the time limit; one that treats it as termination sees at most
    ``(1 - gamma^k) / (1 - gamma)``. The reward does not depend on the state reached, so the optimal action
    is ``x`` at every step.
    """

    def __init__(self, episode_steps: int | None = None):
        if episode_steps is not None and episode_steps < 1:
            raise ValueError(f"{episode_steps=} must be >= 1 or None")
        self.episode_steps = episode_steps
        self.max_steps = episode_steps or 1

    def _start(self, key):
        return jax.random.uniform(key, (1,), minval=-1.0, maxval=1.0)

    def _transition(self, key, obs, action):
        action = jnp.reshape(action, (1,))
        error = jnp.sum((action - obs) ** 2)
        if self.episode_steps is None:
            return obs, -error, jnp.array(True)
        return self._start(key), 1.0 - error, jnp.array(False)

    def action_space(self, params=None) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, (1,), jnp.float32)


PROBE_ENVS: dict[str, Any] = {
    "Bandit-probe": BanditProbe,
    "TimeLimitBandit-probe": functools.partial(BanditProbe, episode_steps=5),
    "Survival-probe": SurvivalProbe,
    "Continuous-probe": ContinuousProbe,
    "ContinuousTimeLimit-probe": functools.partial(ContinuousProbe, episode_steps=5),
}
"""Probe factories by id; ``make_env`` accepts these ids beside gymnax's."""
