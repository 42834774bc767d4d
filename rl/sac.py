"""Soft Actor-Critic with automatic entropy tuning (Haarnoja et al. 2018, "Soft Actor-Critic
Algorithms and Applications").

Maximum-entropy RL: the policy maximises ``E[sum_t r_t + alpha H(pi(.|s_t))]``.

* Critics (two, clipped double Q): regress ``Q_i(s, a)`` onto
  ``y = r + gamma (1 - terminated) (min_j Q'_j(s', a') - alpha log pi(a'|s'))``, ``a' ~ pi(.|s')`` (eq. 5-6);
* actor: a tanh-squashed Gaussian minimising ``E[alpha log pi(a|s) - min_j Q_j(s, a)]`` with the
  reparameterised ``a = tanh(mu + sigma eps)`` (eq. 7, 11);
* temperature: ``log alpha`` minimises ``E[-alpha (log pi(a|s) + H_target)]`` with ``H_target = -dim(A)``
  (eq. 18), so the policy's entropy is held near the target;
* target critics track the online ones by Polyak averaging with rate ``tau``.

Actions live in the unit box inside the agent (``log pi`` and the entropy target are of unit-box
actions) and are scaled onto the env's box when acting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxlab.rl.core import Train
from jaxlab.rl.networks import ContinuousQ, GaussianActor, polyak_update
from jaxlab.rl.off_policy import Agent, OffPolicyConfig, make_off_policy_train
from jaxlab.rl.policies import scale_action, tanh_gaussian, unscale_action
from jaxlab.validation import check_greater, check_range

__all__ = ["SACConfig", "SACState", "alpha_loss", "make_agent", "make_train", "soft_td_target"]


@dataclasses.dataclass(frozen=True)
class SACConfig(OffPolicyConfig):
    """SAC hyperparameters; defaults tuned for Pendulum-v1 in 2e5 steps."""

    ALGO: ClassVar[str] = "SAC"
    ACTION_SPACES: ClassVar[tuple[str, ...]] = ("continuous",)

    env_id: str = "Pendulum-v1"
    total_timesteps: int = 200_000
    num_envs: int = 8
    learning_rate: float = 1e-3
    """Adam step size of the critics, the actor and the temperature."""
    max_grad_norm: float = 0.0
    hidden_sizes: tuple[int, ...] = (128, 128)
    activation: str = "relu"
    buffer_size: int = 200_000
    batch_size: int = 128
    learning_starts: int = 10_000
    tau: float = 0.005
    """Polyak rate of the target critics."""
    init_alpha: float = 1.0
    """Initial entropy temperature."""
    autotune_alpha: bool = True
    """Learn the temperature towards target_entropy (otherwise alpha stays init_alpha)."""
    target_entropy_scale: float = 1.0
    """The entropy target is -target_entropy_scale * dim(A)."""

    def __post_init__(self):
        check_range(self, "tau", 0.0, 1.0, open_low=True)
        check_greater(self, "init_alpha")
        super().__post_init__()

    @property
    def target_entropy(self) -> float:
        """``H_target = -target_entropy_scale * dim(A)`` (Haarnoja et al. 2018, Sec. 5: ``-dim(A)``)."""
        return -self.target_entropy_scale * self.action_spec.dim


@struct.dataclass
class SACState:
    actor_params: dict
    critic_params: dict
    target_critic_params: dict
    log_alpha: jax.Array
    actor_opt_state: optax.OptState
    critic_opt_state: optax.OptState
    alpha_opt_state: optax.OptState


def soft_td_target(cfg: SACConfig, policy_fn: Callable, critic_fn: Callable, agent: SACState, batch: dict,
                   key: jax.Array) -> jax.Array:
    """The critics' regression target ``y [B]``, a constant (no gradient flows through it):
    ``y = r + gamma (1 - terminated) (min_k Q'_k(s', a') - alpha log pi(a'|s'))`` with ``a' ~ pi(.|s')``
    drawn with ``key`` from the *online* actor and ``Q'`` the *target* critics (Haarnoja et al. 2018, eq. 3
    and 6: the soft value adds the entropy bonus ``-alpha log pi``). ``policy_fn(params, obs [B, *O])`` gives
    a distribution with ``sample_and_log_prob`` (``[B, A]``, ``[B]``), ``critic_fn(params, obs, action) -> [K, B]``.
    """
    alpha = jnp.exp(agent.log_alpha)
    next_action, next_log_prob = policy_fn(agent.actor_params, batch["next_obs"]).sample_and_log_prob(seed=key)
    next_q = jnp.min(critic_fn(agent.target_critic_params, batch["next_obs"], next_action), axis=0)  # [B]
    soft_value = next_q - alpha * next_log_prob
    return jax.lax.stop_gradient(
        batch["reward"] + cfg.gamma * (1.0 - batch["terminated"].astype(jnp.float32)) * soft_value)


def alpha_loss(log_alpha: jax.Array, entropy: jax.Array, target_entropy: float) -> jax.Array:
    """The temperature's loss ``-alpha (H_target - H)`` (Haarnoja et al. 2018, eq. 18 with ``H = -E[log pi]``,
    a constant here): its gradient descent raises ``alpha`` while the entropy is below the target and lowers
    it while above."""
    return -jnp.exp(log_alpha) * (target_entropy - jax.lax.stop_gradient(entropy))


def make_agent(cfg: SACConfig) -> Agent:
    spec = cfg.action_spec
    low, high = spec.bounds()
    actor = GaussianActor(spec.dim, cfg.hidden_sizes, cfg.activation, state_dependent_std=True)
    critic = ContinuousQ(2, cfg.hidden_sizes, cfg.activation)
    opt = cfg.optimizer()
    target_entropy = cfg.target_entropy

    def policy(actor_params, obs):
        return tanh_gaussian(*actor.apply(actor_params, obs))  # unit box

    def init(key, obs, action):
        k_actor, k_critic = jax.random.split(key)
        actor_params = actor.init(k_actor, obs)
        critic_params = critic.init(k_critic, obs, unscale_action(action, low, high).reshape(obs.shape[0], -1))
        log_alpha = jnp.log(jnp.float32(cfg.init_alpha))
        return SACState(actor_params, critic_params, critic_params, log_alpha,
                        opt.init(actor_params), opt.init(critic_params), opt.init(log_alpha))

    def act(agent: SACState, obs, key, env_steps):
        unit = policy(agent.actor_params, obs).sample(seed=key)  # [E, A]
        return scale_action(unit.reshape((-1, *spec.shape)), low, high)

    def critic_loss(critic_params, agent: SACState, batch, key):
        y = soft_td_target(cfg, policy, critic.apply, agent, batch, key)  # [B]
        action = unscale_action(batch["action"], low, high).reshape(batch["obs"].shape[0], -1)
        q = critic.apply(critic_params, batch["obs"], action)  # [2, B]
        loss = 0.5 * jnp.mean(jnp.sum((q - y) ** 2, axis=0))
        return loss, {"critic_loss": loss, "q_value": jnp.mean(q)}

    def actor_loss(actor_params, critic_params, log_alpha, obs, key):
        action, log_prob = policy(actor_params, obs).sample_and_log_prob(seed=key)  # reparameterised
        q = jnp.min(critic.apply(critic_params, obs, action), axis=0)
        loss = jnp.mean(jnp.exp(log_alpha) * log_prob - q)
        return loss, {"actor_loss": loss, "entropy": -jnp.mean(log_prob)}

    def learn(agent: SACState, batch, key, env_steps):
        k_critic, k_actor = jax.random.split(key)
        grads, metrics = jax.grad(critic_loss, has_aux=True)(agent.critic_params, agent, batch, k_critic)
        updates, critic_opt_state = opt.update(grads, agent.critic_opt_state, agent.critic_params)
        critic_params = optax.apply_updates(agent.critic_params, updates)

        grads, actor_metrics = jax.grad(actor_loss, has_aux=True)(agent.actor_params, critic_params,
                                                                    agent.log_alpha, batch["obs"], k_actor)
        updates, actor_opt_state = opt.update(grads, agent.actor_opt_state, agent.actor_params)
        actor_params = optax.apply_updates(agent.actor_params, updates)

        log_alpha, alpha_opt_state = agent.log_alpha, agent.alpha_opt_state
        if cfg.autotune_alpha:
            grad = jax.grad(alpha_loss)(agent.log_alpha, actor_metrics["entropy"], target_entropy)
            updates, alpha_opt_state = opt.update(grad, agent.alpha_opt_state, agent.log_alpha)
            log_alpha = optax.apply_updates(agent.log_alpha, updates)

        target = polyak_update(critic_params, agent.target_critic_params, cfg.tau)
        state = SACState(actor_params, critic_params, target, log_alpha, actor_opt_state, critic_opt_state,
                         alpha_opt_state)
        return state, {**metrics, **actor_metrics, "alpha": jnp.exp(log_alpha)}

    return Agent(init=init, act=act, learn=learn)


def make_train(cfg: SACConfig) -> Train:
    """``train(key) -> {"state", "metrics"}`` for SAC; jit- and vmap-able."""
    return make_off_policy_train(cfg, make_agent(cfg))
