"""PPO-RLHF's and GRPO's glue by hand: per-token rewards, the value slice and its next-value shift, GAE with
whitening over response tokens, the reward model's last-token index, ``grpo_loss`` with per-token
advantages, and update metrics averaged over the PPO epochs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.rl.llm import grpo_loss
from jaxlab.rl.llm.grpo import update_epochs
from jaxlab.rl.llm.ppo_rlhf import rlhf_advantages, token_rewards, values_before_tokens
from jaxlab.rl.llm.reward_model import last_token_positions
from jaxlab.train_state import create_train_state

MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.float32)  # responses of 3, 4 and 1 tokens


def test_token_rewards_kl_on_every_token_and_score_on_the_last():
    rng = np.random.default_rng(0)
    logp, ref = rng.normal(size=(2, 3, 4)).astype(np.float32)
    score = np.array([2.0, -1.0, 0.5], np.float32)
    rewards, is_last = token_rewards(jnp.asarray(score), jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(MASK), 0.1)
    want = -0.1 * (logp - ref) * MASK
    for b, last in enumerate([2, 3, 0]):
        want[b, last] += score[b]
    np.testing.assert_allclose(rewards, want, rtol=1e-6)
    np.testing.assert_array_equal(is_last, [[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]])


def test_values_before_tokens_and_last_token_positions():
    scores = jnp.tile(jnp.arange(7.0), (3, 1))  # the head's output at positions 0..6, prompts of 3 tokens
    # response token t sits at position 3 + t; its state is the prefix ending at position 2 + t
    np.testing.assert_array_equal(values_before_tokens(scores, 3), np.tile([2.0, 3.0, 4.0, 5.0], (3, 1)))
    # the reward model reads each response's last token: positions 3 + (3, 4, 1) - 1; an empty one its first
    np.testing.assert_array_equal(last_token_positions(jnp.asarray(MASK), 7), [5, 6, 3])
    np.testing.assert_array_equal(last_token_positions(jnp.zeros((1, 4)), 7), [3])


def test_rlhf_advantages_by_hand():
    """GAE over each response with ``V(s_{t+1})`` from the next token's value, 0 past the last token, no
    bootstrap past the episode's end, then whitened over the response tokens (the targets are not)."""
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(3, 4)).astype(np.float32) * MASK
    values = rng.normal(size=(3, 4)).astype(np.float32) * MASK
    is_last = np.array([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]], np.float32)
    gamma, lam = 0.9, 0.8
    adv, targets = rlhf_advantages(*map(jnp.asarray, (rewards, values, is_last, MASK)), gamma, lam)
    want = np.zeros((3, 4))
    for b in range(3):
        running = 0.0
        for t in reversed(range(4)):
            next_value = values[b, t + 1] if t + 1 < 4 else 0.0
            keep = 1.0 - is_last[b, t]
            delta = rewards[b, t] + gamma * keep * next_value - values[b, t]
            running = delta + gamma * lam * keep * running
            want[b, t] = running
    np.testing.assert_allclose(targets, want + values, rtol=1e-5, atol=1e-6)
    valid = want[MASK > 0]
    np.testing.assert_allclose(np.asarray(adv)[MASK > 0], (valid - valid.mean()) / valid.std(), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(adv)[MASK == 0] == 0)


def test_grpo_loss_with_per_token_advantages_by_hand():
    rng = np.random.default_rng(2)
    logp, old, ref = (rng.normal(size=(3, 4)) * 0.3 - 1.0 for _ in range(3))
    adv = rng.normal(size=(3, 4))  # one advantage per token (PPO-RLHF's GAE)
    eps, beta = 0.2, 0.1
    ratio = np.exp(logp - old)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    per_token = -(np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv) - beta * kl)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss, metrics = grpo_loss(f32(logp), f32(old), f32(ref), f32(adv), f32(MASK), clip_eps=eps, beta=beta)
    np.testing.assert_allclose(loss, (per_token * MASK).sum() / MASK.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio"], (ratio * MASK).sum() / MASK.sum(), rtol=1e-5)
    clipped = (np.abs(ratio - 1) > eps) * MASK
    np.testing.assert_allclose(metrics["clip_fraction"], clipped.sum() / MASK.sum(), rtol=1e-6)


def test_update_epochs_metrics_are_means_over_the_epochs(key):
    """Three epochs with a large step: the first sees ratio 1 and clips nothing, the later ones clip; every
    logged metric is the mean of the three epochs', and the loop counts one step."""
    tokens = jnp.array([[1, 2, 0, 3], [2, 2, 1, 0], [3, 0, 1, 2]])

    def logp_of(params):  # [B, T]: a free logit table as the policy
        return jnp.take_along_axis(jax.nn.log_softmax(params["logits"]), tokens[..., None], axis=-1)[..., 0]

    params = {"logits": jax.random.normal(key, (3, 4, 4))}
    batch = {"old_logp": logp_of(params), "advantages": jnp.asarray(np.random.default_rng(3).normal(size=(3, 4)),
                                                                     jnp.float32), "mask": jnp.asarray(MASK)}

    def loss_fn(params, batch, key):
        return grpo_loss(logp_of(params), batch["old_logp"], batch["old_logp"], batch["advantages"], batch["mask"])

    optimizer = optax.sgd(3.0)
    state = create_train_state(params, optimizer, key)
    run = jax.jit(lambda state, epochs: update_epochs(state, loss_fn, batch, key, optimizer, epochs),
                  static_argnums=1)
    after, logged = run(state, 3)
    assert int(after.step) == int(state.step) + 1 and int(logged["nonfinite"]) == 0
    epochs, s = [], state
    for _ in range(3):
        s, metrics = run(s, 1)
        epochs.append(metrics)
    assert float(epochs[0]["clip_fraction"]) == 0.0 and all(float(m["clip_fraction"]) > 0 for m in epochs[1:])
    for name in ("loss", "kl", "clip_fraction", "ratio", "policy_loss", "grad_norm"):
        np.testing.assert_allclose(logged[name], np.mean([m[name] for m in epochs]), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(after.params["logits"], s.params["logits"], rtol=1e-5, atol=1e-6)


def test_normalize_reward_gives_the_policy_samples_mean_0_std_1_and_keeps_rankings():
    """Ziegler et al. 2019: the head rescaled on the initial policy's samples; a shift or a sign flip of the
    scale would break mean 0 / std 1 or the ranking (and so pair accuracy)."""
    from jaxlab.models.lm import LM, LMConfig, init_params
    from jaxlab.rl.llm.reward_model import init_reward_params, normalize_reward, sequence_scores

    model = LM(LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, max_len=16))
    params = init_reward_params(init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)), 16)
    params["head"] = {"w": jax.random.normal(jax.random.PRNGKey(1), (16,)) * 3.0, "b": jnp.asarray(5.0)}
    tokens = jax.random.randint(jax.random.PRNGKey(2), (32, 8), 0, 16)
    mask = jnp.ones((32, 4))
    raw = sequence_scores(model, params, tokens, mask)
    normed, stats = normalize_reward(params, raw)
    scores = np.asarray(sequence_scores(model, normed, tokens, mask))
    assert abs(scores.mean()) < 1e-5 and abs(scores.std() - 1) < 1e-5
    np.testing.assert_array_equal(np.argsort(scores), np.argsort(np.asarray(raw)))
    assert stats["mean"] == np.float64(np.asarray(raw, np.float64).mean())
    with np.testing.assert_raises_regex(ValueError, "same score"):
        normalize_reward(params, np.full(8, 2.0))
