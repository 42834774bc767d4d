"""Environments by id, their action spaces, and batched wrappers in the gymnax 1.x API.

gymnax 1.x ``step`` returns ``(obs, state, reward, terminated, truncated, info)`` and auto-resets:
when ``terminated | truncated``, ``obs`` is already the first observation of the next episode and
the true last observation is ``info["final_observation"]``. Every wrapper here keeps that contract,
so a learner can bootstrap from ``final_observation`` on truncation and not on termination.

    env, params = make_vec_env("CartPole-v1", num_envs=4)          # VecEnv -> EpisodeStatistics
    obs, state = env.reset(key, params)                            # obs [E, 4]
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

``EpisodeStatistics`` adds ``info["episode_return"]`` / ``["episode_length"]`` (the completed
episode's totals where ``info["episode_done"]``) and ``info["last_episode_return"]`` (each env's
most recent completed return, NaN before its first). ``NormalizeObservation`` and ``NormalizeReward``
keep running statistics over the batch (Welford/Chan merge) inside the state, so they are jittable
and checkpointable; the statistics wrapper sits inside them, so reported returns are raw.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from functools import partial
from typing import Any

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import spaces

from jaxlab.rl.probe_envs import PROBE_ENVS

__all__ = [
    "ActionSpec",
    "EpisodeStatistics",
    "NormalizeObservation",
    "NormalizeReward",
    "RunningMeanStd",
    "StepDraw",
    "VecEnv",
    "check_action_space",
    "known_env_ids",
    "make_env",
    "make_vec_env",
    "normalize",
    "update_running_mean_std",
]


# ----------------------------------------------------------------------------- creation and spaces

def known_env_ids() -> list[str]:
    """gymnax's registered ids followed by the probe ids."""
    return list(gymnax.registered_envs) + list(PROBE_ENVS)


