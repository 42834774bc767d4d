"""DPO on on-policy preference pairs labelled by the verifier (Rafailov et al. 2023, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model").

:func:`preference_pairs` samples ``group_size`` responses per prompt from the SFT model (the frozen
reference), keeps prompts with at least one right and one wrong response, and pairs the first right one
(chosen) with the first wrong one (rejected); the reference's sequence log-probabilities are computed
once there. The same pairs train the Bradley-Terry reward model of PPO-RLHF
(:mod:`jaxlab.rl.llm.reward_model`). :func:`make_dpo_step` then minimises
:func:`~jaxlab.rl.llm.losses.dpo_loss` (sigmoid, IPO or hinge) on minibatches of the pairs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.models.lm import LM, LMConfig
from jaxlab.models.sampling import response_logprobs, sample
from jaxlab.rl.llm.losses import dpo_loss, masked_sum
from jaxlab.rl.llm.task import Task
from jaxlab.train_state import make_train_step

__all__ = ["make_dpo_step", "pair_logprobs", "preference_pairs"]


def pair_logprobs(model: LM, params, batch: dict, prompt_len: int) -> tuple[jax.Array, jax.Array]:
    """Sequence log-probabilities [B] of the chosen and rejected responses, in one forward pass."""
    B = batch["chosen"].shape[0]
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)  # [2B, L]
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)  # [2B, R]
    logps = masked_sum(response_logprobs(model, params, tokens, prompt_len), mask, axis=1)  # [2B]
    return logps[:B], logps[B:]


@functools.lru_cache(maxsize=8)
def _pairs_fn(cfg: LMConfig, task: Task, chunk: int, group_size: int, max_new_tokens: int, all_pairs: bool):
    model = LM(cfg)
    G = group_size

    def run(params, key):
        prompts, answers = task.sample(jax.random.fold_in(key, 0), chunk)
        prompts, answers = jnp.repeat(prompts, group_size, axis=0), jnp.repeat(answers, group_size, axis=0)
        roll = sample(model, params, prompts, jax.random.fold_in(key, 1), max_new_tokens, eos_id=task.eos_id,
                      pad_id=task.pad_id)
        correct = task.is_correct(roll.response, answers).reshape(chunk, G) > 0  # [n, G]
        logps = masked_sum(response_logprobs(model, params, roll.tokens, task.prompt_len), roll.mask, axis=1)
        if all_pairs:  # every (right i, wrong j) of a group: n * G * G candidates, [n * G * G]
            i, j = (a.reshape(-1) for a in jnp.meshgrid(jnp.arange(G), jnp.arange(G), indexing="ij"))
            valid = (correct[:, i] & ~correct[:, j]).reshape(-1)
            rows = jnp.repeat(jnp.arange(chunk), G * G)
            chosen, rejected = jnp.tile(i, chunk), jnp.tile(j, chunk)
        else:  # the first right and the first wrong of a group, [n]
            chosen, rejected = jnp.argmax(correct, axis=1), jnp.argmax(~correct, axis=1)
            valid = jnp.any(correct, axis=1) & jnp.any(~correct, axis=1)
            rows = jnp.arange(chunk)
        pick = lambda x, i: x.reshape(chunk, G, *x.shape[1:])[rows, i]  # noqa: E731
        return valid, {"chosen": pick(roll.tokens, chosen), "rejected": pick(roll.tokens, rejected),
                       "chosen_mask": pick(roll.mask, chosen), "rejected_mask": pick(roll.mask, rejected),
                       "ref_chosen": pick(logps, chosen), "ref_rejected": pick(logps, rejected)}

    return jax.jit(run)


def preference_pairs(model: LM, ref_params, task: Task, key: jax.Array, num_prompts: int, group_size: int,
                     max_new_tokens: int, chunk: int = 256, all_pairs: bool = False) -> dict[str, np.ndarray]:
    """Verifier-labelled pairs from the reference policy's own samples (host numpy arrays).

    Returns ``chosen``/``rejected`` tokens [M, Lp + R], their masks [M, R] and the reference's sequence
    log-probabilities ``ref_chosen``/``ref_rejected`` [M]: one pair (the first right and the first wrong
    sample) for each of the ``M <= num_prompts`` prompts whose ``group_size`` samples hold both a right and a
    wrong answer, or with ``all_pairs`` every right sample paired with every wrong one of its group
    (InstructGPT's ``K choose 2`` comparisons per prompt, section 3.5; ``M <= num_prompts * G^2 / 4``).
    """
    if num_prompts < 1 or group_size < 2:
        raise ValueError(f"need num_prompts >= 1 and group_size >= 2, got {num_prompts=}, {group_size=}")
    chunk = min(chunk, num_prompts)
    fn = _pairs_fn(model.cfg, task, chunk, group_size, max_new_tokens, all_pairs)
    parts = []
    for i in range(-(-num_prompts // chunk)):
        valid, pairs = jax.device_get(fn(ref_params, jax.random.fold_in(key, i)))
        parts.append({k: v[np.asarray(valid)] for k, v in pairs.items()})
    pairs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return pairs if all_pairs else {k: v[:num_prompts] for k, v in pairs.items()}


def make_dpo_step(model: LM, optimizer: optax.GradientTransformation, prompt_len: int, beta: float,
                  loss_type: str, nll_coef: float = 0.0, grad_accum: int = 1):
    """``train_step(state, pairs_batch, key) -> (state, metrics)`` minimising the DPO loss.

    The reference enters through the batch: its sequence log-probabilities ``ref_chosen``/``ref_rejected``
    are part of every pair (computed once by :func:`preference_pairs`).

    ``nll_coef > 0`` adds the chosen responses' negative log-likelihood per token, ``DPO + alpha NLL``
    (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 3): plain DPO can lower the
    likelihood of the chosen (right) answers along with the rejected ones, which on reasoning tasks
    costs accuracy; the NLL term keeps probability mass on them. ``grad_accum``: microbatches of pairs (means
    over equal numbers of pairs, so the accumulated gradient is the whole batch's).
    """
    if not nll_coef >= 0:
        raise ValueError(f"nll_coef={nll_coef!r} must be >= 0")

    def loss_fn(params, batch, key):
        del key
        pi_chosen, pi_rejected = pair_logprobs(model, params, batch, prompt_len)
        loss, metrics = dpo_loss(pi_chosen, pi_rejected, batch["ref_chosen"], batch["ref_rejected"], beta=beta,
                                 loss_type=loss_type)
        chosen_len = jnp.maximum(jnp.sum(batch["chosen_mask"], axis=1), 1.0)  # [B]
        nll = -jnp.mean(pi_chosen / chosen_len)
        return loss + nll_coef * nll, {**metrics, "dpo_loss": loss, "chosen_nll": nll}

    return make_train_step(loss_fn, optimizer, grad_accum=grad_accum)
