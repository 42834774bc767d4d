"""long2short: shorter responses at the same accuracy from a policy's own samples (Kimi Team 2025, "Kimi k1.5:
Scaling Reinforcement Learning with LLMs", section 2.4).

Two of the paper's long2short methods, both built from ``k`` samples of each problem drawn from the policy
to be shortened and checked by the verifier:

* **shortest rejection sampling**: sample each problem ``k`` times (the paper: ``n = 8``) and keep the shortest
  correct response as a supervised fine-tuning target (:func:`shortest_correct`; problems without a correct
  sample give none);
* **DPO**: the shortest correct response is the positive, longer responses the negatives, "both wrong longer
  responses and correct longer responses (1.5 times longer than the chosen positive sample)"
  (:func:`long2short_pairs`: one pair per problem, the longest such negative).

:func:`long2short_data` builds either data set on the host; the post-training driver
(:mod:`jaxlab.rl.llm.posttrain`, ``long2short="rejection" | "dpo"``) trains on it with the SFT step
(:func:`jaxlab.rl.llm.sft.make_sft_step`, the responses as the answers) or the DPO step
(:func:`jaxlab.rl.llm.dpo.make_dpo_step`, the policy before long2short as the reference).

Lengths are :meth:`Task.response_lengths` (tokens up to and including EOS; all ``R`` without one). Ties go to
the first sample of the group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.models.lm import LM, LMConfig
from jaxlab.models.sampling import response_logprobs, sample
from jaxlab.rl.llm.losses import masked_sum
from jaxlab.rl.llm.task import Task, TextTask

__all__ = ["LONG2SHORT_MODES", "long2short_data", "long2short_indices", "long2short_pairs", "shortest_correct"]

LONG2SHORT_MODES = ("none", "rejection", "dpo")


def _check_groups(lengths, correct) -> tuple[jax.Array, jax.Array]:
    lengths, correct = jnp.asarray(lengths), jnp.asarray(correct)
    if lengths.ndim != 2 or lengths.shape != correct.shape:
        raise ValueError(f"lengths and correct must both be [N, k], got {lengths.shape} and {correct.shape}")
    return lengths.astype(jnp.float32), correct > 0


def shortest_correct(lengths: jax.Array, correct: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The shortest correct sample of each problem: lengths, correct [N, k] -> (index int32 [N], has_any bool [N]).

    ``index`` is the sample with the fewest tokens among the correct ones (the first on ties); where no sample
    is correct (``has_any`` False) it is 0 and means nothing."""
    lengths, correct = _check_groups(lengths, correct)
    index = jnp.argmin(jnp.where(correct, lengths, jnp.inf), axis=1).astype(jnp.int32)  # first on ties
    has_any = jnp.any(correct, axis=1)
    return jnp.where(has_any, index, 0), has_any


