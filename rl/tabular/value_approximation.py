"""Value function approximation (Zhao, Chapter 8): feature maps for linear methods and deep Q-learning.

**Linear methods.** TD-linear (Sec. 8.2), Sarsa and Q-learning with linear function approximation
(Sec. 8.3) are the TD algorithms of :mod:`jaxlab.rl.tabular.td` given a feature matrix ``phi [S, F]``:

    from jaxlab.rl.tabular import td
    td.td_state_values(key, env, pi, config, features=fourier_features(env, order=3))   # TD-linear
    td.sarsa(key, env, config, features=polynomial_features(env, order=2))             # Sarsa-linear

with ``v(s) = phi(s)^T w`` and ``q(s, a) = phi(s)^T w_a`` (one weight vector per action). The features
of cell ``(row, col)`` use ``x = col`` and ``y = row`` scaled to ``[0, 1]`` (Fourier) or ``[-1, 1]``
(polynomial, which keeps the higher powers well conditioned).

**Deep Q-learning** (Sec. 8.4): a small MLP ``q(s, . ; w)`` trained on mini-batches from a replay buffer
to minimise ``E[(r + gamma max_a q(s', a; w_T) - q(s, a; w))^2]``, the target network ``w_T`` copied
from ``w`` every ``target_update_interval`` gradient steps. Data come from ``num_envs`` copies of the
environment driven through its gymnax API by a behaviour policy: uniform (``epsilon = 1``, the book's
off-policy setting) or epsilon-greedy on the online network. The network is deep RL's
:class:`jaxlab.rl.networks.QNetwork` (an MLP with optional LayerNorm), and :class:`GridDQNConfig` names
its fields as :class:`jaxlab.rl.dqn.DQNConfig` does where they mean the same thing.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.optim import OptimizerConfig, make_optimizer
from jaxlab.rl.networks import ACTIVATIONS, QNetwork
from jaxlab.rl.replay import UniformReplay
from jaxlab.rl.tabular.common import epsilon_greedy_policy, sample_action
from jaxlab.validation import check_positive

__all__ = [
    "GridDQNConfig",
    "GridDQNResult",
    "deep_q_learning",
    "fourier_features",
    "polynomial_features",
    "td_linear_fixed_point",
    "visitation_distribution",
]


def _unit_coordinates(env: Any) -> tuple[np.ndarray, np.ndarray]:
    """``x = col / (ncols - 1)`` and ``y = row / (nrows - 1)`` in ``[0, 1]`` for every state, ``[S]`` each."""
    rows, cols = np.divmod(np.arange(env.num_states), env.ncols)
    return cols / max(env.ncols - 1, 1), rows / max(env.nrows - 1, 1)


def polynomial_features(env: Any, order: int) -> jax.Array:
    """All monomials ``x^i y^j`` with ``i + j <= order`` of the cell coordinates scaled to ``[-1, 1]``:
    ``[1, x, y]`` for order 1, ``[1, x, y, x^2, xy, y^2]`` for order 2, ... ``[S, (order+1)(order+2)/2]``."""
    if order < 0:
        raise ValueError(f"order={order} must be >= 0")
    x, y = (2.0 * c - 1.0 for c in _unit_coordinates(env))
    cols = [x**i * y ** (d - i) for d in range(order + 1) for i in range(d, -1, -1)]
    return jnp.asarray(np.stack(cols, axis=1), jnp.float32)


def fourier_features(env: Any, order: int) -> jax.Array:
    """Fourier cosine basis ``cos(pi (c_1 x + c_2 y))`` for ``c_1, c_2 in {0, ..., order}`` with ``x, y``
    in ``[0, 1]``: ``[S, (order + 1)^2]``."""
    if order < 0:
        raise ValueError(f"order={order} must be >= 0")
    x, y = _unit_coordinates(env)
    c = np.array([(c1, c2) for c1 in range(order + 1) for c2 in range(order + 1)])  # [F, 2]
    return jnp.asarray(np.cos(np.pi * (x[:, None] * c[None, :, 0] + y[:, None] * c[None, :, 1])), jnp.float32)


@partial(jax.jit, static_argnames=("env", "episode_length"))
def visitation_distribution(env: Any, pi: jax.Array, episode_length: int) -> jax.Array:
    """State distribution ``d [S]`` of the data TD-linear sees: episodes of ``episode_length`` steps from
    the start distribution ``mu_0`` following ``pi``, i.e. ``d = (1/T) sum_{t<T} mu_0 P_pi^t`` (terminal
    states of episodic worlds are absorbing in the model but never updated, so they are dropped)."""
    P, _ = env.tabular_model()
    P_pi = jnp.einsum("sa,sat->st", pi, P)  # [S, S]
    mu = jnp.asarray(env.start_distribution, P_pi.dtype)
    _, mus = jax.lax.scan(lambda m, _: (m @ P_pi, m), mu, None, length=episode_length)  # [T, S]
    d = jnp.where(jnp.asarray(env.terminal), 0.0, mus.mean(0))
    return d / d.sum()


@jax.jit
def td_linear_fixed_point(P: jax.Array, R: jax.Array, pi: jax.Array, gamma: float, features: jax.Array,
                          d: jax.Array, terminal: jax.Array | None = None) -> jax.Array:
    """The weights TD-linear converges to (Sec. 8.2): the solution of ``A w = b`` with
    ``A = Phi^T D (I - gamma P_pi) Phi`` and ``b = Phi^T D r_pi``, ``D = diag(d)`` the state distribution
    of the data. ``terminal [S]`` (episodic worlds) zeroes bootstraps into terminal states, as the
    algorithm does. With one-hot features and ``d > 0`` it is ``v_pi`` itself."""
    P_pi = jnp.einsum("sa,sat->st", pi, P)  # [S, S]
    if terminal is not None:
        P_pi = jnp.where(jnp.asarray(terminal)[None, :], 0.0, P_pi)
    r_pi = jnp.einsum("sa,sa->s", pi, R)  # [S]
    Phi_D = features.T * d  # [F, S]
    A = Phi_D @ (jnp.eye(P.shape[0]) - gamma * P_pi) @ features  # [F, F]
    return jnp.linalg.solve(A, Phi_D @ r_pi)


@dataclasses.dataclass(frozen=True)
class GridDQNConfig:
    """Hyper-parameters of deep Q-learning on a grid world (defaults follow the book's Sec. 8.4 example:
    uniform behaviour, one hidden layer of 100 units, mini-batches of 100). Field names are those of
    :class:`jaxlab.rl.dqn.DQNConfig` where the meaning is the same."""

    gamma: float = 0.9
    """Discount rate."""
    hidden_sizes: tuple[int, ...] = (100,)
    """Hidden-layer widths of the Q-network."""
    activation: str = "relu"
    """Hidden activation: tanh, relu, elu or gelu."""
    layer_norm: bool = False
    """LayerNorm on the Q-network's hidden pre-activations."""
    learning_rate: float = 1e-3
    """Adam step size."""
    anneal_lr: bool = False
    """Decay the learning rate linearly to 0 over the gradient steps of the run. With a constant step size
    the RMS error of ``max_a q`` against ``v*`` on the book's grid (``target_update_interval=10``) is near
    0 after 1000 updates but drifts up again in longer runs: after 3000 updates it is 0.01-0.23 over 8
    seeds, with the greedy action optimal in every cell in 3 of them; annealed, all 8 end below 0.001
    with every cell optimal. Annealing over a run as short as 1000 updates stops learning too early
    (every cell optimal in 4 of 12 seeds, against 12 of 12 with the constant step size)."""
    batch_size: int = 100
    """Transitions per gradient step."""
    buffer_size: int = 10_000
    """Replay capacity in transitions."""
    num_envs: int = 8
    """Parallel environments feeding the buffer; each update adds one step of each."""
    num_updates: int = 3000
    """Iterations: each adds one step of every environment to the buffer and, once the buffer holds
    ``batch_size`` transitions, makes one gradient step."""
    target_update_interval: int = 100
    """Gradient steps between copies of the online network into the target network (deep RL's
    ``DQNConfig`` counts env steps instead; here each gradient step follows ``num_envs`` env steps)."""
    epsilon: float = 1.0
    """Behaviour exploration: 1 is the uniform policy (off-policy), below 1 epsilon-greedy."""
    log_every: int = 50
    """Updates between snapshots of the action-value table."""

    def __post_init__(self):
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma={self.gamma} must lie in [0, 1)")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon={self.epsilon} must lie in [0, 1]")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes={self.hidden_sizes} must be non-empty positive widths")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} must be one of {sorted(ACTIVATIONS)}")
        check_positive(self, "batch_size", "buffer_size", "num_envs", "num_updates", "target_update_interval", "log_every")
        if self.num_envs > self.buffer_size:
            raise ValueError(f"num_envs={self.num_envs} must not exceed buffer_size={self.buffer_size}")
        if self.num_updates % self.log_every:
            raise ValueError(f"num_updates={self.num_updates} must be a multiple of log_every={self.log_every}")

    @property
    def learning_updates(self) -> int:
        """Iterations that make a gradient step: those from the first whose buffer holds ``batch_size``
        transitions on."""
        return self.num_updates - min(-(-self.batch_size // self.num_envs), self.num_updates) + 1


class GridDQNResult(NamedTuple):
    """Online-network parameters, the final table ``q [S, A]``, the TD loss per iteration ``[U]`` (NaN
    while the buffer holds fewer than ``batch_size`` transitions and no update is made) and snapshots of
    the table every ``log_every`` iterations ``[U / log_every, S, A]``."""

    params: Any
    q: jax.Array
    losses: jax.Array
    q_history: jax.Array


def _network_input(env: Any, obs: jax.Array) -> jax.Array:
    """Float network input of a gymnax observation: one-hot as is, (row, col) scaled to [0, 1]."""
    if env.obs_type == "one_hot":
        return obs
    if env.obs_type == "coords":
        return obs / jnp.array([max(env.nrows - 1, 1), max(env.ncols - 1, 1)], jnp.float32)
    return jax.nn.one_hot(obs, env.num_states)


def deep_q_learning(key: jax.Array, env: Any, config: GridDQNConfig) -> GridDQNResult:
    """Deep Q-learning (Sec. 8.4) on ``env`` through its gymnax API; see the module docstring."""
    return _deep_q_learning(key, env, config)


# XLA:CPU spends about 8 s optimising this program and 3 s at backend optimisation level 0, which
# costs the (sub-second) run under 2x: compile time dominates at grid-world sizes.
@partial(jax.jit, static_argnames=("env", "config"), compiler_options={"xla_backend_optimization_level": 0})
def _deep_q_learning(key, env, config):
    net = QNetwork(env.num_actions, config.hidden_sizes, config.activation, config.layer_norm)
    params_env = env.default_params
    all_inputs = _network_input(env, env.observation(jnp.arange(env.num_states)))  # [S, D]
    k_init, k_reset, k_train = jax.random.split(key, 3)
    params = net.init(k_init, all_inputs[:1])
    optimizer = make_optimizer(OptimizerConfig(  # plain Adam, optionally annealed linearly to 0
        lr=config.learning_rate, algorithm="adam", b2=0.999, clip_norm=0.0, schedule="linear", min_lr_ratio=0.0,
        decay_steps=config.learning_updates if config.anneal_lr else None))
    buffer = UniformReplay(config.buffer_size)

    def act(params, key, obs):
        """Behaviour policy for a batch of observations ``[N, ...]``."""
        q = net.apply(params, _network_input(env, obs))  # [N, A]
        u = jax.random.uniform(key, (obs.shape[0],))
        return jax.vmap(sample_action)(u, epsilon_greedy_policy(q, config.epsilon))

    def env_step(carry, key, params):
        obs, state, replay = carry
        k_act, k_step = jax.random.split(key)
        action = act(params, k_act, obs)
        next_obs, state, reward, terminated, _, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(k_step, config.num_envs), state, action, params_env)
        transition = dict(obs=obs, action=action, reward=reward, next_obs=info["final_observation"],
                          terminated=terminated)
        return (next_obs, state, buffer.add(replay, transition)), None

    obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, config.num_envs), params_env)
    example = dict(obs=obs[0], action=jnp.int32(0), reward=jnp.float32(0), next_obs=obs[0],
                   terminated=jnp.bool_(False))
    carry = (obs, state, buffer.init(example))

    def loss_fn(params, target_params, batch):
        q = net.apply(params, _network_input(env, batch["obs"]))  # [B, A]
        q_sa = jnp.take_along_axis(q, batch["action"][:, None], axis=1)[:, 0]  # [B]
        q_next = net.apply(target_params, _network_input(env, batch["next_obs"])).max(axis=-1)  # [B]
        y = batch["reward"] + config.gamma * jnp.where(batch["terminated"], 0.0, q_next)
        return jnp.mean((jax.lax.stop_gradient(y) - q_sa) ** 2)

    def update(c, key):
        params, target_params, opt_state, env_carry, i = c
        k_env, k_batch = jax.random.split(key)
        env_carry, _ = env_step(env_carry, k_env, params)
        batch = buffer.sample(env_carry[2], k_batch, config.batch_size)
        loss, grads = jax.value_and_grad(loss_fn)(params, target_params, batch)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        # Learning starts once the buffer holds a mini-batch worth of transitions.
        ready = buffer.can_sample(env_carry[2], config.batch_size)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(ready, new, old),
                                         (optax.apply_updates(params, updates), new_opt_state), (params, opt_state))
        i = i + ready
        copy = ready & (i % config.target_update_interval == 0)
        target_params = jax.tree.map(lambda t, p: jnp.where(copy, p, t), target_params, params)
        return (params, target_params, opt_state, env_carry, i), jnp.where(ready, loss, jnp.nan)

    def chunk(c, key):
        c, losses = jax.lax.scan(update, c, jax.random.split(key, config.log_every))
        return c, (losses, net.apply(c[0], all_inputs))

    init = (params, params, optimizer.init(params), carry, jnp.asarray(0, jnp.int32))
    (params, *_), (losses, q_history) = jax.lax.scan(
        chunk, init, jax.random.split(k_train, config.num_updates // config.log_every))
    return GridDQNResult(params, net.apply(params, all_inputs), losses.reshape(-1), q_history)
