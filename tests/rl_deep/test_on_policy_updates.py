"""TRPO's natural-gradient step and PPO's learn loop against written-out computations on tiny policies.

TRPO: the Fisher-vector product against the explicit Fisher matrix ``E_s sum_a pi(a|s) g_a g_a^T`` (``g_a``
the score of action ``a``) and against ``jax.hessian`` of the KL; the full step ``sqrt(2 max_kl / x^T F x) x``
and the line search's KL bound on a hand-made KL whose quadratic model underestimates it.
PPO: advantages standardised per minibatch, one permutation for every field of the batch, the learning
rate's end points, and metrics that are means over every epoch and minibatch.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.rl import ppo, trpo
from jaxlab.rl.on_policy import ActorCritic, Batch, minibatches, random_permutation
from jaxlab.xla_options import FAST_COMPILE

SMALL = dict(env_id="Bandit-probe", hidden_sizes=(3,))


def _flat_batch(ac, params, key, n=6):
    """A batch ``[n, ...]`` of the policy's own actions (ratio 1) with random advantages."""
    k_obs, k_act, k_adv = jax.random.split(key, 3)
    obs = jax.random.normal(k_obs, (n, 2))
    dist = ac.policy(params["actor"], obs)
    action = dist.sample(seed=k_act)
    adv = jax.random.normal(k_adv, (n,))
    return Batch(obs, action, dist.log_prob(action), jnp.zeros(n), adv, adv)


