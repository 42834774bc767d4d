"""DQN's Huber loss on a probe whose fixed points are known in closed form.

``Survival-probe``: reward 1 every step, termination with probability ``p = 0.2`` whatever the action, one
constant observation. The bootstrap target ``y = 1 + gamma (1 - terminated) Q`` takes two values; the mean
fixed point (squared loss, or Huber with ``delta`` above every TD error) is ``Q = 1 / (1 - gamma (1 - p))
= 3.57`` at gamma 0.9. With ``delta = 1`` the terminal TD errors (``Q - 1``) exceed ``delta``, their gradient
is capped at ``delta``, and the loss balances ``p delta`` against the other steps' errors:
``Q = (1 - delta p / (1 - p)) / (1 - gamma) = 7.5``. This is why ``huber_loss=True`` inflates CartPole's
values (``DQNConfig.huber_loss``), and not a defect of the loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl import dqn
from jaxlab.rl.networks import QNetwork
from jaxlab.xla_options import FAST_COMPILE

GAMMA, P = 0.9, 0.2


@pytest.mark.parametrize("delta, fixed_point", [(1.0, (1 - P / (1 - P)) / (1 - GAMMA)),  # 7.5
                                                (10.0, 1 / (1 - GAMMA * (1 - P)))],  # 3.57, the mean
                         ids=["delta-1", "delta-10"])
def test_huber_dqn_converges_to_its_fixed_point(delta, fixed_point, key):
    cfg = dqn.DQNConfig(env_id="Survival-probe", gamma=GAMMA, num_envs=4, total_timesteps=6_000, learning_rate=3e-3,
                        buffer_size=2_000, batch_size=64, learning_starts=200, hidden_sizes=(16,),
                        target_update_interval=100, exploration_fraction=0.1, huber_loss=True, huber_delta=delta)
    out = jax.jit(dqn.make_train(cfg)).lower(key).compile(FAST_COMPILE)(key)
    q = QNetwork(2, cfg.hidden_sizes, cfg.activation, cfg.layer_norm).apply(out["state"].agent.params, jnp.ones((1, 1)))
    np.testing.assert_allclose(q[0], fixed_point, rtol=0.1)  # both actions
    with pytest.raises(ValueError, match="huber_delta=0"):
        dqn.DQNConfig(huber_delta=0.0)
