"""Gradient accumulation in every post-training stage: one step with ``grad_accum=2`` equals the step on the
whole batch (the losses weigh their microbatches by the terms they average: answer tokens for SFT, response
tokens for GRPO's token mean and PPO, pairs for DPO and the reward model)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.models.lm import LM, LMConfig, init_params
import jaxlab.rl.llm.posttrain as posttrain
from jaxlab.rl.llm.posttrain import PostTrainConfig, _build_step, stage_optimizer_config
from jaxlab.rl.llm.ppo_rlhf import PPOSpec
from jaxlab.rl.llm.grpo import GRPOSpec
from jaxlab.rl.llm.reward_model import init_reward_params
from jaxlab.rl.llm.task import VOCAB_SIZE, Task
from jaxlab.train_state import create_train_state

TASK = Task("add", 1)
CFG = LMConfig(vocab_size=VOCAB_SIZE, d_model=32, num_layers=1, num_heads=2, max_len=TASK.prompt_len + 5)


def _params():
    return init_params(LM(CFG), jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))


def _pairs(n):
    """Preference pairs of random responses (the stages only need their shapes and masks)."""
    rng = np.random.default_rng(1)
    prompts, _ = TASK.sample(jax.random.PRNGKey(2), n)
    out = {}
    for side in ("chosen", "rejected"):
        resp = rng.integers(3, VOCAB_SIZE, (n, 5)).astype(np.int32)
        lengths = rng.integers(1, 6, n)
        mask = (np.arange(5)[None] < lengths[:, None]).astype(np.float32)  # unequal lengths: weights matter
        out[side] = np.concatenate([np.asarray(prompts), resp], axis=1)
        out[f"{side}_mask"] = mask
        out[f"ref_{side}"] = rng.standard_normal(n).astype(np.float32)
    return out


def _step(kind, spec, params, batch, grad_accum):
    """One step of the stage under plain SGD: the parameter change is the (accumulated) gradient itself (AdamW's
    first step divides each gradient by its own magnitude, which turns ulp-sized differences of near-zero
    components into lr-sized ones)."""
    opt = stage_optimizer_config(1e-2)
    step = jax.jit(_build_step(kind, CFG, TASK, spec, opt, grad_accum))
    state = create_train_state(jax.tree.map(jnp.copy, params), posttrain._optimizer(kind, CFG, opt),
                               jax.random.PRNGKey(3))
    state, metrics = step(state, batch, jax.random.PRNGKey(4))
    return state.params, metrics


@pytest.mark.parametrize("kind", ["sft", "dpo", "reward_model", "grpo", "ppo-rlhf"])
def test_two_microbatches_equal_the_whole_batch(kind, monkeypatch):
    monkeypatch.setattr(posttrain, "_optimizer", lambda kind, model_cfg, opt_cfg: optax.sgd(1.0))
    params = _params()
    prompts, answers = TASK.sample(jax.random.PRNGKey(5), 6)
    batch, spec = {"prompts": prompts, "answers": answers}, None
    if kind == "dpo":
        batch, spec = _pairs(4), (0.1, "sigmoid", 1.0)
    elif kind == "reward_model":
        batch, params = _pairs(4), init_reward_params(params, CFG.d_model)
    elif kind == "grpo":
        spec = GRPOSpec(group_size=4, max_new_tokens=5, ppo_epochs=2, format_weight=0.5)
        batch["ref_params"] = params
    elif kind == "ppo-rlhf":
        spec = PPOSpec(samples_per_prompt=2, max_new_tokens=5, ppo_epochs=2)
        batch.update(ref_params=params, reward_params=init_reward_params(params, CFG.d_model))
        params = {"policy": params, "value": init_reward_params(params, CFG.d_model)}
    one, m1 = _step(kind, spec, params, batch, 1)
    two, m2 = _step(kind, spec and (dataclasses.replace(spec, grad_accum=2)
                                    if dataclasses.is_dataclass(spec) else spec), params, batch, 2)
    assert float(m1["grad_norm"]) > 0
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for p0, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one), jax.tree.leaves(two)):
        g1, g2 = np.asarray(p0) - np.asarray(a), np.asarray(p0) - np.asarray(b)  # the gradients (SGD, lr 1)
        assert np.max(np.abs(g2 - g1)) <= 1e-4 * np.max(np.abs(g1)) + 1e-9


def test_grad_accum_must_divide_the_batches():
    with pytest.raises(ValueError, match="sft_batch_size=6 must be divisible by grad_accum=4"):
        PostTrainConfig(sft_batch_size=6, batch_size=8, grad_accum=4)
    assert PostTrainConfig(batch_size=8, sft_batch_size=8, grad_accum=4).grpo_spec().grad_accum == 4
