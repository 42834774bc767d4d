"""GRPO: group relative policy optimisation (Shao et al. 2024, DeepSeekMath, section 4.1; the RL of
DeepSeek-R1-Zero, DeepSeek-AI 2025, section 2.2), with Dr. GRPO's unbiased variants (Liu et al. 2025),
Kimi k1.5's length reward (Kimi Team 2025) and DAPO's clip-higher and dynamic sampling (Yu et al. 2025,
arXiv:2503.14476, sections 3.1-3.2: ``clip_eps_high``, ``dynamic_sampling``).

One step, all inside one jitted program:

1. sample ``G`` responses for each of the ``N`` prompts from the current policy (groups contiguous);
2. reward them with the verifier (exact match, plus an optional format and length reward);
3. advantages relative to the group (:func:`~jaxlab.rl.llm.losses.grpo_advantages`; no critic);
4. ``ppo_epochs`` gradient steps on :func:`~jaxlab.rl.llm.losses.grpo_loss` (clipped ratio against the
   sampling policy, ``k3`` KL to the frozen reference), each the training spine's
   :func:`~jaxlab.train_state.loss_and_grads` and :func:`~jaxlab.train_state.apply_update` in a ``lax.scan``
   (:func:`update_epochs`).

    step = jit_train_step(make_grpo_step(model, task, GRPOSpec(group_size=8), optimizer))
    state, metrics = step(state, {"prompts": [N, Lp], "answers": [N, Ra], "ref_params": ref_params}, key)

With ``GRPOSpec.rollout_budget`` the rollouts are partial (Kimi k1.5, section 2.6.2): a pool of them in flight in
the train state advances that many tokens a step and its finished groups are trained on
(:func:`jaxlab.rl.llm.partial_rollout.make_partial_grpo_step`; steps 2-4 are :func:`make_grpo_learner`'s, shared).

The frozen reference policy travels in the batch (``batch["ref_params"]``, added by the stage's data
iterator, :class:`jaxlab.rl.llm.posttrain.WithFrozen`), so the step has the spine's signature and the
reference is an input of the compiled program, not a constant baked into it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlab.models.lm import LM
from jaxlab.models.sampling import response_logprobs, sample
from jaxlab.rl.llm.losses import (AGGREGATIONS, grpo_advantages, grpo_loss, kimi_length_reward, masked_mean,
                                  mirror_descent_loss, mixed_groups, sequence_kl)
from jaxlab.rl.llm.task import Task, rule_reward
from jaxlab.train_state import LossFn, TrainState, apply_update, loss_and_grads
from jaxlab.validation import check_positive

__all__ = ["GRPO_LOSSES", "GRPOSpec", "make_grpo_learner", "make_grpo_step", "sampled_logps", "update_epochs"]

GRPO_LOSSES = ("grpo", "mirror-descent")


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
    """Weight of Kimi k1.5's length reward (:func:`~jaxlab.rl.llm.losses.kimi_length_reward`) added to the rewards."""
    grad_accum: int = 1
    loss: str = "grpo"
    """grpo (clipped ratio, k3 KL to the reference) | mirror-descent (Kimi k1.5's online mirror descent:
    REINFORCE with the group mean as baseline, tethered to the sampling policy by ``tau``)."""
    mirror_tau: float = 0.5
    """Mirror descent's tau: the weight of the squared log-ratio to the sampling policy."""
    rollout_budget: int = 0
    """Partial rollouts (Kimi k1.5, section 2.6.2; :func:`make_grpo_step`): new tokens per step of a pool of
    rollouts in flight, kept in the train state (:class:`~jaxlab.rl.llm.partial_rollout.PartialGRPOState`); 0: every
    step samples its batch whole."""
    return_rollout: bool = False
    """Also return the step's rollout, ``metrics["rollout"]`` (``response`` [N * G, R], ``reward``, ``correct``,
    ``length`` [N * G]): the host's per-problem statistics and rollout log read it (and take it out of the
    metrics before they are logged)."""
    clip_eps_high: float | None = None
    """DAPO's clip-higher: the ratio's upper clip 1 + clip_eps_high (None: 1 + clip_eps, symmetric)."""
    length_penalty_warmup: int = 0
    """Kimi k1.5's warm-up (section 2.3.3): the length reward joins the rewards only from the stage's step
    ``length_penalty_warmup`` on (``state.step``, 0 at the stage's first step), after standard policy
    optimisation without it."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose rewards are all equal leave the loss and its normaliser
    (:func:`~jaxlab.rl.llm.losses.mixed_groups`; ``metrics["kept_groups"]`` their share kept)."""

    def __post_init__(self):
        check_positive(self, "group_size", "max_new_tokens", "ppo_epochs")
        check_positive(self, "grad_accum", integer=True)
        check_positive(self, "rollout_budget", "length_penalty_warmup", minimum=0, integer=True)
        if self.rollout_budget and self.return_rollout:
            raise ValueError(f"rollout_budget={self.rollout_budget} trains on rollouts of earlier steps' problems: it "
                             "cannot return the step's rollout (return_rollout=True)")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} must be >= 2 (advantages are relative to the group)")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} must be one of {AGGREGATIONS}")
        if self.loss not in GRPO_LOSSES:
            raise ValueError(f"loss={self.loss!r} must be one of {GRPO_LOSSES}")
        if not self.mirror_tau > 0:
            raise ValueError(f"mirror_tau={self.mirror_tau!r} must be > 0")
        if self.clip_eps_high is not None and not self.clip_eps_high > 0:
            raise ValueError(f"clip_eps_high={self.clip_eps_high!r} must be None or > 0")
        if self.loss != "grpo" and (self.clip_eps_high is not None or self.dynamic_sampling):
            raise ValueError(f"clip_eps_high={self.clip_eps_high!r} and dynamic_sampling={self.dynamic_sampling!r} "
                             f"are options of loss='grpo' (loss={self.loss!r})")
        if not (self.clip_eps > 0 and self.beta >= 0 and self.temperature > 0):
            raise ValueError(f"need clip_eps > 0, beta >= 0, temperature > 0; got {self.clip_eps=}, {self.beta=}, "
                             f"{self.temperature=}")