def make_env(env_id: str, **env_kwargs) -> tuple[Any, Any]:
    """``(env, default_params)`` for a gymnax or probe id; ``ValueError`` naming close matches otherwise."""
    if env_id in PROBE_ENVS:
        env = PROBE_ENVS[env_id](**env_kwargs)
        return env, env.default_params
    if env_id not in gymnax.registered_envs:
        close = difflib.get_close_matches(env_id, known_env_ids(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown env_id={env_id!r}: gymnax does not know it.{hint} "
                         f"Known ids: {', '.join(known_env_ids())}")
    return gymnax.make(env_id, **env_kwargs)


@dataclasses.dataclass(frozen=True)
class ActionSpec:
    """What an agent needs to know about an action space.

    ``kind`` is ``"discrete"`` (``num_actions`` choices, actions are int32 scalars) or ``"continuous"``
    (actions ``[*shape]`` in the box ``[low, high]``, bounds broadcast to ``shape``).
    """

    kind: str
    num_actions: int = 0
    shape: tuple[int, ...] = ()
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()

    @classmethod
    def from_env(cls, env, params) -> ActionSpec:
        space = env.action_space(params)
        if isinstance(space, spaces.Discrete):
            return cls("discrete", num_actions=int(space.n))
        if isinstance(space, spaces.Box):
            shape = tuple(space.shape) if space.shape else (1,)
            low = np.broadcast_to(np.asarray(space.low, np.float32), shape).reshape(-1)
            high = np.broadcast_to(np.asarray(space.high, np.float32), shape).reshape(-1)
            return cls("continuous", shape=shape, low=tuple(map(float, low)), high=tuple(map(float, high)))
        raise ValueError(f"unsupported action space {space!r}: only Discrete and Box are handled")

    @property
    def dim(self) -> int:
        """Network output width: ``num_actions`` (discrete) or the flat action size (continuous)."""
        return self.num_actions if self.kind == "discrete" else math.prod(self.shape)

    def bounds(self) -> tuple[jax.Array, jax.Array]:
        """``(low, high)`` as ``[*shape]`` arrays (continuous only)."""
        return (jnp.asarray(self.low, jnp.float32).reshape(self.shape),
                jnp.asarray(self.high, jnp.float32).reshape(self.shape))

    def to_env(self, action: jax.Array) -> jax.Array:
        """The action handed to the env: continuous actions are clipped into the box."""
        if self.kind == "discrete":
            return action
        low, high = self.bounds()
        return jnp.clip(action, low, high)


def check_action_space(env_id: str, algo: str, supported: tuple[str, ...]) -> ActionSpec:
    """The env's ``ActionSpec``; ``ValueError`` if ``algo`` cannot act in it (e.g. DDPG on a discrete env)."""
    env, params = make_env(env_id)
    spec = ActionSpec.from_env(env, params)
    if spec.kind not in supported:
        raise ValueError(f"{algo} needs a {' or '.join(supported)} action space, but env_id={env_id!r} "
                         f"has a {spec.kind} one ({env.action_space(params)!r})")
    return spec


# ----------------------------------------------------------------------------- running statistics

@struct.dataclass
class RunningMeanStd:
    """Mean and (population) variance of every sample seen so far, elementwise over ``[*shape]``."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, shape: tuple[int, ...] = ()) -> RunningMeanStd:
        return cls(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32), jnp.float32(1e-4))


def update_running_mean_std(stats: RunningMeanStd, x: jax.Array) -> RunningMeanStd:
    """Merge a batch ``x [B, *shape]`` into ``stats`` (Chan, Golub & LeVeque 1979, parallel variance)."""
    batch_mean, batch_var, n = jnp.mean(x, axis=0), jnp.var(x, axis=0), x.shape[0]
    total = stats.count + n
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * n / total
    m2 = stats.var * stats.count + batch_var * n + delta**2 * stats.count * n / total
    return RunningMeanStd(mean, m2 / total, total)


def normalize(stats: RunningMeanStd, x: jax.Array, clip: float = 10.0, eps: float = 1e-8) -> jax.Array:
    """``clip((x - mean) / sqrt(var + eps), -clip, clip)``."""
    return jnp.clip((x - stats.mean) / jnp.sqrt(stats.var + eps), -clip, clip)


# ----------------------------------------------------------------------------- wrappers

class _Wrapper:
    """Forwards attributes (spaces, ``default_params``, ``num_actions``) to the wrapped env."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        return getattr(self._env, name)


@struct.dataclass
class StepDraw:
    """The randomness of one auto-resetting ``VecEnv.step``, drawn ahead of the step (:meth:`VecEnv.draw_steps`):
    what gymnax's ``Environment.step`` draws from each env's key, ``key_step, key_reset = split(key)``."""

    key_step: jax.Array  # [E] each env's key for its transition (``step_env``)
    reset_obs: Any       # [E, *O] each env's next first observation, used where its episode ends
    reset_state: Any     # [E, ...] and its state


def _draws_ahead(env) -> bool:
    """Whether ``env``'s step is gymnax's auto-resetting ``Environment.step`` itself (not overridden), whose
    pieces (``step_env``, ``is_truncated``, ``reset_env``) :class:`VecEnv` can then run with presampled resets."""
    return isinstance(env, gymnax.environments.environment.Environment) and (
        type(env).step is gymnax.environments.environment.Environment.step)


class VecEnv(_Wrapper):
    """``num_envs`` copies of an env stepped together (``jax.vmap``); one key per call, split per env.

    ``step`` takes a key, or the step's randomness drawn ahead as a :class:`StepDraw`: gymnax's step draws a
    reset state from a fresh key on *every* step (kept where the episode ends), so a scan over steps pays one
    PRNG call and one ``reset_env`` per step. :meth:`draw_steps` draws them for ``T`` steps in one batched call
    before the scan, with the same keys, so the steps give the same numbers bit for bit."""

    def __init__(self, env, num_envs: int):
        if num_envs < 1:
            raise ValueError(f"{num_envs=} must be >= 1")
        super().__init__(env)
        self.num_envs = num_envs
        self.draws_ahead = _draws_ahead(env)
        """Whether :meth:`draw_steps` is available (the env steps by gymnax's own auto-resetting ``step``)."""

    @partial(jax.jit, static_argnums=0)
    def reset(self, key, params):
        return jax.vmap(self._env.reset, in_axes=(0, None))(jax.random.split(key, self.num_envs), params)

    @partial(jax.jit, static_argnums=0)
    def step(self, key, state, action, params):
        if isinstance(key, StepDraw):
            return jax.vmap(self._step_drawn, in_axes=(0, 0, 0, None))(key, state, action, params)
        keys = jax.random.split(key, self.num_envs)
        return jax.vmap(self._env.step, in_axes=(0, 0, 0, None))(keys, state, action, params)

    def draw_steps(self, keys: jax.Array, params) -> StepDraw:
        """The :class:`StepDraw` of each of ``keys [T]`` (leaves ``[T, E, ...]``): step ``t`` given ``draw[t]``
        equals the step given ``keys[t]``."""
        if not self.draws_ahead:
            raise ValueError(f"{type(self._env).__name__} overrides gymnax's step: its randomness cannot be drawn "
                             "ahead; pass keys")

        def one(key):  # the split of step(key) and of gymnax's Environment.step, for every env
            pairs = jax.vmap(jax.random.split)(jax.random.split(key, self.num_envs))  # [E, 2, *key]
            obs, state = jax.vmap(self._env.reset_env, in_axes=(0, None))(pairs[:, 1], params)
            return StepDraw(pairs[:, 0], obs, state)

        return jax.vmap(one)(keys)

    def _step_drawn(self, draw: StepDraw, state, action, params):
        """gymnax 1.x's ``Environment.step`` for one env with its reset drawn ahead."""
        obs_st, state_st, reward, terminated, info = self._env.step_env(draw.key_step, state, action, params)
        truncated = self._env.is_truncated(state_st, params)
        done = jnp.logical_or(terminated, truncated)
        state = jax.tree.map(lambda x, y: jax.lax.select(done, x, y), draw.reset_state, state_st)
        obs = jax.tree.map(lambda x, y: jax.lax.select(done, x, y), draw.reset_obs, obs_st)
        info = {**info, "terminated": terminated, "truncated": truncated, "final_observation": obs_st}
        return obs, state, reward, terminated, truncated, info


@struct.dataclass
class EpisodeStatisticsState:
    env_state: Any
    episode_return: jax.Array       # [E] undiscounted return of the running episode
    episode_length: jax.Array       # [E] steps of the running episode
    last_episode_return: jax.Array  # [E] most recent completed return (NaN before the first)


class EpisodeStatistics(_Wrapper):
    """Tracks undiscounted returns and lengths; reports completed episodes in ``info``."""

    def reset(self, key, params):
        obs, env_state = self._env.reset(key, params)
        batch = jax.tree.leaves(obs)[0].shape[:1]
        zeros = jnp.zeros(batch, jnp.float32)
        return obs, EpisodeStatisticsState(env_state, zeros, jnp.zeros(batch, jnp.int32), zeros + jnp.nan)

    def step(self, key, state: EpisodeStatisticsState, action, params):
        obs, env_state, reward, terminated, truncated, info = self._env.step(key, state.env_state, action, params)
        done = jnp.logical_or(terminated, truncated)
        ret = state.episode_return + reward
        length = state.episode_length + 1
        last = jnp.where(done, ret, state.last_episode_return)
        state = EpisodeStatisticsState(env_state, jnp.where(done, 0.0, ret), jnp.where(done, 0, length), last)
        info = {**info, "episode_done": done, "episode_return": ret, "episode_length": length,
                "last_episode_return": last}
        return obs, state, reward, terminated, truncated, info


@struct.dataclass
class NormalizeObservationState:
    env_state: Any
    obs_stats: RunningMeanStd


class NormalizeObservation(_Wrapper):
    """Standardise observations with running statistics of every observation returned so far.

    Statistics are updated with each returned batch before normalising it; ``final_observation``
    is normalised with the same statistics so bootstrapped values see the same input scale.
    """

    def __init__(self, env, clip: float = 10.0):
        super().__init__(env)
        self.clip = clip

    def reset(self, key, params):
        obs, env_state = self._env.reset(key, params)
        stats = update_running_mean_std(RunningMeanStd.create(obs.shape[1:]), obs)
        return normalize(stats, obs, self.clip), NormalizeObservationState(env_state, stats)

    def step(self, key, state: NormalizeObservationState, action, params):
        obs, env_state, reward, terminated, truncated, info = self._env.step(key, state.env_state, action, params)
        stats = update_running_mean_std(state.obs_stats, obs)
        info = {**info, "final_observation": normalize(stats, info["final_observation"], self.clip)}
        return (normalize(stats, obs, self.clip), NormalizeObservationState(env_state, stats),
                reward, terminated, truncated, info)


@struct.dataclass
class NormalizeRewardState:
    env_state: Any
    discounted_return: jax.Array  # [E] sum_k gamma^k r_{t-k} since the episode started
    return_stats: RunningMeanStd


class NormalizeReward(_Wrapper):
    """Divide rewards by the running standard deviation of the discounted return (as gymnasium's
    ``NormalizeReward``; Engstrom et al. 2020, "Implementation Matters in Deep RL", Sec. 3)."""

    def __init__(self, env, gamma: float, clip: float = 10.0):
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"{gamma=} must be in (0, 1]")
        super().__init__(env)
        self.gamma, self.clip = gamma, clip

    def reset(self, key, params):
        obs, env_state = self._env.reset(key, params)
        batch = jax.tree.leaves(obs)[0].shape[:1]
        return obs, NormalizeRewardState(env_state, jnp.zeros(batch, jnp.float32), RunningMeanStd.create())

    def step(self, key, state: NormalizeRewardState, action, params):
        obs, env_state, reward, terminated, truncated, info = self._env.step(key, state.env_state, action, params)
        ret = state.discounted_return * self.gamma + reward
        stats = update_running_mean_std(state.return_stats, ret)
        scaled = jnp.clip(reward / jnp.sqrt(stats.var + 1e-8), -self.clip, self.clip)
        done = jnp.logical_or(terminated, truncated)
        state = NormalizeRewardState(env_state, jnp.where(done, 0.0, ret), stats)
        return obs, state, scaled, terminated, truncated, info


def make_vec_env(env_id: str, num_envs: int, *, normalize_obs: bool = False, normalize_reward: bool = False,
                 gamma: float = 0.99, **env_kwargs) -> tuple[Any, Any]:
    """The standard batched stack ``VecEnv -> EpisodeStatistics [-> NormalizeObservation] [-> NormalizeReward]``."""
    env, params = make_env(env_id, **env_kwargs)
    env = EpisodeStatistics(VecEnv(env, num_envs))
    if normalize_obs:
        env = NormalizeObservation(env)
    if normalize_reward:
        env = NormalizeReward(env, gamma)
    return env, params
