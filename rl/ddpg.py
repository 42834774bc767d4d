"""Deep Deterministic Policy Gradient (Lillicrap et al. 2016, "Continuous control with deep RL").

A deterministic actor ``mu(s)`` in the action box explores with Gaussian noise (as in Fujimoto et al.
2018's DDPG baseline, in place of the original Ornstein-Uhlenbeck process); a critic regresses
``Q(s, a)`` onto ``y = r + gamma (1 - terminated) Q'(s', mu'(s'))`` from replay, the actor ascends
``Q(s, mu(s))`` (the deterministic policy gradient, Silver et al. 2014), and both targets track the
online networks by Polyak averaging with rate ``tau``.

The agent here is written once for the deterministic-actor family: TD3 (``jaxlab.rl.td3``) is this agent
with Fujimoto et al.'s three changes switched on, ``num_critics=2`` (clipped double Q: the target takes
the minimum), ``target_noise > 0`` (target policy smoothing) and ``policy_delay > 1`` (the actor and the
targets update every ``policy_delay`` critic steps). Actions are in the unit box inside the agent.
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
from jaxlab.rl.networks import ContinuousQ, DeterministicActor, polyak_update
from jaxlab.rl.off_policy import Agent, OffPolicyConfig, make_off_policy_train
from jaxlab.rl.policies import scale_action, unscale_action
from jaxlab.validation import check, check_greater, check_positive, check_range

__all__ = ["DDPGConfig", "DeterministicState", "make_agent", "make_train", "td_target"]


@dataclasses.dataclass(frozen=True)
class DDPGConfig(OffPolicyConfig):
    """DDPG hyperparameters; defaults tuned for Pendulum-v1 in 2e5 steps."""

    ALGO: ClassVar[str] = "DDPG"
    ACTION_SPACES: ClassVar[tuple[str, ...]] = ("continuous",)

    env_id: str = "Pendulum-v1"
    total_timesteps: int = 200_000
    num_envs: int = 8
    learning_rate: float = 1e-3
    """Adam step size of the critic."""
    actor_learning_rate: float = 1e-3
    """Adam step size of the actor."""
    max_grad_norm: float = 0.0
    hidden_sizes: tuple[int, ...] = (128, 128)
    activation: str = "relu"
    buffer_size: int = 200_000
    batch_size: int = 128
    learning_starts: int = 10_000
    tau: float = 0.005
    """Polyak rate of the target networks."""
    exploration_noise: float = 0.1
    """Std of the Gaussian exploration noise, as a fraction of the half-width of the action box."""
    num_critics: int = 1
    """Critics; the target takes the minimum over them (TD3's clipped double Q when 2)."""
    target_noise: float = 0.0
    """Std of the noise added to the target action (TD3's target policy smoothing), unit-box scale."""
    target_noise_clip: float = 0.5
    """The target noise is clipped to +-this."""
    policy_delay: int = 1
    """Critic steps per actor and target update."""

    def __post_init__(self):
        check_greater(self, "actor_learning_rate")
        check_range(self, "tau", 0.0, 1.0, open_low=True)
        check_positive(self, "exploration_noise", minimum=0)
        check_positive(self, "num_critics")
        check(self.target_noise >= 0 and self.target_noise_clip >= 0,
                f"target_noise={self.target_noise} and target_noise_clip={self.target_noise_clip} must be >= 0")
        check_positive(self, "policy_delay")
        super().__post_init__()


@struct.dataclass
class DeterministicState:
    actor_params: dict
    critic_params: dict
    target_actor_params: dict
    target_critic_params: dict
    actor_opt_state: optax.OptState
    critic_opt_state: optax.OptState
    critic_steps: jax.Array


def td_target(cfg: DDPGConfig, actor_fn: Callable, critic_fn: Callable, agent: DeterministicState, batch: dict,
              key: jax.Array) -> jax.Array:
    """The critics' regression target ``y [B]``, a constant (no gradient flows through it).

    ``y = r + gamma (1 - terminated) min_k Q'_k(s', a')`` with the target actor's smoothed action
    ``a' = clip(mu'(s') + clip(sigma eps, -c, c), -1, 1)``, ``eps ~ N(0, 1)`` drawn with ``key``
    (``sigma = target_noise``, ``c = target_noise_clip``; DDPG: ``sigma = 0`` and one critic). Both ``mu'`` and
    ``Q'`` are the *target* networks (Lillicrap et al. 2016, eq. 5; Fujimoto et al. 2018, eq. 10 and 14).
    ``actor_fn(params, obs [B, *O]) -> [B, A]`` and ``critic_fn(params, obs, action [B, A]) -> [K, B]`` apply
    the networks; ``batch`` holds ``reward [B]``, ``next_obs`` and ``terminated [B]``.
    """
    next_action = actor_fn(agent.target_actor_params, batch["next_obs"])  # [B, A]
    noise = jnp.clip(cfg.target_noise * jax.random.normal(key, next_action.shape),
                     -cfg.target_noise_clip, cfg.target_noise_clip)
    next_action = jnp.clip(next_action + noise, -1.0, 1.0)
    next_q = jnp.min(critic_fn(agent.target_critic_params, batch["next_obs"], next_action), axis=0)  # [B]
    return jax.lax.stop_gradient(
        batch["reward"] + cfg.gamma * (1.0 - batch["terminated"].astype(jnp.float32)) * next_q)


def make_agent(cfg: DDPGConfig) -> Agent:
    """The deterministic-actor agent (DDPG, or TD3 with its options on)."""
    spec = cfg.action_spec
    low, high = spec.bounds()
    actor = DeterministicActor(spec.dim, cfg.hidden_sizes, cfg.activation)
    critic = ContinuousQ(cfg.num_critics, cfg.hidden_sizes, cfg.activation)
    actor_opt = cfg.optimizer(cfg.actor_learning_rate)
    critic_opt = cfg.optimizer()

    def flat(action):  # [B, *A] -> [B, A]
        return action.reshape(action.shape[0], -1)

    def init(key, obs, action):
        k_actor, k_critic = jax.random.split(key)
        actor_params = actor.init(k_actor, obs)
        critic_params = critic.init(k_critic, obs, flat(unscale_action(action, low, high)))
        return DeterministicState(actor_params, critic_params, actor_params, critic_params,
                                  actor_opt.init(actor_params), critic_opt.init(critic_params),
                                  jnp.zeros((), jnp.int32))

    def act(agent: DeterministicState, obs, key, env_steps):
        unit = actor.apply(agent.actor_params, obs)  # [E, A]
        unit = jnp.clip(unit + cfg.exploration_noise * jax.random.normal(key, unit.shape), -1.0, 1.0)
        return scale_action(unit.reshape((-1, *spec.shape)), low, high)

    def critic_loss(critic_params, agent: DeterministicState, batch, key):
        y = td_target(cfg, actor.apply, critic.apply, agent, batch, key)  # [B]
        q = critic.apply(critic_params, batch["obs"], flat(unscale_action(batch["action"], low, high)))  # [K, B]
        loss = 0.5 * jnp.mean(jnp.sum((q - y) ** 2, axis=0))
        return loss, {"critic_loss": loss, "q_value": jnp.mean(q)}

    def actor_loss(actor_params, critic_params, obs):
        q = critic.apply(critic_params, obs, actor.apply(actor_params, obs))  # [K, B]
        loss = -jnp.mean(q[0])
        return loss, {"actor_loss": loss}

    def learn(agent: DeterministicState, batch, key, env_steps):
        grads, metrics = jax.grad(critic_loss, has_aux=True)(agent.critic_params, agent, batch, key)
        updates, critic_opt_state = critic_opt.update(grads, agent.critic_opt_state, agent.critic_params)
        critic_params = optax.apply_updates(agent.critic_params, updates)

        actor_grads, actor_metrics = jax.grad(actor_loss, has_aux=True)(agent.actor_params, critic_params,
                                                                          batch["obs"])
        updates, actor_opt_state = actor_opt.update(actor_grads, agent.actor_opt_state, agent.actor_params)
        actor_params = optax.apply_updates(agent.actor_params, updates)
        # Delayed policy updates: keep the old actor, its optimiser and the targets between updates.
        due = agent.critic_steps % cfg.policy_delay == 0
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(due, n, o), new, old)  # noqa: E731
        actor_params, actor_opt_state = keep((actor_params, actor_opt_state),
                                             (agent.actor_params, agent.actor_opt_state))
        target_actor = keep(polyak_update(actor_params, agent.target_actor_params, cfg.tau),
                            agent.target_actor_params)
        target_critic = keep(polyak_update(critic_params, agent.target_critic_params, cfg.tau),
                             agent.target_critic_params)
        state = DeterministicState(actor_params, critic_params, target_actor, target_critic,
                                   actor_opt_state, critic_opt_state, agent.critic_steps + 1)
        return state, {**metrics, **actor_metrics}

    return Agent(init=init, act=act, learn=learn)


def make_train(cfg: DDPGConfig) -> Train:
    """``train(key) -> {"state", "metrics"}`` for DDPG; jit- and vmap-able."""
    return make_off_policy_train(cfg, make_agent(cfg))
