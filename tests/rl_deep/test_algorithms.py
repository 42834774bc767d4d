"""Every algorithm learns a probe environment with a known answer under ``jit``; the off-policy loop
(DQN) also under ``vmap`` over two seeds. A2C's probe run goes through the ``jaxlab train rl`` trainer
(``test_drivers.py``), two seeds under ``vmap``.

Discrete algorithms face ``TimeLimitBandit-probe``: a fresh one-hot context every step, reward 1 for
the matching action, never terminating, cut after 5 steps. The optimal undiscounted return is 5 (a
context-blind policy gets 2.5), and with gamma = 0.9 the optimal critic says ``V = 1/(1 - gamma) = 10``
everywhere, but only if the time limit is bootstrapped: treating it as terminal caps the value targets
at ``(1 - 0.9^5)/0.1 = 4.1``. Continuous algorithms face ``ContinuousTimeLimit-probe``: a fresh target ``x``
every step, reward ``1 - (a - x)^2``, never terminating, cut after 5 steps. The optimal return is 5 (a
random action gets 5/3, the context-blind ``a = 0`` gets 10/3), and with gamma = 0.8 the optimal critic says
``Q(x, x) = 1/(1 - gamma) = 5``, but only if the critics' targets bootstrap through the time limit (``r +
gamma Q'(s', mu'(s'))``): treating it as terminal caps them at ``(1 - 0.8^5)/0.2 = 3.4``.

Tests compile with XLA's backend optimisation off and one hidden layer: compile time dominates.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl import a2c, ddpg, dqn, ppo, reinforce, sac, td3, trpo
from jaxlab.rl.networks import ContinuousQ, Critic, QNetwork
from jaxlab.xla_options import FAST_COMPILE

VMAPPED = ("dqn",)  # on-policy runs are vmapped over seeds in the trainer test (test_drivers.py)
DISCRETE = dict(env_id="TimeLimitBandit-probe", gamma=0.9, hidden_sizes=(32,))
OFF_POLICY = dict(num_envs=4, buffer_size=2_000, batch_size=64, learning_starts=256, hidden_sizes=(32,))
CONTINUOUS = dict(env_id="ContinuousTimeLimit-probe", gamma=0.8, tau=0.2, **OFF_POLICY)
CONTEXTS = jnp.eye(2)  # both observations of the bandit

CASES = {
    "ppo": (ppo, ppo.PPOConfig(num_envs=8, rollout_length=16, total_timesteps=6_400, learning_rate=3e-3,
                               num_minibatches=2, **DISCRETE)),
    "reinforce": (reinforce, reinforce.REINFORCEConfig(num_envs=16, rollout_length=10, total_timesteps=16_000,
                                                       learning_rate=1e-2, **DISCRETE)),
    "trpo": (trpo, trpo.TRPOConfig(num_envs=16, rollout_length=10, total_timesteps=6_400, max_kl=0.05,
                                   learning_rate=3e-3, **DISCRETE)),
    "dqn": (dqn, dqn.DQNConfig(total_timesteps=6_000, learning_rate=3e-3, exploration_fraction=0.3,
                               target_update_interval=100, **{**OFF_POLICY, **DISCRETE})),
    "ddpg": (ddpg, ddpg.DDPGConfig(total_timesteps=3_000, **CONTINUOUS)),
    "td3": (td3, td3.TD3Config(total_timesteps=3_000, **CONTINUOUS)),
    "sac": (sac, sac.SACConfig(total_timesteps=3_000, init_alpha=0.05, **CONTINUOUS)),
}
TARGETS = jnp.linspace(-0.9, 0.9, 5)[:, None]  # observations of the continuous probe


def _state_values(name, cfg, state):
    """The learnt value of each bandit context, ``[seeds, 2]``, or each critic's ``Q(x, x)`` at the continuous
    probe's ``TARGETS``, ``[seeds, K, 5]``."""
    if name in ("ddpg", "td3", "sac"):
        critic = ContinuousQ(cfg.num_critics if name != "sac" else 2, cfg.hidden_sizes, cfg.activation)
        return jax.vmap(lambda p: critic.apply(p, TARGETS, TARGETS))(state.agent.critic_params)
    if name == "dqn":
        q = QNetwork(2, cfg.hidden_sizes, cfg.activation, cfg.layer_norm)
        return jax.vmap(lambda p: q.apply(p, CONTEXTS).max(-1))(state.agent.params)
    critic = Critic(cfg.hidden_sizes, cfg.activation)
    return jax.vmap(lambda p: critic.apply(p, CONTEXTS))(state.params["critic"])