def update_epochs(state: TrainState, loss_fn: LossFn, batch: Any, key: jax.Array,
                  optimizer: optax.GradientTransformation, epochs: int, grad_accum: int = 1) -> tuple[TrainState, dict]:
    """``epochs`` optimizer steps of ``loss_fn(params, batch, key) -> (loss, metrics)`` on one batch of
    experience: the spine's ``loss_and_grads`` and ``apply_update`` (which skips a non-finite update) in a
    ``lax.scan``; epoch ``e`` gets ``fold_in(key, e)``. ``grad_accum``: each epoch's gradient accumulated over
    that many microbatches of the experience rows (weighted by the loss's ``loss_weight``: exact).

    ``state.step`` advances by one (it counts loop steps, the key schedule and checkpoints depend on it).
    Every metric is the mean over the epochs (as PPO codebases log ``clip_fraction``, ``kl`` and ``ratio``:
    the first epoch sees ratio 1 and clips nothing, so its statistics alone would always read 1 and 0),
    except ``nonfinite``, the number of epochs whose update was skipped."""
    step = state.step

    def one(state, e):
        loss, metrics, grads = loss_and_grads(loss_fn, state.params, batch, jax.random.fold_in(key, e), grad_accum)
        state, update = apply_update(state, grads, optimizer, loss)
        return state, {"loss": loss, **update, **metrics}

    state, history = jax.lax.scan(one, state, jnp.arange(epochs))
    metrics = jax.tree.map(lambda x: jnp.mean(x.astype(jnp.float32), axis=0), history)  # [epochs] -> mean
    metrics["nonfinite"] = jnp.sum(history["nonfinite"])
    return state.replace(step=step + 1), metrics


def sampled_logps(roll, temperature: float) -> jax.Array:
    """Log-probabilities [B, R] of a rollout's tokens under the distribution they were drawn from at
    ``temperature`` (no top-k/top-p): the model's own at T = 1 (``Sample.model_logps``), else the tempered
    ``Sample.logps``."""
    return roll.model_logps if temperature == 1 else roll.logps


def make_grpo_step(model: LM, task: Task, spec: GRPOSpec, optimizer: optax.GradientTransformation) -> Callable:
    """``train_step(state, batch, key) -> (state, metrics)``; ``state.params`` is the policy and
    ``batch = {"prompts" [N, Lp], "answers" [N, Ra], "ref_params"}`` (the frozen reference policy).

    The responses are drawn with ``key``; the update epochs with ``split(key)[1]``. The policy is the one the
    responses are sampled from, ``softmax(z / T)`` at ``spec.temperature``: the ratio's old log-probabilities are
    the sampler's (:func:`sampled_logps`), and the new and the reference log-probabilities are tempered alike
    (as TRL does), so a temperature other than 1 keeps the update on-policy.

    With ``spec.rollout_budget > 0`` the step is :func:`jaxlab.rl.llm.partial_rollout.make_partial_grpo_step`'s
    (``state`` a :class:`~jaxlab.rl.llm.partial_rollout.PartialGRPOState`)."""
    if spec.rollout_budget:
        from jaxlab.rl.llm.partial_rollout import make_partial_grpo_step  # it builds on this module

        return make_partial_grpo_step(model, task, spec, optimizer)
    learn = make_grpo_learner(model, task, spec, optimizer)

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        G = spec.group_size
        prompts = jnp.repeat(batch["prompts"], G, axis=0)  # [N * G, Lp], groups contiguous
        answers = jnp.repeat(batch["answers"], G, axis=0)  # [N * G, Ra]
        roll = sample(model, state.params, prompts, key, spec.max_new_tokens, temperature=spec.temperature,
                      eos_id=task.eos_id, pad_id=task.pad_id)
        return learn(state, roll, answers, batch["ref_params"], key)

    return train_step


