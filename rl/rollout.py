"""Vectorised environment interaction with ``lax.scan``: transitions, rollouts, episode metrics.

A rollout runs a policy in a batch of ``E`` envs (a ``make_vec_env`` stack) for ``T`` steps and
returns the ``Transition`` pytree with leaves ``[T, E, ...]``. Each transition keeps the gymnax 1.x
distinction the learners need (Pardo et al. 2018, "Time Limits in Reinforcement Learning"):

* ``terminated``: the episode reached a terminal state; the value after it is 0, do not bootstrap;
* ``truncated``: the time limit cut the episode; bootstrap from ``next_obs``;
* ``next_obs``: the observation *after* the action and *before* auto-reset (gymnax's
  ``info["final_observation"]``), so ``(obs, action, reward, next_obs)`` is always a true transition.

    carry = env_reset(env, params, key)
    carry, traj = rollout(env, params, carry, policy, key, rollout_length=128)   # traj.obs [T, E, *O]
    metrics = episode_metrics(traj)                                          # mean completed return ...

``policy(obs [E, *O], key) -> (action [E, *A], extras)``; ``extras`` (e.g. log-probabilities) is stored
in the transition. Continuous actions are clipped into the action box before reaching the env;
the unclipped action is stored (its log-probability is the one the policy computed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxlab.rl.wrappers import ActionSpec

__all__ = ["EnvCarry", "Transition", "env_reset", "env_step", "episode_metrics", "rollout", "rollout_steps",
           "step_keys"]

Policy = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]


@struct.dataclass
class EnvCarry:
    """What interaction carries from one step (or rollout) to the next."""

    state: Any       # the wrapper stack's state, batched over E
    obs: jax.Array   # [E, *O] current observations (the policy's input)


@struct.dataclass
class Transition:
    """One step of ``E`` envs; a rollout stacks ``T`` of them (leaves ``[T, E, ...]``)."""

    obs: jax.Array          # [E, *O] observation the action was chosen in
    action: jax.Array       # [E, *A] the policy's action (before clipping into the box)
    reward: jax.Array       # [E] (normalised if the stack normalises rewards)
    terminated: jax.Array   # [E] bool, terminal state reached: no bootstrap
    truncated: jax.Array    # [E] bool, time limit (and not terminated): bootstrap from next_obs
    next_obs: jax.Array     # [E, *O] observation after the action, before auto-reset
    extras: Any             # policy outputs, e.g. {"log_prob": [E]}
    episode_done: jax.Array         # [E] bool, an episode ended at this step
    episode_return: jax.Array       # [E] undiscounted return of the episode so far (completed if done)
    episode_length: jax.Array       # [E] its length
    last_episode_return: jax.Array  # [E] most recent completed return of each env (NaN before the first)

    @property
    def done(self) -> jax.Array:
        """``terminated | truncated``: the next observation starts a new episode."""
        return jnp.logical_or(self.terminated, self.truncated)


def env_reset(env, params, key: jax.Array) -> EnvCarry:
    """Reset every env of a vectorised stack."""
    obs, state = env.reset(key, params)
    return EnvCarry(state=state, obs=obs)


def env_step(env, params, carry: EnvCarry, action: jax.Array, key: jax.Array,
             extras: Any = None) -> tuple[EnvCarry, Transition]:
    """Step every env with ``action [E, *A]``; returns the new carry and the transition."""
    spec = ActionSpec.from_env(env, params)
    obs, state, reward, terminated, truncated, info = env.step(key, carry.state, spec.to_env(action), params)
    terminated = jnp.asarray(terminated, bool)
    transition = Transition(
        obs=carry.obs, action=action, reward=jnp.asarray(reward, jnp.float32), terminated=terminated,
        truncated=jnp.logical_and(jnp.asarray(truncated, bool), jnp.logical_not(terminated)),
        next_obs=info["final_observation"], extras={} if extras is None else extras,
        episode_done=info["episode_done"], episode_return=info["episode_return"],
        episode_length=info["episode_length"], last_episode_return=info["last_episode_return"])
    return EnvCarry(state=state, obs=obs), transition


def step_keys(key: jax.Array, rollout_length: int) -> tuple[jax.Array, jax.Array]:
    """The keys ``rollout`` gives step ``t``: ``(k_policy[t], k_env[t]) = split(split(key, T)[t])``, each ``[T]``.

    Drawn for all ``T`` steps in one PRNG call before the scan (a split inside the scan body costs one
    threefry call per step); the numbers are the same as splitting step by step."""
    pairs = jax.vmap(jax.random.split)(jax.random.split(key, rollout_length))  # [T, 2, *key]
    return pairs[:, 0], pairs[:, 1]


def rollout(env, params, carry: EnvCarry, policy: Policy, key: jax.Array, rollout_length: int,
            value_fn: Callable[[jax.Array], jax.Array] | None = None) -> tuple[EnvCarry, Transition]:
    """Run ``policy`` for ``rollout_length`` steps with ``lax.scan``; the transition leaves are ``[T, E, ...]``.

    With ``value_fn`` (``obs [N, *O] -> [N]``, a critic), each step also evaluates it on both ends of the
    transition in one call on ``[2E, *O]`` and stores ``extras["value"]`` (of ``obs``) and
    ``extras["next_value"]`` (of ``next_obs``), each ``[E]``; ``policy``'s extras must then be a dict.
    The on-policy trainers call the critic once over the whole ``[2T, E]`` rollout afterwards by default
    (``OnPolicyConfig.values_in_rollout=False``): same values, and at PureJaxRL's CartPole sizes ~5% faster on
    one core and on two (PPO, whole runs side by side); an early measurement that found the in-step form
    ~1.3x faster was taken under another process's load.
    """
    policy_keys, env_keys = step_keys(key, rollout_length)
    return rollout_steps(env, params, carry, policy, policy_keys, env_keys, value_fn)


def rollout_steps(env, params, carry: EnvCarry, policy: Callable[[jax.Array, Any], tuple[jax.Array, Any]],
                  policy_inputs: Any, env_keys: jax.Array,
                  value_fn: Callable[[jax.Array], jax.Array] | None = None) -> tuple[EnvCarry, Transition]:
    """``rollout`` with every step's policy input given: step ``t`` acts with ``policy(obs, policy_inputs[t])``
    and steps the envs with ``env_keys[t]`` (``T`` = their leading axis).

    ``rollout`` passes the keys of ``step_keys``; a policy whose randomness does not depend on the
    observation can instead take numbers drawn for the whole rollout in one call before the scan
    (``policies.categorical_gumbel``), which on CPU costs one PRNG call per rollout instead of one per step.
    For the same reason the envs' auto-reset draws (a reset state from a fresh key at every step, kept where an
    episode ends) are made for all ``T`` steps before the scan when the stack allows it
    (``wrappers.VecEnv.draw_steps``): the same keys, so the same transitions.
    """

    if getattr(env, "draws_ahead", False):  # a VecEnv of gymnax's step: every step's reset drawn in one call
        env_keys = env.draw_steps(env_keys, params)

    def one_step(carry: EnvCarry, xs):
        policy_input, k_env = xs
        action, extras = policy(carry.obs, policy_input)
        carry, transition = env_step(env, params, carry, action, k_env, extras)
        if value_fn is not None:
            if not isinstance(transition.extras, dict):
                raise TypeError(f"with value_fn the policy's extras must be a dict, got {type(extras).__name__}")
            E = carry.obs.shape[0]
            both = value_fn(jnp.concatenate([transition.obs, transition.next_obs], axis=0))  # [2E]
            transition = transition.replace(
                extras={**transition.extras, "value": both[:E], "next_value": both[E:]})
        return carry, transition

    return jax.lax.scan(one_step, carry, (policy_inputs, env_keys))


def episode_metrics(traj: Transition) -> dict[str, jax.Array]:
    """Mean return and length of the episodes completed in ``traj`` (any leading axes), and their count.

    If no episode ended in ``traj``, the return is the mean over envs of each env's most recent
    completed return (NaN until some env has completed one) and the length is NaN, so a learning curve
    never drops to an artificial zero between updates that complete no episode.
    """
    done = traj.episode_done
    n = jnp.sum(done)
    denom = jnp.maximum(n, 1)
    mean_return = jnp.sum(jnp.where(done, traj.episode_return, 0.0)) / denom
    mean_length = jnp.sum(jnp.where(done, traj.episode_length, 0)) / denom
    last = traj.last_episode_return.reshape(-1, traj.last_episode_return.shape[-1])[-1]  # [E] at the last step
    seen = jnp.isfinite(last)
    fallback = jnp.where(jnp.any(seen), jnp.sum(jnp.where(seen, last, 0.0)) / jnp.maximum(jnp.sum(seen), 1),
                         jnp.nan)
    return {"episode_return": jnp.where(n > 0, mean_return, fallback),
            "episode_length": jnp.where(n > 0, mean_length, jnp.nan),
            "episodes": n}
