"""Env creation, action-space checks, the batched wrappers and the rollout's time-limit bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.rollout import env_reset, episode_metrics, rollout
from jaxlab.rl.wrappers import (ActionSpec, NormalizeReward, RunningMeanStd, check_action_space, make_env, make_vec_env,
                                normalize, update_running_mean_std)
from jaxlab.xla_options import FAST_COMPILE


def _rollout(env, params, policy, key, rollout_length):
    """A jitted rollout from reset, compiled without backend optimisation (compile time dominates)."""
    fn = jax.jit(lambda k: rollout(env, params, env_reset(env, params, k), policy, k, rollout_length))
    return fn.lower(key).compile(FAST_COMPILE)(key)


def test_make_env_unknown_id_and_action_space_mismatch():
    with pytest.raises(ValueError, match="unknown env_id='CartPole-v9'.*CartPole-v1"):
        make_env("CartPole-v9")
    with pytest.raises(ValueError, match="DDPG needs a continuous action space.*CartPole-v1.*discrete"):
        check_action_space("CartPole-v1", "DDPG", ("continuous",))
    assert ActionSpec.from_env(*make_env("CartPole-v1")) == ActionSpec("discrete", num_actions=2)
    spec = check_action_space("Pendulum-v1", "SAC", ("continuous",))
    assert spec.shape == (1,) and spec.low == (-2.0,) and spec.high == (2.0,)
    np.testing.assert_allclose(spec.to_env(jnp.array([[3.0], [-0.5]])), [[2.0], [-0.5]])


def test_running_mean_std_matches_numpy_over_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 3)).astype(np.float32) for n in (1, 7, 64, 5)]
    stats = RunningMeanStd.create((3,))
    update = jax.jit(update_running_mean_std)
    for b in batches:
        stats = update(stats, jnp.asarray(b))
    data = np.concatenate(batches)
    np.testing.assert_allclose(stats.mean, data.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.var, data.var(0), rtol=1e-3)
    z = normalize(stats, jnp.asarray(data))
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-3)


def _constant_policy(action):
    return lambda obs, key: (jnp.full(obs.shape[:1], action, jnp.int32), {})


def test_truncation_is_flagged_with_the_pre_reset_observation(key):
    """TimeLimitBandit-probe never terminates and is cut after 5 steps: truncated (not terminated) every 5th
    step, next_obs is the observation before auto-reset, and returns are tallied by the statistics wrapper."""
    env, params = make_vec_env("TimeLimitBandit-probe", num_envs=3)
    carry, traj = _rollout(env, params, _constant_policy(0), key, 12)
    assert traj.obs.shape == (12, 3, 2)
    expected = (np.arange(12) % 5 == 4)[:, None].repeat(3, 1)
    np.testing.assert_array_equal(traj.truncated, expected)
    np.testing.assert_array_equal(traj.terminated, False)
    np.testing.assert_array_equal(traj.episode_done, expected)
    np.testing.assert_array_equal(np.asarray(traj.next_obs).sum(-1), 1.0)  # one-hot contexts
    same = np.all(traj.next_obs[:-1] == traj.obs[1:], axis=-1)
    np.testing.assert_array_equal(same[~expected[:-1]], True)  # the episode goes on from next_obs
    reward = np.asarray(traj.reward)
    np.testing.assert_array_equal(reward, np.asarray(traj.obs)[..., 0])  # action 0 pays when context is 0
    returns = np.stack([reward[0:5].sum(0), reward[5:10].sum(0)])  # [2 episodes, E]
    np.testing.assert_array_equal(np.asarray(traj.episode_return)[expected].reshape(2, 3), returns)
    m = episode_metrics(traj)
    np.testing.assert_allclose(m["episode_return"], returns.mean())
    assert float(m["episode_length"]) == 5.0 and int(m["episodes"]) == 6
    # A window with no completed episode reports each env's latest completed return, not zero.
    np.testing.assert_allclose(episode_metrics(jax.tree.map(lambda x: x[10:], traj))["episode_return"],
                               returns[1].mean())
    assert np.isnan(float(episode_metrics(jax.tree.map(lambda x: x[:3], traj))["episode_return"]))


def test_cartpole_rollout_transitions_chain(key):
    """next_obs[t] == obs[t+1] except where the episode ended; there it is the terminal observation."""
    env, params = make_vec_env("CartPole-v1", num_envs=3)
    _, traj = _rollout(env, params, _constant_policy(1), key, 40)
    done = np.asarray(traj.done)
    assert done.any() and not np.asarray(traj.truncated).any()  # always pushing right falls over early
    same = np.all(np.isclose(traj.next_obs[:-1], traj.obs[1:]), axis=-1)
    np.testing.assert_array_equal(same, ~done[:-1])
    assert np.all(np.abs(np.asarray(traj.next_obs)[done][:, 2]) > 0.2 - 1e-6)  # the pole angle left +-12 degrees
    np.testing.assert_array_equal(traj.reward, 1.0)


def test_rollout_value_fn_evaluates_both_ends_of_each_transition(key):
    """``value_fn`` inside the step gives the critic of obs and of the pre-reset next_obs, as one call afterwards."""
    env, params = make_vec_env("TimeLimitBandit-probe", num_envs=3)
    value_fn = lambda obs: obs @ jnp.array([2.0, -1.0])  # noqa: E731
    fn = jax.jit(lambda k: rollout(env, params, env_reset(env, params, k), _constant_policy(0), k, 12, value_fn))
    _, traj = fn.lower(key).compile(FAST_COMPILE)(key)
    np.testing.assert_allclose(traj.extras["value"], value_fn(traj.obs))          # [T, E]
    np.testing.assert_allclose(traj.extras["next_value"], value_fn(traj.next_obs))
    assert not np.allclose(traj.extras["value"], traj.extras["next_value"])
    with pytest.raises(TypeError, match="extras must be a dict"):
        jax.eval_shape(lambda k: rollout(env, params, env_reset(env, params, k),
                                         lambda o, k: (jnp.zeros(3, jnp.int32), jnp.zeros(3)), k, 2, value_fn), key)


def test_normalisation_wrappers(key):
    env, params = make_vec_env("Pendulum-v1", num_envs=16, normalize_obs=True, normalize_reward=True, gamma=0.9)
    policy = lambda obs, k: (jax.random.uniform(k, (16, 1), minval=-2, maxval=2), {})  # noqa: E731
    _, traj = _rollout(env, params, policy, key, 300)
    obs = np.asarray(traj.obs[100:]).reshape(-1, 3)
    assert np.all(np.abs(obs.mean(0)) < 0.3) and np.all(np.abs(obs.std(0) - 1) < 0.3)
    # Rewards are scaled (Pendulum's raw rewards lie in [-16.3, 0]) but returns are reported raw.
    assert np.abs(np.asarray(traj.reward)).max() < 10.0
    assert float(episode_metrics(traj)["episode_return"]) < -500.0
    assert np.all(np.isfinite(traj.next_obs))


class _ScriptedEnv:
    """Two envs whose rewards and episode ends follow a script (``[T, 2]`` arrays), in the batched API."""

    def __init__(self, rewards, terminated, truncated):
        self.rewards, self.terminated, self.truncated = map(jnp.asarray, (rewards, terminated, truncated))

    def reset(self, key, params):
        return jnp.zeros((2, 1)), jnp.int32(0)

    def step(self, key, t, action, params):
        return (jnp.zeros((2, 1)), t + 1, self.rewards[t], self.terminated[t], self.truncated[t],
                {"final_observation": jnp.zeros((2, 1))})


def test_normalize_reward_divides_by_the_std_of_the_discounted_return():
    """By hand: each env's discounted return ``G_t = gamma G_{t-1} + r_t`` restarts at 0 after a termination or
    a truncation, the running variance pools every ``G`` seen so far (from a prior of variance 1 and weight
    1e-4), and the reward is divided by its square root."""
    gamma = 0.5
    rewards = np.array([[1.0, 2.0], [3.0, -1.0], [2.0, 0.5], [-2.0, 4.0], [1.0, 1.0], [0.0, 3.0]], np.float32)
    terminated = np.zeros((6, 2), bool)
    truncated = np.zeros((6, 2), bool)
    terminated[1, 0] = True   # env 0's first episode ends at step 1
    truncated[3, 1] = True    # env 1's is cut at step 3
    env = NormalizeReward(_ScriptedEnv(rewards, terminated, truncated), gamma=gamma, clip=1e6)
    _, state = env.reset(None, None)
    seen, ret, got, want = [], np.zeros(2), [], []
    step = jax.jit(lambda s: env.step(None, s, None, None))
    for t in range(6):
        _, state, scaled, *_ = step(state)
        ret = gamma * ret + rewards[t]
        seen.extend(ret)
        x, w = np.array(seen, np.float64), 1e-4  # the prior: mean 0, variance 1, weight w
        mean = x.sum() / (w + len(x))
        var = (w * (1.0 + mean**2) + np.sum((x - mean) ** 2)) / (w + len(x))
        got.append(np.asarray(scaled))
        want.append(rewards[t] / np.sqrt(var + 1e-8))
        ret = np.where(terminated[t] | truncated[t], 0.0, ret)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4)
    # the first step's returns 1 and 2 have std 0.5: rewards 2 and 4, the second clipped to 3
    clipped = NormalizeReward(_ScriptedEnv(rewards, terminated, truncated), gamma=gamma, clip=3.0)
    scaled = clipped.step(None, clipped.reset(None, None)[1], None, None)[2]
    np.testing.assert_allclose(scaled, [2.0, 3.0], rtol=1e-3)


def test_continuous_and_survival_probes(key):
    """ContinuousTimeLimit-probe pays ``1 - (a - x)^2`` with a fresh ``x`` every step and is cut (never
    terminated) after 5 steps; Survival-probe pays 1 per step and terminates with probability 0.2."""
    env, params = make_vec_env("ContinuousTimeLimit-probe", num_envs=2)
    follow = lambda obs, k: (obs * 0.5, {})  # noqa: E731  (a = x / 2)
    _, traj = _rollout(env, params, follow, key, 10)
    np.testing.assert_allclose(traj.reward, 1.0 - (0.5 * np.asarray(traj.obs)[..., 0]) ** 2, rtol=1e-6)
    np.testing.assert_array_equal(traj.truncated, (np.arange(10) % 5 == 4)[:, None].repeat(2, 1))
    np.testing.assert_array_equal(traj.terminated, False)
    assert not np.allclose(traj.obs[1:], traj.obs[:-1])  # a fresh target every step
    env, params = make_vec_env("Survival-probe", num_envs=8)
    _, traj = _rollout(env, params, _constant_policy(1), key, 100)
    np.testing.assert_array_equal(traj.reward, 1.0)
    assert 0.1 < float(np.mean(traj.terminated)) < 0.3 and not np.asarray(traj.truncated).any()
