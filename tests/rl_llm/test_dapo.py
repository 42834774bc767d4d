"""DAPO's options in GRPO (Yu et al. 2025): clip-higher and dynamic sampling, by hand on tiny batches, and their
way from the config and the command line to the step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.cli import _parse
from jaxlab.rl.llm.grpo import GRPOSpec
from jaxlab.rl.llm.losses import AGGREGATIONS, grpo_loss, mirror_descent_loss, mixed_groups
from jaxlab.rl.llm.posttrain import PostTrainConfig
from jaxlab.train_state import LOSS_WEIGHT


def _batch(B=6, T=5, seed=0):
    rng = np.random.default_rng(seed)
    logp = jnp.asarray(rng.normal(-1.0, 0.3, (B, T)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.3, (B, T)), jnp.float32)
    ref = logp + jnp.asarray(rng.normal(0, 0.3, (B, T)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=B), jnp.float32)
    lengths = rng.integers(1, T + 1, size=B)
    mask = jnp.asarray(np.arange(T)[None, :] < lengths[:, None], jnp.float32)
    return logp, old, ref, adv, mask


def test_clip_higher_by_hand():
    # one token per sequence: ratios 1.25 (advantage +1) and 0.75 (advantage -1)
    old = jnp.zeros((2, 1))
    logp = jnp.log(jnp.array([[1.25], [0.75]]))
    adv, mask = jnp.array([1.0, -1.0]), jnp.ones((2, 1))

    def loss(lp, high):
        return grpo_loss(lp, old, lp, adv, mask, clip_eps=0.2, beta=0.0, clip_eps_high=high)

    # symmetric: 1.25 is clipped to 1.2 (surrogate 1.2 * 1), 0.75 to 0.8 (min(-0.75, -0.8) = -0.8)
    sym, sym_metrics = loss(logp, None)
    np.testing.assert_allclose(float(sym), -(1.2 - 0.8) / 2, rtol=1e-6)
    assert float(sym_metrics["clip_fraction"]) == 1.0
    # clip-higher 0.28: 1.25 < 1.28 is no longer clipped; the lower clip is unchanged
    high, high_metrics = loss(logp, 0.28)
    np.testing.assert_allclose(float(high), -(1.25 - 0.8) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(high_metrics["clip_fraction"]), 0.5)
    # the gradient reaches the up-weighted token only under clip-higher
    g_sym = jax.grad(lambda lp: loss(lp, None)[0])(logp)
    g_high = jax.grad(lambda lp: loss(lp, 0.28)[0])(logp)
    assert float(g_sym[0, 0]) == 0.0
    np.testing.assert_allclose(float(g_high[0, 0]), -1.25 / 2, rtol=1e-5)  # d(-rho A / 2)/dlogp = -rho / 2
    # None is the symmetric clip exactly
    args = _batch()
    for aggregation in AGGREGATIONS:
        a = grpo_loss(*args, aggregation=aggregation)
        b = grpo_loss(*args, aggregation=aggregation, clip_eps_high=0.2)
        assert float(a[0]) == float(b[0])
    with pytest.raises(ValueError, match="clip_eps_high=0.0 must be None or > 0"):
        grpo_loss(*args, clip_eps_high=0.0)


def test_mixed_groups_by_hand():
    keep = mixed_groups(jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.2, 1.2]), 2)
    np.testing.assert_array_equal(keep, [1, 1, 0, 0, 0, 0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="group_size"):
        mixed_groups(jnp.ones(5), 2)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_dynamic_sampling_is_the_loss_over_the_kept_groups_only(aggregation):
    logp, old, ref, adv, mask = _batch()
    rewards = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # groups of 2: mixed, all right, mixed
    keep = mixed_groups(rewards, 2)
    rows = np.array([0, 1, 4, 5])
    kw = dict(clip_eps=0.2, beta=0.1, aggregation=aggregation, clip_eps_high=0.28)

    def dropped(lp):
        return grpo_loss(lp, old, ref, adv, mask, keep=keep, **kw)

    def kept_only(lp):
        return grpo_loss(lp[rows], old[rows], ref[rows], adv[rows], mask[rows], **kw)

    (loss, metrics), (want, want_metrics) = dropped(logp), kept_only(logp)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    for name in ("kl", "clip_fraction", "ratio", "policy_loss", LOSS_WEIGHT):
        np.testing.assert_allclose(float(metrics[name]), float(want_metrics[name]), rtol=1e-6, err_msg=name)
    grad = jax.grad(lambda lp: dropped(lp)[0])(logp)
    want_grad = jax.grad(lambda lp: kept_only(lp)[0])(logp)
    np.testing.assert_allclose(grad[rows], want_grad[rows], rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad)[2:4] == 0)  # the dropped group: no gradient (its KL term left too)
    # without the filter the all-equal group still weighs in the normaliser (and its KL term in the loss)
    assert abs(float(grpo_loss(logp, old, ref, adv, mask, **kw)[0]) - float(want)) > 1e-4
    # no group kept: loss 0, finite
    none, none_metrics = grpo_loss(logp, old, ref, adv, mask, keep=jnp.zeros(6), **kw)
    assert float(none) == 0.0 and float(none_metrics[LOSS_WEIGHT]) == 0.0
    # microbatches weighted by their loss_weight give the whole batch's loss (gradient accumulation)
    halves = [grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], keep=keep[s], **kw)
              for s in (slice(0, 3), slice(3, 6))]
    weights = [float(m[LOSS_WEIGHT]) for _, m in halves]
    np.testing.assert_allclose(sum(float(l) * w for (l, _), w in zip(halves, weights)) / sum(weights), float(loss),
                               rtol=1e-6)


def test_mirror_descent_keep_is_the_loss_over_the_kept_groups_only():
    """Partial rollouts train mirror descent on the finished groups only: the others leave the loss, its mean,
    the metrics and the microbatch weight, as grpo_loss's keep does."""
    logp, old, _, _, mask = _batch()
    rewards = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    keep, rows = jnp.array([1.0, 1.0, 0.0, 0.0, 1.0, 1.0]), np.array([0, 1, 4, 5])
    loss, metrics = mirror_descent_loss(logp, old, rewards, mask, 2, 0.5, keep=keep)
    want, want_metrics = mirror_descent_loss(logp[rows], old[rows], rewards[rows], mask[rows], 2, 0.5)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    for name in ("policy_loss", "log_ratio_sq", LOSS_WEIGHT):
        np.testing.assert_allclose(float(metrics[name]), float(want_metrics[name]), rtol=1e-6, err_msg=name)
    grad = jax.grad(lambda lp: mirror_descent_loss(lp, old, rewards, mask, 2, 0.5, keep=keep)[0])(logp)
    assert np.all(np.asarray(grad)[2:4] == 0)
    halves = [mirror_descent_loss(logp[s], old[s], rewards[s], mask[s], 2, 0.5, keep=keep[s])
              for s in (slice(0, 2), slice(2, 6))]  # microbatches of whole groups, 2 and 2 sequences kept of 2 and 4
    weights = [float(m[LOSS_WEIGHT]) for _, m in halves]
    np.testing.assert_allclose(sum(float(l) * w for (l, _), w in zip(halves, weights)) / sum(weights), float(loss),
                               rtol=1e-6)
    none, none_metrics = mirror_descent_loss(logp, old, rewards, mask, 2, 0.5, keep=jnp.zeros(6))
    assert float(none) == 0.0 and float(none_metrics[LOSS_WEIGHT]) == 0.0