@pytest.mark.parametrize("name", list(CASES))
def test_learns_probe(name, key):
    module, cfg = CASES[name]
    train = module.make_train(cfg)
    if name in VMAPPED:
        keys = jax.random.split(key, 2)
        out = jax.jit(jax.vmap(train)).lower(keys).compile(FAST_COMPILE)(keys)
        first = jax.tree.leaves(out["state"])[0]
        assert not np.allclose(first[0], first[1])  # seeds are different runs (no shared init or exploration)
    else:
        out = jax.tree.map(lambda x: x[None], jax.jit(train).lower(key).compile(FAST_COMPILE)(key))
    m = out["metrics"]
    assert m["episode_return"].shape[1:] == (cfg.num_updates,)
    np.testing.assert_array_equal(m["env_steps"][0], cfg.steps_per_update * np.arange(1, cfg.num_updates + 1))
    final = np.nanmean(np.asarray(m["episode_return"])[:, -max(cfg.num_updates // 10, 2):], axis=1)  # per seed
    values = np.asarray(_state_values(name, cfg, out["state"]))
    if cfg.env_id == "ContinuousTimeLimit-probe":
        assert np.all(final > 4.6), final          # out of 5; a random action gets 5/3, a context-blind one 10/3
        assert np.all((values > 4.2) & (values < 5.6)), values  # 1/(1 - gamma) = 5, not <= 3.4
    else:
        assert np.all(final > 4.6), final          # out of 5; a context-blind policy gets 2.5
        assert np.all((values > 8.0) & (values < 11.0)), values  # 1/(1 - gamma) = 10, not <= 4.1
    assert np.all(np.isfinite(jax.tree.leaves(jax.tree.map(lambda x: x[:, -1], m))))


@pytest.mark.parametrize("make,match", [
    (lambda: ddpg.DDPGConfig(env_id="CartPole-v1"), "DDPG needs a continuous action space"),
    (lambda: sac.SACConfig(env_id="Acrobot-v1"), "SAC needs a continuous action space"),
    (lambda: dqn.DQNConfig(env_id="Pendulum-v1"), "DQN needs a discrete action space"),
    (lambda: ppo.PPOConfig(env_id="Cartpole-v1"), "unknown env_id='Cartpole-v1'.*CartPole-v1"),
    (lambda: ppo.PPOConfig(num_envs=4, rollout_length=10, num_minibatches=3), "num_minibatches=3 must divide"),
    (lambda: ppo.PPOConfig(total_timesteps=100), "total_timesteps=100 must be >= one update"),
    (lambda: td3.TD3Config(num_critics=1), "num_critics=1"),
    (lambda: trpo.TRPOConfig(backtrack_ratio=1.0), "backtrack_ratio=1.0"),
    (lambda: dqn.DQNConfig(epsilon_start=0.1, epsilon_end=0.5), "epsilon_end=0.5"),
    (lambda: a2c.A2CConfig(activation="swish"), "activation='swish'"),
])
def test_config_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_minatar_image_observations_take_the_cnn():
    """PPO and DQN build and trace on MinAtar's ``[10, 10, C]`` boolean images (traced only: no compile)."""
    for module, cfg in ((ppo, ppo.PPOConfig(env_id="Breakout-MinAtar", num_envs=2, rollout_length=8, num_minibatches=2,
                                            total_timesteps=32, hidden_sizes=(16,))),
                        (dqn, dqn.DQNConfig(env_id="Breakout-MinAtar", num_envs=2, total_timesteps=8, batch_size=4,
                                            buffer_size=8, learning_starts=0, hidden_sizes=(16,)))):
        out = jax.eval_shape(module.make_train(cfg), jax.random.PRNGKey(0))
        assert out["metrics"]["episode_return"].shape == (cfg.num_updates,)
        params = out["state"].params if module is ppo else out["state"].agent.params
        kernels = [x.shape for x in jax.tree.leaves(params) if len(x.shape) == 4]
        assert kernels and all(k[:2] == (3, 3) and k[3] == 16 for k in kernels)  # one 3x3x16 conv per network


def test_dqn_anneal_lr_counts_the_gradient_steps_taken(key):
    """``learning_updates`` is the number of updates that learn (after ``learning_starts``), and with
    ``anneal_lr`` the learning-rate schedule spans exactly the gradient steps taken (it ends at 0)."""
    cfg = dqn.DQNConfig(total_timesteps=200, num_envs=4, train_frequency=2, gradient_steps=3, learning_starts=37,
                        buffer_size=64, batch_size=8, hidden_sizes=(8,), anneal_lr=True, env_id="TimeLimitBandit-probe")
    out = jax.jit(dqn.make_train(cfg)).lower(key).compile(FAST_COMPILE)(key)
    learned = np.isfinite(np.asarray(out["metrics"]["q_loss"]))
    assert cfg.learning_updates == learned.sum() == 21  # updates 4..24 end at >= 40 env steps
    assert not learned[:4].any() and learned[4:].all()
    counts = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(out["state"].agent.opt_state)[0]
              if "count" in jax.tree_util.keystr(p)]
    assert counts and all(c == 21 * 3 for c in counts)


def test_values_in_rollout_is_only_a_speed_choice(key):
    """The critic evaluated inside each env step or once over the rollout gives the same training."""
    cfg = ppo.PPOConfig(num_envs=4, rollout_length=8, num_minibatches=2, total_timesteps=3 * 32, **DISCRETE)
    runs = [jax.jit(ppo.make_train(dataclasses.replace(cfg, values_in_rollout=v))).lower(key).compile(FAST_COMPILE)(key)
            for v in (True, False)]
    for name in ("value_loss", "policy_loss", "episode_return"):
        np.testing.assert_allclose(runs[0]["metrics"][name], runs[1]["metrics"][name], rtol=1e-4, atol=1e-6)
