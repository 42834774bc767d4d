"""Policies, losses, targets, networks and conjugate gradient against their written-out forms."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.rl.losses import huber, policy_gradient_loss, ppo_clip_loss, q_learning_target, value_loss
from jaxlab.rl.networks import ContinuousQ, Critic, GaussianActor, QNetwork, polyak_update
from jaxlab.rl.policies import (categorical, scale_action, tanh_gaussian, tanh_gaussian_log_prob_reference,
                                unscale_action)
from jaxlab.rl.trpo import conjugate_gradient
from jaxlab.xla_options import FAST_COMPILE


def _run(fn, *args):
    """``jax.jit(fn)(*args)`` compiled without backend optimisation (compile time dominates these tests)."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def _tanh_gaussian_case(key):
    k1, k2, k3 = jax.random.split(key, 3)
    mean = jax.random.normal(k1, (64, 3)) * 2
    log_std = jax.random.uniform(k2, (64, 3), minval=-2, maxval=1)
    low, high = jnp.array([-2.0, 0.0, -1.0]), jnp.array([2.0, 1.0, 3.0])
    action, log_prob = tanh_gaussian(mean, log_std, low, high).sample_and_log_prob(seed=k3)
    unit = unscale_action(action, low, high)
    reference = tanh_gaussian_log_prob_reference(jnp.arctanh(unit), mean, log_std, low, high)
    _, saturated = tanh_gaussian(jnp.full((8, 1), 30.0), jnp.zeros((8, 1))).sample_and_log_prob(seed=k3)
    return low, high, action, unit, log_prob, reference, saturated, scale_action(unit, low, high)


def test_tanh_gaussian_log_prob_and_bounds(key):
    low, high, action, unit, log_prob, reference, saturated, rescaled = _run(_tanh_gaussian_case, key)
    assert np.all(action >= low) and np.all(action <= high)
    ok = np.all(np.abs(unit) < 0.99, axis=-1)  # atanh(a) recovers the pre-squash sample away from saturation
    assert ok.sum() > 20
    np.testing.assert_allclose(log_prob[ok], reference[ok], rtol=1e-3, atol=1e-3)
    assert np.all(np.isfinite(saturated))  # computed from u, not atanh(a)
    np.testing.assert_allclose(rescaled, action, atol=1e-5)


def test_categorical_entropy_and_log_prob():
    d = categorical(jnp.log(jnp.array([[0.5, 0.25, 0.25]])))
    np.testing.assert_allclose(d.entropy(), [-(0.5 * np.log(0.5) + 0.5 * np.log(0.25))], rtol=1e-6)
    np.testing.assert_allclose(d.log_prob(jnp.array([1])), [np.log(0.25)], rtol=1e-6)


def test_ppo_clip_loss_gradient():
    adv = jnp.array([1.0, -1.0, 2.0, -0.5])
    old = jnp.log(jnp.array([0.5, 0.5, 0.3, 0.2]))
    # At ratio 1 the clipped surrogate has the policy gradient's gradient.
    g_ppo = jax.grad(lambda lp: ppo_clip_loss(lp, old, adv, 0.2)[0])(old)
    g_pg = jax.grad(lambda lp: policy_gradient_loss(lp, adv))(old)
    np.testing.assert_allclose(g_ppo, g_pg, rtol=1e-6)
    # Beyond the clip range in the advantage's direction the gradient vanishes; against it, it stays.
    lp = old + jnp.log(jnp.array([1.5, 0.5, 1.1, 1.5]))
    loss, stats = ppo_clip_loss(lp, old, adv, 0.2)
    g = jax.grad(lambda x: ppo_clip_loss(x, old, adv, 0.2)[0])(lp)
    np.testing.assert_allclose(g[:2], 0.0)
    assert g[2] != 0 and g[3] != 0
    ratio = np.array([1.5, 0.5, 1.1, 1.5])
    ref = -np.mean(np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(stats["clip_fraction"], 0.75)


def test_value_loss_clipping_and_huber():
    v, old, t = jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 0.0, 1.9]), jnp.array([2.0, -1.0, 0.0])
    clipped = old + np.clip(v - old, -0.2, 0.2)
    ref = 0.5 * np.mean(np.maximum((v - t) ** 2, (clipped - t) ** 2))
    np.testing.assert_allclose(value_loss(v, t, old, 0.2), ref, rtol=1e-6)
    np.testing.assert_allclose(value_loss(v, t), 0.5 * np.mean((v - t) ** 2), rtol=1e-6)
    np.testing.assert_allclose(huber(jnp.array([0.5, -3.0])), [0.125, 2.5])


def test_q_learning_targets():
    r, term = jnp.array([1.0, 1.0]), jnp.array([False, True])
    q_target = jnp.array([[1.0, 5.0], [3.0, 4.0]])
    q_online = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(q_learning_target(r, term, 0.5, q_target), [1 + 0.5 * 5, 1])
    np.testing.assert_allclose(q_learning_target(r, term, 0.5, q_target, q_online), [1 + 0.5 * 1, 1])


def _network_outputs(key):
    obs = jnp.zeros((5, 4))
    critic, qnet = Critic((8,)), QNetwork(3, (8,))
    actor = GaussianActor(2, (8,), state_dependent_std=True)
    q = ContinuousQ(2, (8,))
    return (critic.apply(critic.init(key, obs), obs), qnet.apply(qnet.init(key, obs), obs),
            actor.apply(actor.init(key, obs), obs),
            q.apply(q.init(key, obs, jnp.zeros((5, 2))), obs + 1, jnp.ones((5, 2))))


def test_networks_shapes_and_polyak(key):
    v, q_discrete, (mean, log_std), q = _run(_network_outputs, key)
    assert v.shape == (5,) and q_discrete.shape == (5, 3)
    assert mean.shape == log_std.shape == (5, 2) and np.all((log_std >= -5) & (log_std <= 2))
    assert q.shape == (2, 5) and not np.allclose(q[0], q[1])  # two independent critics
    a, b = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
    np.testing.assert_allclose(polyak_update(a, b, 0.1)["w"], 0.1)
    np.testing.assert_allclose(polyak_update(a, b, 1.0)["w"], 1.0)


def test_conjugate_gradient_solves_spd_system():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(12, 12))
    A = m @ m.T + 0.5 * np.eye(12)
    b = rng.normal(size=12)
    x = _run(lambda b: conjugate_gradient(lambda v: jnp.asarray(A, jnp.float32) @ v, b, 40),
             jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-3, atol=1e-3)


def test_orthogonal_init_matches_jax_and_calls_no_lapack():
    """Same numbers as jax.nn.initializers.orthogonal, without the LAPACK QR custom call (which can
    deadlock on XLA:CPU when batched calls run concurrently on a 2-thread pool)."""
    from jaxlab.rl.networks import orthogonal

    key = jax.random.PRNGKey(3)
    for shape in [(4, 64), (64, 64), (64, 2), (3, 3, 4, 8)]:
        ours = orthogonal(1.5)(key, shape)
        np.testing.assert_allclose(ours, jax.nn.initializers.orthogonal(1.5)(key, shape), atol=1e-5)
    assert "custom_call" not in str(jax.make_jaxpr(lambda k: orthogonal()(k, (8, 8)))(key))
    assert "custom_call" not in str(jax.jit(lambda k: orthogonal()(k, (8, 8))).lower(key).as_text())
