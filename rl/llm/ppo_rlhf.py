"""PPO-RLHF: InstructGPT's third stage (Ouyang et al. 2022, eq. 2; Stiennon et al. 2020).

The policy maximises the learned reward minus a per-token KL penalty to the SFT reference:
``r_t = -kl_coef (log pi(y_t) - log pi_ref(y_t)) + [t = last] RM(x, y)``. A critic with the reward model's
architecture (initialised from it) gives ``V(s_t)`` at the position that predicts token ``t``; advantages
are GAE over the response (:func:`jaxlab.rl.returns.gae`, the episode ending at EOS), whitened over the
batch's tokens; the policy takes PPO's clipped step (:func:`~jaxlab.rl.llm.losses.grpo_loss` with
``beta = 0`` and per-token advantages) and the critic a clipped value step. The verifier is only read for
monitoring: the policy optimises the reward model, not the ground truth.

    step = jit_train_step(make_ppo_rlhf_step(model, task, PPOSpec(), optimizer))
    state, metrics = step(state, {"prompts", "answers", "ref_params": ref, "reward_params": rm}, key)
    # state.params = {"policy": <LM params>, "value": <reward-model-shaped params>}

The frozen reference policy and reward model travel in the batch (``ref_params``, ``reward_params``; the
stage's data iterator adds them), so the step has the training spine's signature; its ``ppo_epochs``
updates are :func:`~jaxlab.rl.llm.grpo.update_epochs` (the spine's ``loss_and_grads`` and ``apply_update``
in a ``lax.scan``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxlab.models.lm import LM
from jaxlab.models.sampling import response_logprobs, sample
from jaxlab.rl.llm.grpo import sampled_logps, update_epochs
from jaxlab.rl.llm.losses import grpo_loss, masked_value_loss, masked_whiten, sequence_kl
from jaxlab.rl.llm.reward_model import sequence_scores, token_scores
from jaxlab.rl.llm.task import Task
from jaxlab.rl.returns import gae
from jaxlab.train_state import TrainState
from jaxlab.validation import check_positive

__all__ = ["PPOSpec", "make_ppo_rlhf_step", "rlhf_advantages", "token_rewards", "values_before_tokens"]


@dataclasses.dataclass(frozen=True)
class PPOSpec:
    """Hyperparameters of a PPO-RLHF step."""

    samples_per_prompt: int = 8
    max_new_tokens: int = 6
    clip_eps: float = 0.2
    kl_coef: float = 0.05
    vf_coef: float = 0.5
    gamma: float = 1.0
    gae_lambda: float = 0.95
    ppo_epochs: int = 2
    temperature: float = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        check_positive(self, "samples_per_prompt", "max_new_tokens", "ppo_epochs")
        check_positive(self, "grad_accum", integer=True)
        if not (self.clip_eps > 0 and self.kl_coef >= 0 and self.vf_coef > 0 and self.temperature > 0):
            raise ValueError(f"need clip_eps > 0, kl_coef >= 0, vf_coef > 0, temperature > 0; got {self.clip_eps=}, "
                             f"{self.kl_coef=}, {self.vf_coef=}, {self.temperature=}")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ValueError(f"{self.gamma=} and {self.gae_lambda=} must be in [0, 1]")


def token_rewards(score: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array,
                  kl_coef: float) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards [B, R] (KL penalty on every response token, the sequence score [B] on the last)
    and the one-hot of the last token [B, R] (the episode's end)."""
    last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32), 1) - 1  # [B]
    is_last = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32)  # [B, R]
    rewards = (-kl_coef * (logp - ref_logp) + score[:, None] * is_last) * mask
    return rewards, is_last


def values_before_tokens(scores: jax.Array, prompt_len: int) -> jax.Array:
    """``V(s_t)`` of each response token from the value head at every position, scores [B, L] -> [B, R]
    (``R = L - prompt_len``): the state before response token ``t`` (at position ``prompt_len + t``) is the
    prefix up to position ``prompt_len + t - 1``, whose output also predicts that token."""
    return scores[:, prompt_len - 1:-1]


