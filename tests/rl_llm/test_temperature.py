"""Sampling at a temperature other than 1 keeps GRPO on-policy: the ratio's old log-probabilities are those of
the distribution the tokens were drawn from, and the new and reference ones are tempered alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlab.rl.llm.grpo as grpo
from jaxlab.models.lm import LM, LMConfig, init_params
from jaxlab.models.sampling import response_logprobs, sample
from jaxlab.rl.llm.task import EOS, PAD, VOCAB_SIZE, Task
from jaxlab.train_state import create_train_state

T = 0.5


def _model():
    model = LM(LMConfig(vocab_size=VOCAB_SIZE, d_model=32, num_layers=1, num_heads=2, max_len=16))
    return model, init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))


def test_tempered_logprobs_are_the_samplers():
    model, params = _model()
    task = Task("add", 1)
    prompts, _ = task.sample(jax.random.PRNGKey(1), 8)
    roll = sample(model, params, prompts, jax.random.PRNGKey(2), 5, temperature=T, eos_id=EOS, pad_id=PAD)
    tempered = response_logprobs(model, params, roll.tokens, task.prompt_len, temperature=T)
    mask = np.asarray(roll.mask) > 0
    np.testing.assert_allclose(np.asarray(tempered)[mask], np.asarray(grpo.sampled_logps(roll, T))[mask], atol=1e-5)
    plain = response_logprobs(model, params, roll.tokens, task.prompt_len)
    assert np.max(np.abs(np.asarray(plain - tempered)[mask])) > 1e-2  # the temperature matters here
    assert grpo.sampled_logps(roll, 1.0) is roll.model_logps  # T = 1: the model's own, as before


def test_grpo_experience_and_loss_use_the_sampled_policy(monkeypatch):
    model, params = _model()
    task = Task("add", 1)
    spec = grpo.GRPOSpec(group_size=4, max_new_tokens=5, temperature=T, ppo_epochs=1)
    seen = {}

    def capture(state, loss_fn, exp, key, optimizer, epochs, grad_accum=1):
        seen.update(exp=exp, loss=loss_fn(state.params, exp, key))
        return state, {}

    monkeypatch.setattr(grpo, "update_epochs", capture)
    tx = optax.sgd(0.0)
    step = grpo.make_grpo_step(model, task, spec, tx)
    prompts, answers = task.sample(jax.random.PRNGKey(3), 2)
    state = create_train_state(params, tx, jax.random.PRNGKey(4))
    step(state, {"prompts": prompts, "answers": answers, "ref_params": params}, jax.random.PRNGKey(5))
    exp, (_, metrics) = seen["exp"], seen["loss"]
    mask = np.asarray(exp["mask"]) > 0
    tempered = response_logprobs(model, params, exp["tokens"], task.prompt_len, temperature=T)
    np.testing.assert_allclose(np.asarray(exp["old_logp"])[mask], np.asarray(tempered)[mask], atol=1e-5)
    np.testing.assert_allclose(np.asarray(exp["ref_logp"])[mask], np.asarray(tempered)[mask], atol=1e-5)
    # at the sampling parameters the new policy is the old one: ratio 1, nothing clipped, no KL to the reference
    np.testing.assert_allclose(float(metrics["ratio"]), 1.0, atol=1e-5)
    assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["kl"]) < 1e-6
