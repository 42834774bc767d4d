"""The on-policy actor-critic loop shared by REINFORCE, A2C, PPO and TRPO.

One update: roll the current stochastic policy out for ``rollout_length`` steps in ``num_envs`` envs,
evaluate the critic on both ends of every transition (inside each step, or once afterwards), turn
rewards into advantages and critic targets with the algorithm's estimator (GAE, n-step or Monte-Carlo
returns, all bootstrapping from ``next_obs`` on truncation), then hand the ``Batch`` to the
algorithm's ``learn``.
The algorithm modules hold only their ``learn`` step and config.

The actor and the critic are separate networks with parameters ``{"actor": ..., "critic": ...}``
(TRPO steps the actor by natural gradient and the critic by Adam). Discrete actions use a
categorical policy, continuous ones a diagonal Gaussian with a state-independent ``log_std``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxlab.rl import policies
from jaxlab.rl.core import RLConfig, Train
from jaxlab.train_state import step_key
from jaxlab.rl.losses import normalize_advantages, policy_gradient_loss, value_loss
from jaxlab.rl.networks import Critic, DiscreteActor, GaussianActor
from jaxlab.rl.returns import gae, n_step_returns
from jaxlab.rl.rollout import EnvCarry, Transition, env_reset, episode_metrics, rollout_steps, step_keys
from jaxlab.rl.wrappers import ActionSpec, make_vec_env
from jaxlab.validation import check_positive

__all__ = ["ActorCritic", "Batch", "OnPolicyConfig", "OnPolicyState", "gae_estimator", "make_on_policy_train",
           "minibatches", "n_step_estimator", "policy_gradient_learn", "random_permutation"]


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig(RLConfig):
    """Rollout and advantage settings of the on-policy family."""

    rollout_length: int = 128
    """Environment steps per environment per update (the rollout's ``T``)."""
    normalize_obs: bool = False
    """Standardise observations with running statistics."""
    normalize_reward: bool = False
    """Scale rewards by the running std of the discounted return."""
    log_std_init: float = 0.0
    """Initial log standard deviation of the Gaussian policy (continuous actions)."""
    values_in_rollout: bool = False
    """Evaluate the critic inside each env step (True) or once over the whole rollout afterwards (False).
    Same values, different speed: at PureJaxRL's CartPole sizes the call afterwards ran PPO ~5% faster (1.76
    against 1.84 s for 5e5 steps on one core, 1.69 against 1.78 s on two), A2C ~3% and TRPO ~1%."""

    def __post_init__(self):
        check_positive(self, "rollout_length")
        super().__post_init__()

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.rollout_length


@struct.dataclass
class OnPolicyState:
    params: Any          # {"actor": ..., "critic": ...}
    opt_state: Any
    env: EnvCarry
    key: jax.Array       # base key; update i uses fold_in(key, i)
    step: jax.Array      # updates done


@struct.dataclass
class Batch:
    """What ``learn`` receives; leaves ``[T, E, ...]`` (flatten with ``minibatches``)."""

    obs: jax.Array        # [T, E, *O]
    action: jax.Array     # [T, E, *A]
    log_prob: jax.Array   # [T, E] log pi_old(a|s) at collection
    value: jax.Array      # [T, E] V_old(s)
    advantage: jax.Array  # [T, E]
    target: jax.Array     # [T, E] critic regression target (advantage + value for GAE)


@dataclasses.dataclass(frozen=True)
class ActorCritic:
    """A policy network and a value network with the distribution that goes with the action space."""

    spec: ActionSpec
    actor: Any
    critic: Any

    @classmethod
    def from_config(cls, cfg: OnPolicyConfig, spec: ActionSpec) -> ActorCritic:
        if spec.kind == "discrete":
            actor = DiscreteActor(spec.num_actions, cfg.hidden_sizes, cfg.activation)
        else:
            actor = GaussianActor(spec.dim, cfg.hidden_sizes, cfg.activation, log_std_init=cfg.log_std_init)
        return cls(spec, actor, Critic(cfg.hidden_sizes, cfg.activation))

    def init(self, key: jax.Array, obs: jax.Array) -> dict:
        k_actor, k_critic = jax.random.split(key)
        return {"actor": self.actor.init(k_actor, obs), "critic": self.critic.init(k_critic, obs)}

    def policy(self, actor_params, obs: jax.Array):
        """``pi(.|s)`` for ``obs [B, *O]`` as a distrax distribution over ``[B]`` or ``[B, A]`` actions."""
        out = self.actor.apply(actor_params, obs)
        if self.spec.kind == "discrete":
            return policies.categorical(out)
        mean, log_std = out
        return policies.diag_gaussian(mean, log_std)

    def value(self, critic_params, obs: jax.Array) -> jax.Array:
        return self.critic.apply(critic_params, obs)

    def action_noise(self, keys: jax.Array, batch_size: int) -> jax.Array:
        """The random numbers ``sample_and_log_prob(seed=keys[t])`` would draw on ``[batch_size]`` observations, for
        every key at once (one PRNG call per rollout instead of one per step): the Gumbel noise
        ``[T, B, A]`` of a categorical policy; the keys themselves for a Gaussian one."""
        if self.spec.kind == "discrete":
            return policies.categorical_gumbel(keys, (batch_size, self.spec.num_actions))  # [T, B, A]
        return keys

    def act(self, actor_params, obs: jax.Array, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(a, log pi(a|s))`` with ``a ~ pi(.|s)`` from one row of ``action_noise``: the same numbers as
        ``policy(actor_params, obs).sample_and_log_prob(seed=key)`` with that row's key."""
        if self.spec.kind == "discrete":
            return policies.categorical_sample_and_log_prob(self.actor.apply(actor_params, obs), noise)
        return self.policy(actor_params, obs).sample_and_log_prob(seed=noise)


def random_permutation(key: jax.Array, n: int) -> jax.Array:
    """A uniformly random permutation of ``arange(n)`` (int32 ``[n]``), by the rounds of random sort keys that
    ``jax.random.permutation`` makes, each sorted as one packed uint32 array.

    Each round sorts ``(random key << b) | position`` (``b`` = bits of ``n - 1``; a tie of the ``32 - b`` key
    bits keeps the current order, random after the first round) and reorders by the positions read back from
    the low bits. As many rounds are made as keep the expected number of pairs tied in every round below
    ``1 / n`` (``jax.random.permutation``'s rule for its 32-bit keys): 1 round up to ``n = 256``, 2 up to
    6,501, 3 up to 65,536. A single-operand integer sort is XLA:CPU's fast path: 26 against
    ``jax.random.permutation``'s 55 us at ``n = 512`` (PPO's CartPole batch) and 205 against 1,084 us at
    4,096; the latter's key-value sort had taken a sixth of PPO's learning phase
    (``benchmarks/results/rl-cpu.md``)."""
    if not 1 <= n < 2**31:
        raise ValueError(f"{n=} must be in [1, 2**31)")
    b = max(1, (n - 1).bit_length())  # bits of a position
    rounds = max(1, math.ceil(3 * math.log2(n) / (32 - b)))
    position = jnp.arange(n, dtype=jnp.uint32)
    perm = position
    for k in jax.random.split(key, rounds):
        packed = jax.random.bits(k, (n,), jnp.uint32) >> b << b | position  # [n] (key, position)
        perm = perm[jnp.sort(packed) & jnp.uint32((1 << b) - 1)]
    return perm.astype(jnp.int32)


def minibatches(tree: Any, key: jax.Array, num_minibatches: int) -> Any:
    """Flatten ``[T, E, ...]`` leaves to ``[T*E]``, shuffle (one ``random_permutation`` for every leaf), and
    split into ``[num_minibatches, M, ...]``."""
    n = jax.tree.leaves(tree)[0].shape[0] * jax.tree.leaves(tree)[0].shape[1]
    perm = random_permutation(key, n)
    return jax.tree.map(
        lambda x: x.reshape((n,) + x.shape[2:])[perm].reshape((num_minibatches, -1) + x.shape[2:]), tree)


Estimator = Callable[[Transition, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
Learn = Callable[[Any, Any, Batch, jax.Array], tuple[Any, Any, dict[str, jax.Array]]]


def gae_estimator(gamma: float, gae_lambda: float) -> Estimator:
    """``(traj, values, next_values) -> (advantages, targets)`` by GAE(gamma, lambda)."""
    return lambda traj, v, nv: gae(traj.reward, v, nv, traj.terminated, traj.truncated, gamma, gae_lambda)


def n_step_estimator(gamma: float, n: int) -> Estimator:
    """Advantages ``G^(n) - V`` and targets ``G^(n)`` from ``n``-step returns (``n >= rollout_length``: Monte Carlo
    to the episode's end, bootstrapped where the rollout or a time limit cuts it)."""

    def estimate(traj, values, next_values):
        returns = n_step_returns(traj.reward, next_values, traj.terminated, traj.truncated, gamma, n)
        return returns - values, returns

    return estimate


def policy_gradient_learn(ac: ActorCritic, optimizer, *, ent_coef: float, vf_coef: float,
                          normalize: bool) -> Learn:
    """One gradient step on the whole batch of ``-E[log pi(a|s) A] + vf_coef L^V - ent_coef H``
    (the actor-critic update of REINFORCE with baseline and A2C)."""

    def loss_fn(params, batch: Batch):
        batch = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)  # [T*E, ...]
        dist = ac.policy(params["actor"], batch.obs)
        advantages = normalize_advantages(batch.advantage) if normalize else batch.advantage
        policy_loss = policy_gradient_loss(dist.log_prob(batch.action), advantages)
        v_loss = value_loss(ac.value(params["critic"], batch.obs), batch.target)
        entropy = jnp.mean(dist.entropy())
        loss = policy_loss + vf_coef * v_loss - ent_coef * entropy
        return loss, {"loss": loss, "policy_loss": policy_loss, "value_loss": v_loss, "entropy": entropy}

    def learn(params, opt_state, batch: Batch, key):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state, metrics

    return learn


def make_on_policy_train(cfg: OnPolicyConfig, ac: ActorCritic, *, init_opt: Callable[[Any], Any], learn: Learn,
                         estimator: Estimator) -> Train:
    """Build the ``Train`` of an on-policy algorithm from its ``learn`` step.

    Args:
      ac: the networks (``ActorCritic.from_config(cfg, cfg.action_spec)``), shared with ``learn``.
      init_opt: ``params -> opt_state``.
      learn: ``(params, opt_state, batch, key) -> (params, opt_state, metrics)``.
      estimator: advantages and targets from ``(traj, values [T, E], next_values [T, E])``
        (``gae_estimator`` or ``n_step_estimator``).
    """
    env, env_params = make_vec_env(cfg.env_id, cfg.num_envs, normalize_obs=cfg.normalize_obs,
                                   normalize_reward=cfg.normalize_reward, gamma=cfg.gamma)

    def init(key: jax.Array) -> OnPolicyState:
        k_env, k_net, k_updates = jax.random.split(key, 3)
        carry = env_reset(env, env_params, k_env)
        params = ac.init(k_net, carry.obs)
        return OnPolicyState(params, init_opt(params), carry, k_updates, jnp.zeros((), jnp.int32))

    def update(state: OnPolicyState):
        k_rollout, k_learn = jax.random.split(step_key(state))
        policy_keys, env_keys = step_keys(k_rollout, cfg.rollout_length)  # what rollout(..., k_rollout) would use

        def policy(obs, noise):
            action, log_prob = ac.act(state.params["actor"], obs, noise)
            return action, {"log_prob": log_prob}

        value_fn = functools.partial(ac.value, state.params["critic"])
        carry, traj = rollout_steps(env, env_params, state.env, policy, ac.action_noise(policy_keys, cfg.num_envs),
                                    env_keys, value_fn=value_fn if cfg.values_in_rollout else None)  # [T, E, ...]
        if cfg.values_in_rollout:
            values, next_values = traj.extras["value"], traj.extras["next_value"]  # [T, E] V(s_t), V(s'_t)
        else:  # one critic call on both ends of every transition, [2T * E, *O]
            both = jnp.concatenate([traj.obs, traj.next_obs], axis=0)  # [2T, E, *O]
            flat = value_fn(both.reshape((-1,) + both.shape[2:]))  # [2T * E]
            values, next_values = jnp.split(flat.reshape(both.shape[:2]), 2)
        advantages, targets = estimator(traj, values, next_values)
        batch = Batch(traj.obs, traj.action, traj.extras["log_prob"], values, advantages, targets)
        params, opt_state, learn_metrics = learn(state.params, state.opt_state, batch, k_learn)
        step = state.step + 1
        metrics = {**episode_metrics(traj), "env_steps": step * cfg.steps_per_update, **learn_metrics}
        return OnPolicyState(params, opt_state, carry, state.key, step), metrics

    return Train(init=init, update=update, num_updates=cfg.num_updates, config=cfg)