def make_grpo_learner(model: LM, task: Task, spec: GRPOSpec, optimizer: optax.GradientTransformation) -> Callable:
    """``learn(state, roll, answers, ref_params, key, ready=None) -> (state, metrics)``: steps 2-4 of the module
    docstring on a rollout (a :class:`~jaxlab.models.sampling.Sample` of ``N * G`` rows, groups contiguous).
    ``ready`` bool [N]: train on these groups only (the others leave the loss and its normaliser, as DAPO's
    dynamic sampling drops groups: ``grpo_loss(keep=)``; the metrics are theirs); None: every group."""
    Lp, G = task.prompt_len, spec.group_size

    def loss_fn(params, exp: dict, key: jax.Array):
        del key
        logp = response_logprobs(model, params, exp["tokens"], Lp, spec.temperature)
        if spec.loss == "mirror-descent":
            return mirror_descent_loss(logp, exp["old_logp"], exp["rewards"], exp["mask"], G, spec.mirror_tau,
                                       keep=exp.get("keep"))
        return grpo_loss(logp, exp["old_logp"], exp["ref_logp"], exp["advantages"], exp["mask"],
                         clip_eps=spec.clip_eps, beta=spec.beta, aggregation=spec.aggregation,
                         clip_eps_high=spec.clip_eps_high, keep=exp.get("keep"))

    def learn(state: TrainState, roll, answers: jax.Array, ref_params, key: jax.Array, ready=None):
        correct, well_formed = task.verify(roll.response, answers)  # [N * G] each, one verifier pass
        lengths = task.response_lengths(roll.response)
        rewards = rule_reward(correct, well_formed, spec.format_weight)
        if spec.length_penalty:
            weight = jnp.where(state.step >= spec.length_penalty_warmup, spec.length_penalty, 0.0)
            rewards = rewards + weight * kimi_length_reward(lengths, correct, G)
        advantages = grpo_advantages(rewards, G, scale=spec.scale_rewards)  # [N * G]
        ref_logp = response_logprobs(model, ref_params, roll.tokens, Lp, spec.temperature)  # [N * G, R]
        old_logp = sampled_logps(roll, spec.temperature)  # [N * G, R]
        exp = {"tokens": roll.tokens, "old_logp": old_logp, "ref_logp": ref_logp, "advantages": advantages,
               "rewards": rewards, "mask": roll.mask}
        rows = None if ready is None else jnp.repeat(ready, G).astype(jnp.float32)  # [N * G]: the ready groups' rows
        mask = roll.mask if rows is None else roll.mask * rows[:, None]  # [N * G, R]
        keep = mixed_groups(rewards, G) if spec.dynamic_sampling else None  # [N * G]
        if rows is not None:
            keep = rows if keep is None else keep * rows
        if keep is not None:
            exp["keep"] = keep
        state, metrics = update_epochs(state, loss_fn, exp, jax.random.split(key)[1], optimizer, spec.ppo_epochs,
                                       spec.grad_accum)
        if rows is None:
            mean = group_mean = jnp.mean  # over the rows, over the groups
        else:
            mean = lambda x: masked_mean(x, rows)  # noqa: E731
            group_mean = lambda x: masked_mean(x, ready.astype(jnp.float32))  # noqa: E731
        solved = jnp.mean(correct.reshape(-1, G), axis=1)  # [N]
        metrics.update(reward=mean(rewards), accuracy=mean(correct), response_length=mean(lengths),
                       seq_kl=sequence_kl(old_logp, ref_logp, mask, rows),
                       mixed_groups=group_mean(((solved > 0) & (solved < 1)).astype(jnp.float32)),
                       entropy_proxy=-masked_mean(old_logp, mask))
        if spec.dynamic_sampling:
            metrics["kept_groups"] = group_mean(mixed_groups(rewards, G)[::G])
        if spec.return_rollout:
            metrics["rollout"] = {"response": roll.response, "reward": rewards, "correct": correct, "length": lengths}
        return state, metrics

    return learn
