"""Supervised fine-tuning: teacher-forced cross-entropy on the verified answers (the warm start of RLHF's
first stage, Ouyang et al. 2022, and of DeepSeek-R1's cold start, DeepSeek-AI 2025, section 2.3.1).

    step = jit_train_step(make_sft_step(model, optimizer))
    state, metrics = step(state, {"prompts": [B, Lp], "answers": [B, Ra]}, key)

The loss is the mean negative log-likelihood of the answer tokens (digits and EOS) given the prompt;
padding after EOS carries no loss. ``sequence_accuracy`` is the share of rows whose every answer token
is the argmax under teacher forcing (the greedy decode's accuracy, when no earlier token is wrong).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxlab.models.lm import LM, token_logprobs
from jaxlab.rl.llm.losses import masked_mean
from jaxlab.rl.llm.task import EOS, response_mask
from jaxlab.train_state import LOSS_WEIGHT, make_train_step

__all__ = ["make_sft_step", "sft_loss"]


def sft_loss(model: LM, params, prompts, answers, eos_id: int = EOS) -> tuple[jnp.ndarray, dict]:
    """Mean NLL over answer tokens: prompts int [B, Lp], answers int [B, Ra] (digits, ``eos_id``, padding)."""
    Lp = prompts.shape[1]
    tokens = jnp.concatenate([prompts, answers], axis=1)  # [B, Lp + Ra]
    logits, _ = model.apply({"params": params}, tokens[:, :-1])  # [B, Lp + Ra - 1, V]
    logits = logits[:, Lp - 1:]  # [B, Ra, V]: position Lp - 1 + t scores answers[:, t]
    mask = response_mask(answers, eos_id)  # [B, Ra]
    nll = -masked_mean(token_logprobs(logits, answers), mask)
    hit = (jnp.argmax(logits, axis=-1) == answers) | (mask == 0)
    return nll, {"sequence_accuracy": jnp.mean(jnp.all(hit, axis=1).astype(jnp.float32)), LOSS_WEIGHT: jnp.sum(mask)}


def make_sft_step(model: LM, optimizer: optax.GradientTransformation, grad_accum: int = 1, eos_id: int = EOS):
    """``train_step(state, batch, key) -> (state, metrics)`` minimising :func:`sft_loss` (over ``grad_accum``
    microbatches, weighted by their answer tokens: the whole batch's gradient); ``eos_id`` ends each answer
    (a checkpoint's own, :attr:`jaxlab.rl.llm.task.TextTask.eos_id`)."""
    return make_train_step(lambda params, batch, key: sft_loss(model, params, batch["prompts"], batch["answers"],
                                                               eos_id), optimizer, grad_accum=grad_accum)
