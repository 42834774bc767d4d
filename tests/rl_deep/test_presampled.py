"""Randomness drawn before the rollout's scan gives the numbers the per-step draws gave.

``rollout.step_keys`` against splitting step by step, ``policies.categorical_sample_and_log_prob`` on
``categorical_gumbel`` noise against distrax's ``sample_and_log_prob`` with the same keys (non-finite rows
included), and ``ActorCritic.act`` on ``action_noise`` against ``policy(...).sample_and_log_prob`` for a
categorical and a Gaussian policy, and a rollout with the envs' auto-resets drawn ahead
(``VecEnv.draw_steps``) against one whose steps draw them: equal bit for bit.
"""

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl import policies
from jaxlab.rl.on_policy import ActorCritic, OnPolicyConfig
from jaxlab.rl.rollout import env_reset, rollout, step_keys
from jaxlab.rl.wrappers import ActionSpec, VecEnv, make_vec_env


def test_step_keys_are_the_per_step_splits(key):
    policy_keys, env_keys = step_keys(key, 5)
    for t, k in enumerate(jax.random.split(key, 5)):
        k_policy, k_env = jax.random.split(k)
        np.testing.assert_array_equal(policy_keys[t], k_policy)
        np.testing.assert_array_equal(env_keys[t], k_env)


def test_categorical_from_gumbel_noise_is_distrax_sampling(key):
    keys = jax.random.split(key, 16)
    logits = 3.0 * jax.random.normal(jax.random.fold_in(key, 1), (16, 5, 3))  # [N, B, A]
    # Rows distrax marks invalid (a NaN or +inf logit, every logit -inf) and a valid row with a -inf logit.
    logits = (logits.at[0, 0].set(jnp.nan).at[0, 1, 0].set(jnp.inf).at[0, 2].set(-jnp.inf)
              .at[0, 3, 1].set(-jnp.inf))

    @jax.jit
    def both(logits, keys):
        fast = jax.vmap(policies.categorical_sample_and_log_prob)(logits, policies.categorical_gumbel(keys, (5, 3)))
        return fast, jax.vmap(policies.categorical_sample_and_log_prob_reference)(logits, keys)

    (action, log_prob), (ref_action, ref_log_prob) = both(logits, keys)
    assert action.dtype == ref_action.dtype
    np.testing.assert_array_equal(action, ref_action)
    np.testing.assert_array_equal(log_prob, ref_log_prob)
    np.testing.assert_array_equal(action[0, :3], -1)  # the invalid rows
    assert np.isfinite(np.asarray(log_prob[0, 3])) and (np.asarray(action[1:]) >= 0).all()


def test_act_on_action_noise_is_sample_and_log_prob(key):
    for env_id in ("Bandit-probe", "Continuous-probe"):
        cfg = OnPolicyConfig(env_id=env_id, hidden_sizes=(3,))
        ac = ActorCritic.from_config(cfg, cfg.action_spec)
        obs_dim = 2 if env_id == "Bandit-probe" else 1

        @jax.jit
        def both(key):
            obs = jax.random.normal(key, (4, 7, obs_dim))  # [T, B, *O]
            params = ac.init(key, obs[0])["actor"]
            keys = jax.random.split(jax.random.fold_in(key, 2), 4)
            noise = ac.action_noise(keys, 7)
            fast = jax.vmap(lambda o, n: ac.act(params, o, n))(obs, noise)
            ref = jax.vmap(lambda o, k: ac.policy(params, o).sample_and_log_prob(seed=k))(obs, keys)
            return fast, ref

        (action, log_prob), (ref_action, ref_log_prob) = both(key)
        np.testing.assert_array_equal(action, ref_action)
        np.testing.assert_array_equal(log_prob, ref_log_prob)


def _vec_env(env):
    while not isinstance(env, VecEnv):
        env = env._env
    return env


@pytest.mark.parametrize("env_id, max_steps", [("CartPole-v1", 20), ("Pendulum-v1", 7), ("Bandit-probe", None)])
def test_resets_drawn_ahead_are_the_per_step_resets(key, env_id, max_steps):
    """A rollout whose auto-resets are drawn before the scan (``VecEnv.draw_steps``) equals one that steps with
    keys (gymnax's step drawing its reset inside), over episode ends by termination and by time limit."""
    trajectories = []
    for ahead in (True, False):
        env, params = make_vec_env(env_id, 3, normalize_obs=True, normalize_reward=True)
        if max_steps is not None:
            params = params.replace(max_steps_in_episode=max_steps)
        assert _vec_env(env).draws_ahead
        _vec_env(env).draws_ahead = ahead
        spec = ActionSpec.from_env(env, params)

        def policy(obs, k, spec=spec):  # uniform random actions
            if spec.kind == "discrete":
                return jax.random.randint(k, obs.shape[:1], 0, spec.num_actions), {}
            low, high = spec.bounds()
            return jax.random.uniform(k, (obs.shape[0], *spec.shape), minval=low, maxval=high), {}

        carry = env_reset(env, params, key)
        trajectories.append(jax.jit(lambda c, k, env=env, params=params, policy=policy: rollout(
            env, params, c, policy, k, 40))(carry, jax.random.fold_in(key, 1)))
    (carry, traj), (ref_carry, ref_traj) = trajectories
    assert int(jnp.sum(traj.terminated | traj.truncated)) >= 3  # episodes ended and were reset inside the rollout
    for a, b in zip(jax.tree.leaves((carry, traj)), jax.tree.leaves((ref_carry, ref_traj))):
        np.testing.assert_array_equal(a, b)


def test_draw_steps_refuses_an_overridden_step(key):
    class OwnStep(gymnax.environments.environment.Environment):
        def step(self, key, state, action, params=None):
            raise AssertionError("not reached")

    vec = VecEnv(OwnStep(), 2)
    assert not vec.draws_ahead
    with pytest.raises(ValueError, match="overrides gymnax's step"):
        vec.draw_steps(jax.random.split(key, 3), None)
