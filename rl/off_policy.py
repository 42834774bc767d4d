"""The off-policy replay loop shared by DQN, DDPG, TD3 and SAC.

One update: step ``num_envs`` envs ``train_frequency`` times with the agent's exploration policy
(uniformly random actions until ``learning_starts`` env steps), write the transitions
``(obs, action, reward, next_obs, terminated)`` into a uniform replay buffer (``next_obs`` is the
pre-reset observation and ``terminated`` excludes time limits, so targets bootstrap through
truncation), then, once ``learning_starts`` steps are stored, take ``gradient_steps`` learning steps
on minibatches drawn from the buffer. An algorithm module supplies only an ``Agent``: how to
initialise, act and learn.

Continuous agents act in the unit box ``[-1, 1]`` internally; the buffer stores env-scale actions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxlab.rl.core import RLConfig, Train
from jaxlab.train_state import step_key
from jaxlab.rl.replay import ReplayState, UniformReplay
from jaxlab.rl.rollout import EnvCarry, env_reset, episode_metrics, rollout
from jaxlab.rl.wrappers import ActionSpec, make_vec_env
from jaxlab.validation import check, check_positive

__all__ = ["Agent", "OffPolicyConfig", "OffPolicyState", "make_off_policy_train", "random_actions"]


@dataclasses.dataclass(frozen=True)
class OffPolicyConfig(RLConfig):
    """Replay and schedule settings of the off-policy family."""

    buffer_size: int = 100_000
    """Replay capacity in transitions."""
    batch_size: int = 256
    """Minibatch size of each gradient step."""
    learning_starts: int = 10_000
    """Env steps of uniformly random actions before learning starts."""
    train_frequency: int = 1
    """Vectorised env steps between learning phases (each of num_envs transitions)."""
    gradient_steps: int = 1
    """Gradient steps per learning phase."""

    def __post_init__(self):
        check(self.buffer_size >= self.num_envs * self.train_frequency,
                f"buffer_size={self.buffer_size} must hold one update's {self.num_envs * self.train_frequency} "
                f"transitions")
        check_positive(self, "batch_size")
        check_positive(self, "learning_starts", minimum=0)
        check_positive(self, "train_frequency")
        check_positive(self, "gradient_steps")
        super().__post_init__()

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.train_frequency

    @property
    def learning_updates(self) -> int:
        """Updates that take gradient steps: those that end at or after ``learning_starts`` env steps."""
        first = max(-(-self.learning_starts // self.steps_per_update) - 1, 0)
        return max(self.num_updates - first, 0)


@dataclasses.dataclass(frozen=True)
class Agent:
    """What an off-policy algorithm defines.

    Attributes:
      init: ``(key, obs [E, *O], action [E, *A]) -> agent state`` (params, targets, optimiser states).
      act: ``(agent, obs [E, *O], key, env_steps) -> action [E, *A]``, exploration included, env scale.
      learn: ``(agent, batch, key, env_steps) -> (agent, metrics)``; ``batch`` holds ``obs``, ``action``,
        ``reward``, ``next_obs``, ``terminated``, each ``[batch_size, ...]``.
    """

    init: Callable[[jax.Array, jax.Array, jax.Array], Any]
    act: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
    learn: Callable[[Any, dict, jax.Array, jax.Array], tuple[Any, dict[str, jax.Array]]]


@struct.dataclass
class OffPolicyState:
    agent: Any
    buffer: ReplayState
    env: EnvCarry
    key: jax.Array   # base key; update i uses fold_in(key, i)
    step: jax.Array  # updates done


def random_actions(spec: ActionSpec, key: jax.Array, num: int) -> jax.Array:
    """``num`` uniformly random actions: int32 ``[num]`` or float ``[num, *shape]`` in the box."""
    if spec.kind == "discrete":
        return jax.random.randint(key, (num,), 0, spec.num_actions)
    low, high = spec.bounds()
    return jax.random.uniform(key, (num, *spec.shape), minval=low, maxval=high)


def make_off_policy_train(cfg: OffPolicyConfig, agent: Agent) -> Train:
    """Build the ``Train`` of an off-policy algorithm from its ``Agent``."""
    env, env_params = make_vec_env(cfg.env_id, cfg.num_envs)
    spec = cfg.action_spec
    buffer = UniformReplay(cfg.buffer_size)

    def init(key: jax.Array) -> OffPolicyState:
        k_env, k_agent, k_updates = jax.random.split(key, 3)
        carry = env_reset(env, env_params, k_env)
        action = random_actions(spec, k_agent, cfg.num_envs)
        example = {"obs": carry.obs[0], "action": action[0], "reward": jnp.float32(0),
                   "next_obs": carry.obs[0], "terminated": jnp.bool_(False)}
        return OffPolicyState(agent.init(k_agent, carry.obs, action), buffer.init(example), carry, k_updates,
                              jnp.zeros((), jnp.int32))

    def update(state: OffPolicyState):
        k_rollout, k_learn = jax.random.split(step_key(state))
        env_steps = state.step * cfg.steps_per_update  # before this update
        warming_up = env_steps < cfg.learning_starts

        def policy(obs, key):
            k_random, k_agent = jax.random.split(key)
            action = jnp.where(warming_up, random_actions(spec, k_random, cfg.num_envs),
                               agent.act(state.agent, obs, k_agent, env_steps))
            return action, {}

        carry, traj = rollout(env, env_params, state.env, policy, k_rollout, cfg.train_frequency)  # [T, E]
        flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]),
                            {"obs": traj.obs, "action": traj.action, "reward": traj.reward,
                             "next_obs": traj.next_obs, "terminated": traj.terminated})
        replay = buffer.add(state.buffer, flat)
        env_steps = env_steps + cfg.steps_per_update

        def learn_phase(agent_state):
            def gradient_step(agent_state, key):
                k_sample, k_step = jax.random.split(key)
                return agent.learn(agent_state, buffer.sample(replay, k_sample, cfg.batch_size), k_step, env_steps)

            agent_state, metrics = jax.lax.scan(gradient_step, agent_state,
                                                jax.random.split(k_learn, cfg.gradient_steps))
            return agent_state, jax.tree.map(jnp.mean, metrics)

        shapes = jax.eval_shape(learn_phase, state.agent)[1]
        agent_state, learn_metrics = jax.lax.cond(
            env_steps >= cfg.learning_starts, learn_phase,
            lambda a: (a, jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)), state.agent)
        metrics = {**episode_metrics(traj), "env_steps": env_steps, **learn_metrics}
        return OffPolicyState(agent_state, replay, carry, state.key, state.step + 1), metrics

    return Train(init=init, update=update, num_updates=cfg.num_updates, config=cfg)
