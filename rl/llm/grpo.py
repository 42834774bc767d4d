"""GRPO: group relative policy optimisation (Shao et al. 2024, DeepSeekMath, section 4.1; the RL of
DeepSeek-R1-Zero, DeepSeek-AI 2025, section 2.2), with Dr. GRPO's unbiased variants (Liu et al. 2025) and
Kimi k1.5's length reward (Kimi Team 2025).

One step, all inside one jitted program:

1. sample ``G`` responses for each of the ``N`` prompts from the current policy (groups contiguous);
2. reward them with the verifier (exact match, plus an optional format and length reward);
3. advantages relative to the group (:func:`~jaxlab.rl.llm.losses.grpo_advantages`; no critic);
4. ``ppo_epochs`` gradient steps on :func:`~jaxlab.rl.llm.losses.grpo_loss` (clipped ratio against the
   sampling policy, ``k3`` KL to the frozen reference).

    step = jax.jit(make_grpo_step(model, task, GRPOSpec(group_size=8)), donate_argnums=0)
    state, metrics = step(state, {"prompts": [N, Lp], "answers": [N, Ra]}, key, ref_params)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxlab.models.lm import LM
from jaxlab.rl.llm.losses import (AGGREGATIONS, grpo_advantages, grpo_loss, kimi_length_reward, masked_mean,
                                  sequence_kl)
from jaxlab.rl.llm.sampling import response_logprobs, rollout
from jaxlab.rl.llm.task import Task, is_correct, response_lengths
from jaxlab.train_state import TrainState

__all__ = ["GRPOSpec", "make_grpo_step", "update_epochs"]


@dataclasses.dataclass(frozen=True)
class GRPOSpec:
    """Hyperparameters of a GRPO step (defaults: DeepSeekMath's clip 0.2 and beta 0.04)."""

    group_size: int = 8
    max_new_tokens: int = 6
    clip_eps: float = 0.2
    beta: float = 0.04
    aggregation: str = "token-mean"
    scale_rewards: bool = True
    ppo_epochs: int = 2
    temperature: float = 1.0
    format_weight: float = 0.0
    length_penalty: float = 0.0

    def __post_init__(self):
        for name in ("group_size", "max_new_tokens", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} must be >= 2 (advantages are relative to the group)")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} must be one of {AGGREGATIONS}")
        if not (self.clip_eps > 0 and self.beta >= 0 and self.temperature > 0):
            raise ValueError(f"need clip_eps > 0, beta >= 0, temperature > 0; got {self.clip_eps=}, {self.beta=}, "
                             f"{self.temperature=}")


def update_epochs(state: TrainState, loss_fn: Callable, epochs: int) -> tuple[TrainState, dict]:
    """``epochs`` optimizer steps of ``loss_fn(params) -> (loss, metrics)`` on one batch of experience.

    ``state.step`` advances by one (it counts loop steps, the key schedule and checkpoints depend on it);
    the metrics are those of the first epoch (before any update: ratio 1, the on-policy loss)."""
    step = state.step
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(state, _):
        (loss, metrics), grads = grad_fn(state.params)
        return state.apply_gradients(grads=grads), {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    state, history = jax.lax.scan(one, state, None, length=epochs)
    return state.replace(step=step + 1), jax.tree.map(lambda x: x[0], history)


def make_grpo_step(model: LM, task: Task, spec: GRPOSpec) -> Callable:
    """``train_step(state, batch, key, ref_params) -> (state, metrics)``; ``state.params`` is the policy."""
    Lp, G = task.prompt_len, spec.group_size

    def train_step(state: TrainState, batch: dict, key: jax.Array, ref_params):
        prompts = jnp.repeat(batch["prompts"], G, axis=0)  # [N * G, Lp], groups contiguous
        answers = jnp.repeat(batch["answers"], G, axis=0)  # [N * G, Ra]
        roll = rollout(model, state.params, prompts, key, spec.max_new_tokens, spec.temperature)
        correct = is_correct(roll.response, answers)  # [N * G]
        lengths = response_lengths(roll.response)
        rewards = task.rewards(roll.response, answers, spec.format_weight)
        if spec.length_penalty:
            rewards = rewards + spec.length_penalty * kimi_length_reward(lengths, correct, G)
        advantages = grpo_advantages(rewards, G, scale=spec.scale_rewards)  # [N * G]
        ref_logp = response_logprobs(model, ref_params, roll.tokens, Lp)  # [N * G, R]

        def loss_fn(params):
            logp = response_logprobs(model, params, roll.tokens, Lp)
            return grpo_loss(logp, roll.logps, ref_logp, advantages, roll.mask, clip_eps=spec.clip_eps,
                             beta=spec.beta, aggregation=spec.aggregation)

        state, metrics = update_epochs(state, loss_fn, spec.ppo_epochs)
        solved = jnp.mean(correct.reshape(-1, G), axis=1)  # [N]
        metrics.update(reward=jnp.mean(rewards), accuracy=jnp.mean(correct), response_length=jnp.mean(lengths),
                       seq_kl=sequence_kl(roll.logps, ref_logp, roll.mask),
                       mixed_groups=jnp.mean(((solved > 0) & (solved < 1)).astype(jnp.float32)),
                       entropy_proxy=-masked_mean(roll.logps, roll.mask))
        return state, metrics

    return train_step