def test_options_reach_the_spec_and_the_command_line(capsys):
    cfg = PostTrainConfig(clip_eps_high=0.28, dynamic_sampling=True)
    spec = cfg.grpo_spec()
    assert spec.clip_eps_high == 0.28 and spec.dynamic_sampling and spec.clip_eps == 0.2
    assert PostTrainConfig().grpo_spec().clip_eps_high is None and not PostTrainConfig().grpo_spec().dynamic_sampling
    parsed = _parse(PostTrainConfig, ["--clip-eps-high", "0.28", "--dynamic-sampling"], default=PostTrainConfig(),
                    prog="jaxlab train posttrain")
    assert parsed.clip_eps_high == 0.28 and parsed.dynamic_sampling
    with pytest.raises(SystemExit):
        _parse(PostTrainConfig, ["--help"], default=PostTrainConfig(), prog="jaxlab train posttrain")
    help_text = capsys.readouterr().out
    assert "--clip-eps-high" in help_text and "--dynamic-sampling" in help_text and "clip-higher" in help_text


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip_eps_high=0.0), "clip_eps_high=0.0 must be None or > 0"),
    (dict(loss="mirror-descent", dynamic_sampling=True), "are options of loss='grpo'"),
    (dict(loss="mirror-descent", clip_eps_high=0.3), "are options of loss='grpo'"),
])
def test_spec_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOSpec(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip_eps_high=-0.1), "clip_eps_high=-0.1 must be None or > 0"),
    (dict(method="dpo", dynamic_sampling=True), "are for method='grpo'"),
])
def test_config_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostTrainConfig(**kwargs)