def _run(fn, *args):
    """``jax.jit(fn)(*args)`` compiled without backend optimisation (compile time dominates these tests)."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def _fisher_case(key):
    cfg = trpo.TRPOConfig(**SMALL)
    ac = ActorCritic.from_config(cfg, cfg.action_spec)
    params = ac.init(key, jnp.zeros((1, 2)))
    batch = _flat_batch(ac, params, key)
    theta, unravel, _, mean_kl = trpo.trpo_objectives(ac, params["actor"], batch, normalize=True)

    def log_pi(theta):  # [N, A]
        return jax.nn.log_softmax(ac.actor.apply(unravel(theta), batch.obs))

    jac = jax.jacobian(log_pi)(theta)  # [N, A, P]: the score of every action
    fisher = jnp.einsum("na,nap,naq->pq", jnp.exp(log_pi(theta)), jac, jac) / batch.obs.shape[0]  # [P, P]
    v = jax.random.normal(jax.random.fold_in(key, 1), theta.shape)
    return (fisher, jax.hessian(mean_kl)(theta), v, trpo.fisher_vector_product(mean_kl, theta, damping=0.0)(v),
            trpo.fisher_vector_product(mean_kl, theta, 0.5)(v))


def test_trpo_fisher_vector_product_is_the_fisher_matrix(key):
    fisher, hessian, v, fvp, damped = _run(_fisher_case, key)
    np.testing.assert_allclose(hessian, fisher, atol=1e-6)
    np.testing.assert_allclose(fvp, fisher @ v, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(damped, fisher @ v + 0.5 * v, rtol=1e-4, atol=1e-6)
    assert float(np.linalg.norm(fisher @ v)) > 1e-3  # not trivially zero


_A = jnp.array([1.0, 2.0, 4.0])  # the KL's Hessian at theta_old (diagonal)
_G = jnp.array([1.0, -1.0, 0.5])  # the surrogate's gradient


def _natural_step(max_kl, quartic):
    """The step on ``L = g . d`` and ``KL = d^T diag(A) d / 2 + quartic |d|^4`` (``d = theta - theta_old``)."""
    theta_old = jnp.array([0.3, -0.2, 0.1])
    cfg = trpo.TRPOConfig(max_kl=max_kl, cg_iters=3, cg_damping=0.0, line_search_steps=10, backtrack_ratio=0.5)
    surrogate = lambda th: jnp.vdot(_G, th - theta_old)  # noqa: E731
    mean_kl = lambda th: (0.5 * jnp.sum(_A * (th - theta_old) ** 2)  # noqa: E731
                          + quartic * jnp.sum((th - theta_old) ** 2) ** 2)
    theta, metrics = _run(lambda th: trpo.natural_gradient_step(cfg, surrogate, mean_kl, th), theta_old)
    x = np.asarray(_G / _A)  # F^-1 g, exact after 3 CG steps on a 3x3 system
    beta = np.sqrt(2 * max_kl / np.sum(x * np.asarray(_A) * x))
    return np.asarray(theta - theta_old), metrics, beta * x


def test_trpo_full_step_reaches_max_kl_on_the_quadratic_model():
    step, metrics, full = _natural_step(max_kl=0.01, quartic=0.0)
    np.testing.assert_allclose(step, full, rtol=1e-5)  # beta = sqrt(2 max_kl / x^T F x)
    np.testing.assert_allclose(metrics["kl"], 0.01, rtol=1e-5)  # exactly on the boundary of a quadratic KL
    assert float(metrics["step_fraction"]) == 1.0 and float(metrics["line_search_accepted"]) == 1.0


def test_trpo_line_search_keeps_the_kl_within_max_kl():
    """A quartic term the quadratic model misses: the full step overshoots the trust region, so the line
    search backtracks to the first fraction ``0.5^k`` whose KL is within ``max_kl``."""
    max_kl, quartic = 0.5, 2.0
    step, metrics, full = _natural_step(max_kl, quartic)
    d2 = np.sum(full**2)
    kl = lambda f: max_kl * f**2 + quartic * f**4 * d2**2  # noqa: E731  (the quadratic part is max_kl f^2)
    first = next(0.5**k for k in range(10) if kl(0.5**k) <= max_kl)
    assert first < 1 and kl(1.0) > max_kl
    np.testing.assert_allclose(metrics["step_fraction"], first)
    np.testing.assert_allclose(step, first * full, rtol=1e-5)
    assert float(metrics["kl"]) <= max_kl
    np.testing.assert_allclose(metrics["kl"], kl(first), rtol=1e-4)


def test_ppo_normalises_advantages_within_each_minibatch(key):
    cfg = ppo.PPOConfig(**SMALL)
    plain = dataclasses.replace(cfg, normalize_advantages=False)
    ac = ActorCritic.from_config(cfg, cfg.action_spec)

    def losses(key):
        params = ac.init(key, jnp.zeros((1, 2)))
        mb = _flat_batch(ac, params, key)
        mb = mb.replace(log_prob=mb.log_prob - 0.3)  # ratios of 1.35: the clipped branch matters too
        shifted = mb.replace(advantage=mb.advantage * 7.0 + 3.0)  # the minibatch's own statistics remove this
        by_hand = mb.replace(advantage=(mb.advantage - mb.advantage.mean()) / (mb.advantage.std() + 1e-8))
        return (ppo.ppo_loss(cfg, ac, params, shifted), ppo.ppo_loss(plain, ac, params, by_hand),
                ppo.ppo_loss(plain, ac, params, shifted)[0])

    (loss, metrics), (loss_by_hand, metrics_by_hand), unnormalised = _run(losses, key)
    np.testing.assert_allclose(loss, loss_by_hand, rtol=1e-5)
    np.testing.assert_allclose(metrics["policy_loss"], metrics_by_hand["policy_loss"], rtol=1e-5)
    assert not np.isclose(unnormalised, loss)


@pytest.mark.parametrize("n", [1, 2, 7, 512, 4097, 70_000])  # 1, 1, 1, 2, 2 and 4 rounds
def test_random_permutation_is_a_permutation(n):
    for seed in range(3):
        perm = np.asarray(random_permutation(jax.random.PRNGKey(seed), n))
        assert perm.dtype == np.int32 and perm.shape == (n,)
        np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    with pytest.raises(ValueError, match="n=0"):
        random_permutation(jax.random.PRNGKey(0), 0)


def test_random_permutation_is_uniform():
    """Every one of the 3! orders of 3 items, and every (item, position) pair of 6 items, as often as a
    uniform draw makes them (within 5 standard errors over 60,000 draws); different keys, different orders."""
    keys = jax.random.split(jax.random.PRNGKey(0), 60_000)
    perms3 = np.asarray(jax.vmap(lambda k: random_permutation(k, 3))(keys))  # [S, 3]
    codes = perms3 @ np.array([9, 3, 1])
    counts = np.array([np.sum(codes == c) for c in np.unique(codes)])
    assert len(counts) == 6
    p, n = 1 / 6, len(keys)
    assert np.all(np.abs(counts / n - p) < 5 * np.sqrt(p * (1 - p) / n)), counts
    perms6 = np.asarray(jax.vmap(lambda k: random_permutation(k, 6))(keys))  # [S, 6]
    freq = np.stack([(perms6 == item).mean(0) for item in range(6)])  # [item, position]
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n)), freq
    assert len({tuple(r) for r in perms6[:100]}) > 90


def test_minibatches_share_one_permutation_across_fields(key):
    T, E, M = 4, 3, 2
    index = jnp.arange(T * E, dtype=jnp.float32).reshape(T, E)  # row t, env e holds t * E + e in every field
    batch = Batch(obs=jnp.stack([index, -index], -1), action=index.astype(jnp.int32), log_prob=index + 0.5,
                  value=index * 2, advantage=index - 1, target=index * 3)
    mbs = minibatches(batch, key, M)  # leaves [M, T*E/M, ...]
    rows = np.asarray(mbs.action)
    assert rows.shape == (M, T * E // M)
    np.testing.assert_array_equal(np.sort(rows.reshape(-1)), np.arange(T * E))  # a permutation of the rows
    assert not np.array_equal(rows.reshape(-1), np.arange(T * E))  # shuffled
    for got, want in ((mbs.obs[..., 0], rows), (mbs.obs[..., 1], -rows), (mbs.log_prob, rows + 0.5),
                      (mbs.value, rows * 2), (mbs.advantage, rows - 1), (mbs.target, rows * 3)):
        np.testing.assert_array_equal(got, want)


def test_ppo_learning_rate_anneals_to_zero_over_every_optimizer_step():
    """Adam's first steps on a constant gradient move by the learning rate itself, so the update sizes trace the
    schedule: ``lr`` at step 0, ``lr (1 - k / N)`` at step k, 0 from ``N = updates x epochs x minibatches`` on."""
    cfg = ppo.PPOConfig(num_envs=2, rollout_length=4, total_timesteps=16, num_epochs=3, num_minibatches=2,
                        learning_rate=0.1, max_grad_norm=0.0, **SMALL)
    assert cfg.num_updates == 2
    opt = ppo.ppo_optimizer(cfg)
    steps = cfg.num_updates * cfg.num_epochs * cfg.num_minibatches  # 12
    params, state, sizes = jnp.zeros(()), opt.init(jnp.zeros(())), []
    for _ in range(steps + 2):
        update, state = opt.update(jnp.ones(()), state, params)
        sizes.append(-float(update))
    np.testing.assert_allclose(sizes[:steps], 0.1 * (1 - np.arange(steps) / steps), rtol=1e-4)
    assert sizes[steps:] == [0.0, 0.0]
    constant = ppo.ppo_optimizer(dataclasses.replace(cfg, anneal_lr=False))
    state = constant.init(jnp.zeros(()))
    for _ in range(steps + 1):
        update, state = constant.update(jnp.ones(()), state, params)
    np.testing.assert_allclose(-float(update), 0.1, rtol=1e-4)


def test_ppo_metrics_are_means_over_every_epoch(key):
    """Three epochs with a large step: the first sees ratio 1 (nothing clipped), the later ones clip; the
    logged clip fraction, KL and ratio are the means of the three epochs' values, not the first's."""
    cfg = ppo.PPOConfig(num_envs=2, rollout_length=8, num_epochs=3, num_minibatches=1, learning_rate=0.3,
                        anneal_lr=False, max_grad_norm=0.0, **SMALL)
    ac = ActorCritic.from_config(cfg, cfg.action_spec)
    optimizer = ppo.ppo_optimizer(cfg)

    def run(key):
        params = ac.init(key, jnp.zeros((1, 2)))
        flat = _flat_batch(ac, params, key, n=16)
        batch = jax.tree.map(lambda x: x.reshape((8, 2) + x.shape[1:]), flat)  # [T, E, ...]
        _, _, logged = ppo.make_learn(cfg, ac, optimizer)(params, optimizer.init(params), batch, key)

        def epoch(carry, _):  # one minibatch: the whole batch, whatever its order
            p, opt_state = carry
            grads, metrics = jax.grad(lambda q: ppo.ppo_loss(cfg, ac, q, flat), has_aux=True)(p)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), metrics

        return logged, jax.lax.scan(epoch, (params, optimizer.init(params)), None, length=cfg.num_epochs)[1]

    logged, history = _run(run, key)
    epochs = [jax.tree.map(lambda x, i=i: x[i], history) for i in range(cfg.num_epochs)]
    assert float(epochs[0]["clip_fraction"]) == 0.0 and float(epochs[0]["approx_kl"]) == pytest.approx(0, abs=1e-7)
    assert all(float(m["clip_fraction"]) > 0 for m in epochs[1:])
    for name in ("clip_fraction", "approx_kl", "ratio", "policy_loss", "value_loss", "entropy"):
        np.testing.assert_allclose(logged[name], np.mean([m[name] for m in epochs]), rtol=1e-4, atol=1e-6)
    assert float(logged["clip_fraction"]) > 0
