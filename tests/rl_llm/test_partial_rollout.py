"""Partial rollouts (Kimi k1.5, section 2.6.2): a rollout continued in segments of any budget is the
uninterrupted sample; the GRPO step on a pool of rollouts in flight (the posttrain stage with rollout_budget, its
carry-over and exact resume: tests/rl_llm/test_long2short.py, which shortens that stage's policy)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.models.lm import LM, LMConfig, init_params
from jaxlab.models.sampling import sample
from jaxlab.rl.llm.grpo import GRPOSpec, make_grpo_step
from jaxlab.rl.llm.partial_rollout import continue_rollout, finished, start_rollout, to_sample, with_rollout_pool
from jaxlab.rl.llm.posttrain import PostTrainConfig
from jaxlab.rl.llm.task import VOCAB_SIZE, Task
from jaxlab.train_state import create_train_state

V, EOS, PAD, R = 13, 3, 0, 8
CFG = LMConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=4, max_len=16)


@pytest.fixture(scope="module")
def lm():
    model = LM(CFG)
    params = init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    prompts = jax.random.randint(jax.random.PRNGKey(1), (8, 5), 4, V)
    return model, params, prompts


def _segments(model, params, prompts, key, budget, **kwargs):
    state, calls = start_rollout(model, params, prompts, key, R, **kwargs), 0
    assert int(state.t) == 0 and not bool(jnp.any(finished(state)))
    while not bool(jnp.all(finished(state))):
        state, calls = continue_rollout(model, params, state, budget), calls + 1
        assert int(state.t) == min(calls * budget, R)
    return state, calls


@pytest.mark.parametrize("budget", [1, 3, R])
def test_segments_of_any_budget_equal_one_sample(lm, budget):
    model, params, prompts = lm
    key = jax.random.PRNGKey(7)
    want = sample(model, params, prompts, key, R, temperature=1.0, eos_id=EOS, pad_id=PAD)
    stopped = np.asarray(jnp.any(want.response == EOS, axis=1))
    assert stopped.any() and not stopped.all()  # EOS in some rows, not in others
    state, calls = _segments(model, params, prompts, key, budget, temperature=1.0, eos_id=EOS, pad_id=PAD)
    assert calls == -(-R // budget)
    got = to_sample(state)
    for name in ("tokens", "response", "logps", "mask", "model_logps"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), err_msg=name)


def test_greedy_without_eos_and_partial_state(lm):
    model, params, prompts = lm
    key = jax.random.PRNGKey(3)
    want = sample(model, params, prompts, key, R, temperature=0.0)
    state = continue_rollout(model, params, start_rollout(model, params, prompts, key, R, temperature=0.0), 3)
    part = to_sample(state)  # 3 tokens drawn, the rest pending: PAD with mask 0
    np.testing.assert_array_equal(np.asarray(part.response[:, :3]), np.asarray(want.response[:, :3]))
    assert np.all(np.asarray(part.response[:, 3:]) == PAD) and np.all(np.asarray(part.mask[:, 3:]) == 0)
    assert not bool(jnp.any(finished(state)))
    state = continue_rollout(model, params, continue_rollout(model, params, state, 3), 3)  # 9 steps > R = 8
    assert int(state.t) == R and bool(jnp.all(finished(state)))  # the step past R did nothing
    np.testing.assert_array_equal(np.asarray(to_sample(state).tokens), np.asarray(want.tokens))


def test_bad_arguments_are_named(lm):
    model, params, prompts = lm
    state = start_rollout(model, params, prompts, jax.random.PRNGKey(0), R)
    with pytest.raises(ValueError, match="budget=0"):
        continue_rollout(model, params, state, 0)
    with pytest.raises(ValueError, match="max_len"):
        start_rollout(model, params, prompts, jax.random.PRNGKey(0), 12)
    with pytest.raises(TypeError, match="PartialRollout"):
        continue_rollout(model, params, to_sample(state), 2)


# ---- GRPO on a pool of partial rollouts ------------------------------------------------------------
def _grpo_setup(budget):
    task = Task("add", 1)
    model = LM(LMConfig(vocab_size=VOCAB_SIZE, d_model=32, num_layers=1, num_heads=2,
                        max_len=task.prompt_len + task.answer_len + 2))
    params = init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, task.prompt_len), jnp.int32))
    spec = GRPOSpec(group_size=2, max_new_tokens=task.answer_len + 2, ppo_epochs=1, rollout_budget=budget)
    tx = optax.adam(1e-2)
    state = create_train_state(params, tx, jax.random.PRNGKey(1))
    return task, model, params, spec, tx, state


def test_grpo_with_a_budget_of_the_whole_response_is_plain_grpo():
    task, model, params, spec, tx, state = _grpo_setup(budget=0)
    whole = dataclasses.replace(spec, rollout_budget=spec.max_new_tokens)
    plain = jax.jit(make_grpo_step(model, task, spec, tx))
    partial = jax.jit(make_grpo_step(model, task, whole, tx))
    pooled = with_rollout_pool(state, model, task, whole, num_prompts=3)
    for i in range(2):  # each step starts, finishes and trains on a whole pool
        prompts, answers = task.sample(jax.random.PRNGKey(10 + i), 3)
        batch, key = {"prompts": prompts, "answers": answers, "ref_params": params}, jax.random.PRNGKey(20 + i)
        state, metrics = plain(state, batch, key)
        pooled, pooled_metrics = partial(pooled, batch, key)
        assert int(pooled_metrics["trained_groups"]) == 3 and int(pooled_metrics["unfinished_groups"]) == 0
        assert float(pooled_metrics["loss"]) == float(metrics["loss"])
    assert int(pooled.step) == int(state.step) == 2
    for a, b in zip(jax.tree.leaves(pooled.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="pool holds 3 groups, the batch 2"):
        partial(pooled, {**batch, "prompts": prompts[:2], "answers": answers[:2]}, key)


def test_rollout_budget_config_is_checked():
    with pytest.raises(ValueError, match="rollout_budget=2 is for method='grpo'"):
        PostTrainConfig(method="dpo", rollout_budget=2)
    with pytest.raises(ValueError, match="problem_pool=8"):
        PostTrainConfig(rollout_budget=2, problem_pool=8)
    with pytest.raises(ValueError, match="rollout_budget=-1"):
        PostTrainConfig(rollout_budget=-1)
