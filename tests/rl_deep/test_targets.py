"""The off-policy agents' learning steps against hand-computed values: critic targets on fixed tiny batches
and hand-written networks, Polyak averaging and TD3's delay through one real ``learn`` call, SAC's
temperature, DQN's target-network timing and exploration schedule.

The networks of the target tests are written out (``Q_k(s, a) = q_k + w_k a``, a constant actor), so
every target is a number worked out below; online and target parameters differ, so a target computed with
the wrong network gives another number.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl import ddpg, dqn, sac, td3
from jaxlab.rl.ddpg import DeterministicState
from jaxlab.rl.sac import SACState
from jaxlab.xla_options import FAST_COMPILE

GAMMA = 0.5
BATCH = {"obs": jnp.zeros((4, 1)), "action": jnp.zeros((4, 1)), "reward": jnp.array([1.0, 2.0, -1.0, 0.5]),
         "next_obs": jnp.zeros((4, 1)), "terminated": jnp.array([False, True, False, False])}


def actor_fn(params, obs):  # a constant action: [B, A]
    return jnp.broadcast_to(params["mu"], (obs.shape[0], 1))


def critic_fn(params, obs, action):  # K linear critics: Q_k(s, a) = q_k + w_k a, [K, B]
    return params["q"][:, None] + params["w"][:, None] * action[None, :, 0]


def _deterministic_state(target_mu, q_target, w_target=(0.0, 0.0)):
    online_critic = {"q": jnp.array([100.0, 200.0]), "w": jnp.array([5.0, 5.0])}  # far from every target below
    return DeterministicState(actor_params={"mu": jnp.array(0.9)}, critic_params=online_critic,
                              target_actor_params={"mu": jnp.array(target_mu)},
                              target_critic_params={"q": jnp.array(q_target), "w": jnp.array(w_target)},
                              actor_opt_state=None, critic_opt_state=None, critic_steps=jnp.int32(0))


def _bootstrap(next_value):
    """``r + gamma (1 - terminated) next_value`` of ``BATCH`` with a scalar or [B] next value."""
    done = np.asarray(BATCH["terminated"], np.float32)
    return np.asarray(BATCH["reward"]) + GAMMA * (1 - done) * next_value


def test_ddpg_target_uses_the_target_critic_at_the_target_actors_action(key):
    cfg = ddpg.DDPGConfig(env_id="Continuous-probe", gamma=GAMMA)
    agent = _deterministic_state(target_mu=-0.3, q_target=[2.0, 7.0], w_target=[3.0, -1.0])
    y = ddpg.td_target(dataclasses.replace(cfg, num_critics=1), actor_fn, lambda p, s, a: critic_fn(p, s, a)[:1],
                       agent, BATCH, key)
    # one critic: Q'(s', mu'(s')) = 2 + 3 * (-0.3) = 1.1; the online critic (100 + 5 a) or actor (0.9) differ
    np.testing.assert_allclose(y, _bootstrap(1.1), rtol=1e-6)
    assert float(y[1]) == 2.0  # terminated: the reward alone


def test_td3_target_takes_the_min_of_twin_target_critics_and_clips_the_smoothing_noise(key):
    cfg = td3.TD3Config(env_id="Continuous-probe", gamma=GAMMA, target_noise=0.0)
    agent = _deterministic_state(target_mu=-0.3, q_target=[2.0, 7.0], w_target=[3.0, -1.0])
    # no noise: min(2 + 3 a', 7 - a') at a' = -0.3 is 1.1 (the max would be 7.3)
    np.testing.assert_allclose(ddpg.td_target(cfg, actor_fn, critic_fn, agent, BATCH, key), _bootstrap(1.1), rtol=1e-6)
    # noise of std 100 clipped to +-0.5, then the action clipped into [-1, 1]: a' = mu' +- 0.5 exactly
    big = dataclasses.replace(cfg, target_noise=100.0, target_noise_clip=0.5)
    batch = {k: jnp.tile(v, (8,) + (1,) * (v.ndim - 1)) for k, v in BATCH.items()}  # 32 rows
    for mu, allowed in ((-0.3, (-0.8, 0.2)), (0.9, (0.4, 1.0))):
        agent = _deterministic_state(target_mu=mu, q_target=[0.0, 50.0], w_target=[1.0, 0.0])  # min: Q'_1 = a'
        y = np.asarray(ddpg.td_target(big, actor_fn, critic_fn, agent, batch, key))
        live = ~np.asarray(batch["terminated"])
        next_q = (y[live] - np.asarray(batch["reward"])[live]) / GAMMA  # = a'
        assert np.all(np.isclose(next_q[:, None], allowed, atol=1e-5).any(axis=1)), next_q
        assert all(np.isclose(next_q, a, atol=1e-5).any() for a in allowed)  # both signs drawn


class _FixedPolicy:
    """A distribution whose sample and log-probability are given: ``(a' [B, 1], log pi(a'|s') [B])``."""

    def __init__(self, action, log_prob):
        self.action, self.log_prob = action, log_prob

    def sample_and_log_prob(self, seed):
        del seed
        return self.action, self.log_prob


def test_sac_soft_target_by_hand(key):
    cfg = sac.SACConfig(env_id="Continuous-probe", gamma=GAMMA)
    log_prob = jnp.array([-1.0, 0.5, 2.0, 0.0])
    policy_fn = lambda params, obs: _FixedPolicy(jnp.full((obs.shape[0], 1), params["a"]), log_prob)  # noqa: E731
    agent = SACState(actor_params={"a": jnp.array(0.5)}, critic_params={"q": jnp.array([100.0, 200.0]),
                                                                          "w": jnp.array([0.0, 0.0])},
                     target_critic_params={"q": jnp.array([3.0, 1.0]), "w": jnp.array([2.0, 4.0])},
                     log_alpha=jnp.log(jnp.array(0.2)), actor_opt_state=None, critic_opt_state=None,
                     alpha_opt_state=None)
    y = sac.soft_td_target(cfg, policy_fn, critic_fn, agent, BATCH, key)
    # min(3 + 2 * 0.5, 1 + 4 * 0.5) = 3; soft value 3 - 0.2 log pi (a + alpha log pi would add the entropy twice over)
    np.testing.assert_allclose(y, _bootstrap(3.0 - 0.2 * np.asarray(log_prob)), rtol=1e-6)


def test_sac_temperature_direction_and_target_entropy():
    assert sac.SACConfig(env_id="Pendulum-v1").target_entropy == -1.0  # -dim(A)
    assert sac.SACConfig(env_id="Pendulum-v1", target_entropy_scale=0.5).target_entropy == -0.5
    step = lambda entropy: -jax.grad(sac.alpha_loss)(jnp.log(0.3), entropy, -1.0)  # noqa: E731  (descent direction)
    assert float(step(-3.0)) > 0  # entropy below the target: alpha rises
    assert float(step(0.5)) < 0   # above: alpha falls
    np.testing.assert_allclose(sac.alpha_loss(jnp.log(0.3), -3.0, -1.0), -0.3 * (-1.0 + 3.0), rtol=1e-6)


def _learn_twice(module, cfg, key):
    """Two ``learn`` calls of the real agent on one random batch: the states before, between and after."""
    agent = module.make_agent(cfg)
    k_init, k_batch, k1, k2 = jax.random.split(key, 4)  # k1, k2: the two calls
    obs = jax.random.uniform(k_batch, (8, 1), minval=-1, maxval=1)
    batch = {"obs": obs, "action": -obs, "reward": 1.0 - 4 * obs[:, 0] ** 2, "next_obs": obs[::-1],
             "terminated": jnp.zeros(8, bool)}

    def run(key):
        s0 = agent.init(k_init, obs, -obs)
        # distinct targets, so an update that copies or ignores them shows
        s0 = s0.replace(target_critic_params=jax.tree.map(lambda x: x + 0.1, s0.target_critic_params))
        step = lambda s, k: (agent.learn(s, batch, k, 0)[0],) * 2  # noqa: E731
        return s0, jax.lax.scan(step, s0, jnp.stack([k1, k2]))[1]  # the states after each call, stacked

    s0, stacked = jax.jit(run).lower(key).compile(FAST_COMPILE)(key)
    return (s0, *(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(2)))


def _close(a, b):
    return all(np.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_td3_polyak_targets_and_policy_delay(key):
    """Step 0 is due: the actor moves and both targets become ``tau online + (1 - tau) target``. Step 1 is not:
    the actor, its Adam state and both targets stay exactly as they were; the critics move on every step."""
    cfg = td3.TD3Config(env_id="Continuous-probe", hidden_sizes=(8,), tau=0.3, learning_starts=0, batch_size=8)
    s0, s1, s2 = _learn_twice(td3, cfg, key)
    polyak = lambda online, target: jax.tree.map(lambda o, t: 0.3 * o + 0.7 * t, online, target)  # noqa: E731
    assert not _close(s1.actor_params, s0.actor_params)
    assert _close(s1.target_actor_params, polyak(s1.actor_params, s0.target_actor_params))
    assert _close(s1.target_critic_params, polyak(s1.critic_params, s0.target_critic_params))
    assert _equal(s2.actor_params, s1.actor_params) and _equal(s2.actor_opt_state, s1.actor_opt_state)
    assert _equal(s2.target_actor_params, s1.target_actor_params)
    assert _equal(s2.target_critic_params, s1.target_critic_params)
    assert not _close(s2.critic_params, s1.critic_params) and int(s2.critic_steps) == 2


def test_sac_polyak_targets(key):
    cfg = sac.SACConfig(env_id="Continuous-probe", hidden_sizes=(8,), tau=0.3, learning_starts=0, batch_size=8)
    s0, s1, _ = _learn_twice(sac, cfg, key)
    assert _close(s1.target_critic_params,
                  jax.tree.map(lambda o, t: 0.3 * o + 0.7 * t, s1.critic_params, s0.target_critic_params))


def test_dqn_target_network_copied_exactly_every_interval(key):
    """With 4 envs and an interval of 12 env steps, updates ending at 12, 24, 36 env steps copy the online
    network into the target; every other update leaves the target untouched."""
    cfg = dqn.DQNConfig(env_id="TimeLimitBandit-probe", num_envs=4, total_timesteps=40, learning_starts=0,
                        buffer_size=64, batch_size=8, hidden_sizes=(8,), target_update_interval=12)
    train = dqn.make_train(cfg)

    def run(key):
        def body(state, _):
            state, _ = train.update(state)
            return state, (state.agent.params, state.agent.target_params)

        return jax.lax.scan(body, train.init(key), None, length=cfg.num_updates)[1]

    params, targets = jax.jit(run).lower(key).compile(FAST_COMPILE)(key)  # leaves [U, ...]
    env_steps = cfg.steps_per_update * np.arange(1, cfg.num_updates + 1)
    leaf = lambda tree, i: [x[i] for x in jax.tree.leaves(tree)]  # noqa: E731
    for i, steps in enumerate(env_steps):
        if steps % 12 == 0:
            assert _equal(leaf(targets, i), leaf(params, i)), steps
        else:
            previous = leaf(targets, i - 1) if i else None
            assert i == 0 or _equal(leaf(targets, i), previous), steps
            assert not _close(leaf(targets, i), leaf(params, i)), steps


def test_dqn_epsilon_schedule_end_points():
    cfg = dqn.DQNConfig(total_timesteps=10_000, epsilon_start=0.9, epsilon_end=0.1, exploration_fraction=0.4)
    eps = lambda t: float(dqn.epsilon_schedule(cfg, jnp.asarray(t)))  # noqa: E731
    assert eps(0) == pytest.approx(0.9)
    assert eps(2_000) == pytest.approx(0.5)  # halfway through the decay
    assert eps(3_999) > 0.1 and eps(4_000) == pytest.approx(0.1) and eps(10_000) == pytest.approx(0.1)