def long2short_indices(lengths: jax.Array, correct: jax.Array,
                       long_ratio: float = 1.5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Kimi's long2short DPO pair of each problem: (chosen, rejected, valid), each [N].

    ``chosen`` is the shortest correct sample; the negatives are the wrong samples longer than it and the
    correct ones at least ``long_ratio`` times its length; ``rejected`` is the longest negative (the first on
    ties). ``valid``: the problem has a correct sample and a negative (else both indices are 0)."""
    if not long_ratio >= 1:
        raise ValueError(f"long_ratio={long_ratio!r} must be >= 1")
    chosen, has_any = shortest_correct(lengths, correct)
    lengths, correct = _check_groups(lengths, correct)
    shortest = jnp.take_along_axis(lengths, chosen[:, None], axis=1)  # [N, 1]
    negative = jnp.where(correct, lengths >= long_ratio * shortest, lengths > shortest) & has_any[:, None]  # [N, k]
    rejected = jnp.argmax(jnp.where(negative, lengths, -jnp.inf), axis=1).astype(jnp.int32)  # longest, first on ties
    valid = has_any & jnp.any(negative, axis=1)
    return jnp.where(valid, chosen, 0), jnp.where(valid, rejected, 0), valid


def long2short_pairs(tokens: jax.Array, lengths: jax.Array, correct: jax.Array,
                     long_ratio: float = 1.5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Preference pairs from ``k`` samples per problem: tokens [N, k, L] (prompt and response), lengths and
    correct [N, k] -> (chosen [N, L], rejected [N, L], valid bool [N]) by :func:`long2short_indices` (rows
    where ``valid`` is False hold sample 0 twice: drop them)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 3 or tokens.shape[:2] != jnp.shape(lengths):
        raise ValueError(f"tokens must be [N, k, L] with [N, k] = lengths' {jnp.shape(lengths)}, got {tokens.shape}")
    chosen, rejected, valid = long2short_indices(lengths, correct, long_ratio)
    rows = jnp.arange(tokens.shape[0])
    return tokens[rows, chosen], tokens[rows, rejected], valid


@functools.lru_cache(maxsize=8)
def _data_fn(cfg: LMConfig, task: Task | TextTask, chunk: int, samples: int, max_new_tokens: int, mode: str,
             long_ratio: float):
    model = LM(cfg)
    k = samples

    def run(params, key, temperature):
        prompts, answers = task.sample(jax.random.fold_in(key, 0), chunk)
        prompts, answers = jnp.repeat(prompts, k, axis=0), jnp.repeat(answers, k, axis=0)  # [n * k, ...]
        roll = sample(model, params, prompts, jax.random.fold_in(key, 1), max_new_tokens, temperature=temperature,
                      eos_id=task.eos_id, pad_id=task.pad_id)
        correct, _ = task.verify(roll.response, answers)
        lengths = task.response_lengths(roll.response).reshape(chunk, k)  # [n, k]
        correct = correct.reshape(chunk, k)
        group = lambda x: x.reshape(chunk, k, *x.shape[1:])  # noqa: E731
        rows = jnp.arange(chunk)
        if mode == "rejection":
            best, valid = shortest_correct(lengths, correct)
            return valid, {"prompts": prompts[::k], "answers": group(roll.response)[rows, best]}
        chosen, rejected, valid = long2short_indices(lengths, correct, long_ratio)
        mask = roll.mask  # [n * k, R]: up to and including EOS
        logps = group(masked_sum(response_logprobs(model, params, roll.tokens, task.prompt_len), mask, axis=1))
        pick = lambda x, i: group(x)[rows, i]  # noqa: E731
        return valid, {"chosen": pick(roll.tokens, chosen), "rejected": pick(roll.tokens, rejected),
                       "chosen_mask": pick(mask, chosen), "rejected_mask": pick(mask, rejected),
                       "ref_chosen": logps[rows, chosen], "ref_rejected": logps[rows, rejected]}

    return jax.jit(run)


def long2short_data(model: LM, params, task: Task | TextTask, key: jax.Array, num_prompts: int, samples: int,
                    max_new_tokens: int, mode: str, *, temperature: float = 1.0, long_ratio: float = 1.5,
                    chunk: int = 256) -> dict[str, np.ndarray]:
    """long2short training data from ``samples`` responses of ``params`` to each of ``num_prompts`` fresh
    problems drawn from ``key`` (host numpy arrays, one row per usable problem):

    * ``mode="rejection"``: ``{"prompts" [M, Lp], "answers" [M, R]}``, the shortest correct response of each
      problem with one (EOS then ``pad_id``): the SFT step's batch;
    * ``mode="dpo"``: ``chosen``/``rejected`` tokens [M, Lp + R], their masks [M, R] and the sequence
      log-probabilities ``ref_chosen``/``ref_rejected`` [M] under ``params`` (the reference): the DPO step's
      batch.
    """
    if mode not in LONG2SHORT_MODES[1:]:
        raise ValueError(f"mode={mode!r} must be one of {LONG2SHORT_MODES[1:]}")
    if num_prompts < 1 or samples < 2:
        raise ValueError(f"need num_prompts >= 1 and samples >= 2, got {num_prompts=}, {samples=}")
    chunk = min(chunk, num_prompts)
    fn = _data_fn(model.cfg, task, chunk, samples, max_new_tokens, mode, float(long_ratio))
    parts = []
    for i in range(-(-num_prompts // chunk)):
        valid, data = jax.device_get(fn(params, jax.random.fold_in(key, i), jnp.float32(temperature)))
        keep = np.asarray(valid)[:min(chunk, num_prompts - i * chunk)]  # the problems asked for, no more
        parts.append({name: v[:len(keep)][keep] for name, v in data.items()})
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
