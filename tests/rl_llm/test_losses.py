"""The post-training losses against hand-computed values, their limits, and masking of padding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.llm import dpo_loss, grpo_advantages, grpo_loss, kimi_length_reward, sequence_logprobs
from jaxlab.rl.llm.losses import masked_value_loss, masked_whiten, reward_model_loss


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)


def test_sequence_logprobs_by_hand_and_mask():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, size=(3, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
    lp = _log_softmax(logits)
    want = [sum(lp[b, t, tokens[b, t]] * mask[b, t] for t in range(5)) for b in range(3)]
    got = sequence_logprobs(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # anything under mask = 0 (tokens, logits, even non-finite logits) changes nothing, nor its gradient
    logits2, tokens2 = logits.copy(), tokens.copy()
    logits2[mask == 0] = rng.normal(size=logits2[mask == 0].shape) * 10
    tokens2[mask == 0] = (tokens2[mask == 0] + 3) % 7
    np.testing.assert_allclose(sequence_logprobs(jnp.asarray(logits2), jnp.asarray(tokens2), jnp.asarray(mask)), got,
                               rtol=1e-6)
    grad = jax.grad(lambda x: sequence_logprobs(x, jnp.asarray(tokens), jnp.asarray(mask)).sum())(jnp.asarray(logits))
    assert np.all(np.asarray(grad)[mask == 0] == 0) and np.any(np.asarray(grad)[mask == 1] != 0)
    with pytest.raises(ValueError, match="mask shape"):
        sequence_logprobs(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask[:, :4]))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_by_hand(loss_type):
    pc, pr = jnp.array([-3.0, -1.0, -2.0]), jnp.array([-2.0, -4.0, -2.5])
    rc, rr = jnp.array([-2.5, -2.0, -2.0]), jnp.array([-2.0, -3.0, -3.0])
    beta = 0.5
    h = (np.array(pc) - np.array(rc)) - (np.array(pr) - np.array(rr))  # [-0.5, 2.0, -0.5]
    want = {"sigmoid": np.mean(np.log1p(np.exp(-beta * h))), "ipo": np.mean((h - 1 / (2 * beta)) ** 2),
            "hinge": np.mean(np.maximum(0, 1 - beta * h))}[loss_type]
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(metrics["reward_accuracy"], 1 / 3)
    np.testing.assert_allclose(metrics["reward_margin"], beta * h.mean(), rtol=1e-6)
    # the reference is a constant: no gradient reaches it
    g = jax.grad(lambda r: dpo_loss(pc, pr, r, rr, beta=beta, loss_type=loss_type)[0])(rc)
    assert np.all(np.asarray(g) == 0)


def test_dpo_limits_and_gradient_direction():
    x = jnp.array([-1.0, -5.0, -2.0, -7.0])
    y = jnp.array([-3.0, -2.0, -6.0, -4.0])
    loss, metrics = dpo_loss(x, y, x, y, beta=0.1)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)  # policy == reference
    assert float(metrics["reward_margin"]) == 0.0
    grad_c, grad_r = jax.grad(lambda c, r: dpo_loss(c, r, x, y)[0], argnums=(0, 1))(x, y)
    assert np.all(np.asarray(grad_c) < 0) and np.all(np.asarray(grad_r) > 0)  # raise chosen, lower rejected
    with pytest.raises(ValueError, match="loss_type='kto'"):
        dpo_loss(x, y, x, y, loss_type="kto")
    with pytest.raises(ValueError, match="beta=0"):
        dpo_loss(x, y, x, y, beta=0)


def test_grpo_advantages_by_hand():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 3.0])
    adv = np.asarray(grpo_advantages(r, 4))
    g = np.asarray(r).reshape(3, 4)
    want = (g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)  # population std
    np.testing.assert_allclose(adv, want.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv[:4], [1, -1, -1, 1], rtol=1e-5)
    assert np.all(adv[4:8] == 0) and np.all(np.isfinite(adv))  # identical rewards: zero, no NaN
    np.testing.assert_allclose(grpo_advantages(r, 4, scale=False), (g - g.mean(1, keepdims=True)).reshape(-1),
                               atol=1e-7)
    assert np.all(np.isfinite(jax.grad(lambda x: grpo_advantages(x, 4).sum())(r)))
    with pytest.raises(ValueError, match="group_size=5"):
        grpo_advantages(r, 5)


def _grpo_by_hand(logp, old, ref, adv, mask, eps, beta, aggregation):
    ratio = np.exp(logp - old)
    surr = np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps, 1 + eps) * adv[:, None])
    kl = np.exp(ref - logp) - (ref - logp) - 1
    per = -(surr - beta * kl) * mask
    if aggregation == "token-mean":
        return per.sum() / mask.sum()
    if aggregation == "sequence-mean":
        return np.mean(per.sum(1) / mask.sum(1))
    return per.sum() / mask.size


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean", "constant-norm"])
def test_grpo_loss_aggregations_by_hand(aggregation):
    rng = np.random.default_rng(1)
    logp, old, ref = (rng.normal(size=(3, 4)) * 0.3 - 1.0 for _ in range(3))
    adv = np.array([1.0, -0.5, 2.0])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], np.float64)
    want = _grpo_by_hand(logp, old, ref, adv, mask, 0.2, 0.04, aggregation)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss, metrics = grpo_loss(f32(logp), f32(old), f32(ref), f32(adv), f32(mask), clip_eps=0.2, beta=0.04,
                              aggregation=aggregation)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    np.testing.assert_allclose(metrics["kl"], (kl * mask).sum() / mask.sum(), rtol=1e-5)
    # padding: changing anything under mask = 0 changes neither the loss nor the gradient
    noisy = np.where(mask > 0, logp, 50.0)
    loss2, _ = grpo_loss(f32(noisy), f32(np.where(mask > 0, old, -50.0)), f32(ref), f32(adv), f32(mask),
                         aggregation=aggregation)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    grad = jax.grad(lambda x: grpo_loss(x, f32(old), f32(ref), f32(adv), f32(mask), aggregation=aggregation)[0])
    g1, g2 = np.asarray(grad(f32(logp))), np.asarray(grad(f32(noisy)))
    assert np.all(g1[mask == 0] == 0) and np.all(np.isfinite(g2)) and np.allclose(g1, g2, rtol=1e-6)


def test_grpo_loss_k3_zero_at_reference_and_clipping():
    logp = jnp.log(jnp.array([[0.5, 0.25], [0.2, 0.4]]))
    mask = jnp.ones((2, 2))
    loss, metrics = grpo_loss(logp, logp, logp, jnp.array([1.0, -1.0]), mask, beta=1.0)
    assert float(metrics["kl"]) == 0.0 and float(metrics["clip_fraction"]) == 0.0
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)  # ratio 1: -mean(A) = 0
    # ratio 1.5 > 1 + eps with A > 0: clipped, no gradient; with A < 0: unclipped (pessimistic min)
    old = logp - jnp.log(1.5)
    for a, clipped in ((1.0, True), (-1.0, False)):
        adv = jnp.full((2,), a)
        loss, metrics = grpo_loss(logp, old, logp, adv, mask, clip_eps=0.2, beta=0.0)
        np.testing.assert_allclose(loss, -a * (1.2 if clipped else 1.5), rtol=1e-5)
        assert float(metrics["clip_fraction"]) == 1.0
        g = jax.grad(lambda x: grpo_loss(x, old, logp, adv, mask, clip_eps=0.2, beta=0.0)[0])(logp)
        assert np.all(np.asarray(g) == 0) == clipped
    for kwargs, match in (({"aggregation": "sum"}, "aggregation='sum'"), ({"clip_eps": 0.0}, "clip_eps=0.0"),
                          ({"beta": -1.0}, "beta=-1.0")):
        with pytest.raises(ValueError, match=match):
            grpo_loss(logp, logp, logp, jnp.ones(2), mask, **kwargs)
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(logp, logp, logp, jnp.ones(3), mask)


def test_kimi_length_reward_by_hand():
    lengths = jnp.array([2.0, 4.0, 6.0, 3.0, 3.0, 3.0])
    correct = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    # group 1: lambda = 0.5, 0, -0.5 -> correct keeps it, wrong gets min(0, lambda); group 2: equal lengths
    np.testing.assert_allclose(kimi_length_reward(lengths, correct, 3), [0.5, 0.0, -0.5, 0, 0, 0])
    # the deciding case: the shortest response is wrong, so its positive lambda = 0.5 becomes min(0, 0.5) = 0
    np.testing.assert_allclose(kimi_length_reward(jnp.array([2.0, 4.0, 6.0]), jnp.array([0.0, 1.0, 1.0]), 3),
                               [0.0, 0.0, -0.5])


def test_reward_model_and_value_losses():
    loss, metrics = reward_model_loss(jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]))
    np.testing.assert_allclose(loss, (np.log1p(np.exp(-1.0)) + np.log1p(np.exp(2.0))) / 2, rtol=1e-6)
    assert float(metrics["accuracy"]) == 0.5
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    white = np.asarray(masked_whiten(x, mask))
    valid = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(white[np.asarray(mask) > 0], (valid - valid.mean()) / valid.std(), rtol=1e-5)
    assert np.all(white[np.asarray(mask) == 0] == 0)
    targets = jnp.zeros_like(x)
    np.testing.assert_allclose(masked_value_loss(x, targets, x, mask), 0.5 * np.mean(valid**2), rtol=1e-6)


def test_grpo_advantages_of_a_tied_group_are_exactly_zero():
    """Seven rewards of 0.1: fp32's mean is an ulp off 0.1, and dividing that residue by its own tiny std
    would give advantages of -0.0074 instead of 0 (a group with no signal must not move the policy)."""
    rewards = jnp.concatenate([jnp.full(7, 0.1, jnp.float32), jnp.arange(7, dtype=jnp.float32)])
    adv = grpo_advantages(rewards, 7)
    assert np.all(np.asarray(adv[:7]) == 0.0)
    np.testing.assert_allclose(np.asarray(adv[7:]), (np.arange(7) - 3) / (2 + 1e-6), rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(grpo_advantages(rewards, 7, scale=False)[:7]) == 0.0)


def test_mirror_descent_loss_gradient_by_hand():
    """Kimi k1.5 section 2.3.2: d loss / d logp[j, t] = (-(r_j - r_bar) + tau (S_j - S_j^old)) m[j, t] / B with
    S the masked sequence sums; r_bar the mean of the prompt's own group (not of the batch)."""
    from jaxlab.rl.llm.losses import mirror_descent_loss

    rng = np.random.default_rng(3)
    logp = jnp.asarray(rng.normal(size=(4, 3)) - 2, jnp.float32)
    old = jnp.asarray(rng.normal(size=(4, 3)) - 2, jnp.float32)
    mask = jnp.asarray([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], jnp.float32)
    rewards = jnp.asarray([1.0, 0.0, 1.0, 1.0])  # groups of 2: means 0.5 and 1.0
    tau = 0.3
    loss, metrics = mirror_descent_loss(logp, old, rewards, mask, group_size=2, tau=tau)
    S, S_old = np.sum(np.asarray(logp) * np.asarray(mask), 1), np.sum(np.asarray(old) * np.asarray(mask), 1)
    adv = np.array([0.5, -0.5, 0.0, 0.0])
    np.testing.assert_allclose(loss, np.mean(-adv * S + 0.5 * tau * (S - S_old) ** 2), rtol=1e-6)
    grad = jax.grad(lambda lp: mirror_descent_loss(lp, old, rewards, mask, 2, tau)[0])(logp)
    want = (-adv + tau * (S - S_old))[:, None] * np.asarray(mask) / 4
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    assert float(metrics["loss_weight"]) == 4
    # at the sampling policy the tether has no gradient: a REINFORCE step with the group-mean baseline
    at_old = jax.grad(lambda lp: mirror_descent_loss(lp, old, rewards, mask, 2, tau)[0])(old)
    np.testing.assert_allclose(at_old, -adv[:, None] * np.asarray(mask) / 4, atol=1e-7)
    with pytest.raises(ValueError, match="tau"):
        mirror_descent_loss(logp, old, rewards, mask, 2, 0.0)