def rlhf_advantages(rewards: jax.Array, values: jax.Array, is_last: jax.Array, mask: jax.Array, gamma: float,
                    gae_lambda: float) -> tuple[jax.Array, jax.Array]:
    """GAE over the response tokens (all [B, R]) -> ``(advantages, targets)``, the advantages whitened over
    ``mask = 1``. Token ``t``'s next value is ``V(s_{t+1})`` (0 after the last position), and the episode
    terminates at ``is_last`` (the response's last token), so nothing is bootstrapped past it; ``values`` must
    be 0 under ``mask = 0``."""
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)  # V(s_{t+1}), [B, R]
    adv, targets = gae(rewards.T, values.T, next_values.T, is_last.T > 0, jnp.zeros_like(is_last.T, bool),
                       gamma, gae_lambda)  # time-major [R, B]
    return masked_whiten(adv.T, mask), targets.T


def make_ppo_rlhf_step(model: LM, task: Task, spec: PPOSpec, optimizer: optax.GradientTransformation) -> Callable:
    """``train_step(state, batch, key) -> (state, metrics)`` with ``batch = {"prompts" [N, Lp], "answers"
    [N, Ra], "ref_params", "reward_params"}`` (the frozen reference policy and reward model).

    The responses are drawn with ``key``, the update epochs with ``split(key)[1]``. The policy is the sampled
    one, ``softmax(z / T)`` at ``spec.temperature``: old, new and reference log-probabilities (and so the KL
    penalty) are all tempered alike, which keeps the update on-policy at any temperature."""
    Lp = task.prompt_len

    def loss_fn(params, exp: dict, key: jax.Array):
        del key
        logp = response_logprobs(model, params["policy"], exp["tokens"], Lp, spec.temperature)
        values = values_before_tokens(token_scores(model, params["value"], exp["tokens"]), Lp)
        policy_loss, metrics = grpo_loss(logp, exp["old_logp"], exp["ref_logp"], exp["advantages"], exp["mask"],
                                         clip_eps=spec.clip_eps, beta=0.0)
        v_loss = masked_value_loss(values, exp["targets"], exp["old_values"], exp["mask"], clip_eps=spec.clip_eps)
        return policy_loss + spec.vf_coef * v_loss, {**metrics, "value_loss": v_loss}

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        prompts = jnp.repeat(batch["prompts"], spec.samples_per_prompt, axis=0)  # [B, Lp]
        answers = jnp.repeat(batch["answers"], spec.samples_per_prompt, axis=0)
        roll = sample(model, state.params["policy"], prompts, key, spec.max_new_tokens, temperature=spec.temperature,
                      eos_id=task.eos_id, pad_id=task.pad_id)
        mask = roll.mask  # [B, R]
        ref_logp = response_logprobs(model, batch["ref_params"], roll.tokens, Lp, spec.temperature)  # [B, R]
        old_logp = sampled_logps(roll, spec.temperature)  # [B, R]
        score = sequence_scores(model, batch["reward_params"], roll.tokens, mask)  # [B]
        old_values = values_before_tokens(token_scores(model, state.params["value"], roll.tokens), Lp) * mask  # [B, R]
        rewards, is_last = token_rewards(score, old_logp, ref_logp, mask, spec.kl_coef)
        advantages, targets = rlhf_advantages(rewards, old_values, is_last, mask, spec.gamma, spec.gae_lambda)
        exp = {"tokens": roll.tokens, "old_logp": old_logp, "ref_logp": ref_logp, "mask": mask,
               "advantages": advantages, "targets": targets, "old_values": old_values}  # [B, R]
        state, metrics = update_epochs(state, loss_fn, exp, jax.random.split(key)[1], optimizer, spec.ppo_epochs,
                                       spec.grad_accum)
        metrics.update(rm_score=jnp.mean(score), accuracy=jnp.mean(task.is_correct(roll.response, answers)),
                       response_length=jnp.mean(task.response_lengths(roll.response)),
                       seq_kl=sequence_kl(old_logp, ref_logp, mask))
        return state, metrics

    return train_step
