"""Networks of the deep RL agents (Flax linen) and target-network updates.

Every module takes observations with one batch axis, ``[B, *O]``: vector observations go through an
MLP, image observations ``[B, H, W, C]`` (MinAtar) through a small CNN first (Young & Tian 2019,
"MinAtar": one 3x3 conv with 16 channels, then the MLP). Hidden layers use orthogonal initialisation
with gain sqrt(2) and zero biases; each head chooses its own gain (0.01 for policy logits and means,
so the initial policy is near uniform; 1 for values), as in Andrychowicz et al. 2021 and PureJaxRL.

| module | output |
|---|---|
| ``Critic`` | ``V(s)`` ``[B]`` |
| ``DiscreteActor`` | logits ``[B, A]`` |
| ``GaussianActor`` | ``(mean [B, A], log_std [B, A])``; ``log_std`` a free parameter or a head |
| ``DeterministicActor`` | ``tanh(.)`` in ``[-1, 1]``, ``[B, A]`` (scale to the box with ``policies.scale_action``) |
| ``QNetwork`` | ``Q(s, .)`` ``[B, A]`` for discrete actions |
| ``ContinuousQ`` | ``Q_i(s, a)`` ``[K, B]`` for ``K`` independent critics (``nn.vmap``) |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ACTIVATIONS",
    "Critic",
    "ContinuousQ",
    "DeterministicActor",
    "DiscreteActor",
    "GaussianActor",
    "MLP",
    "MinAtarCNN",
    "QNetwork",
    "Torso",
    "orthogonal",
    "polyak_update",
]

ACTIVATIONS: dict[str, Callable] = {"tanh": nn.tanh, "relu": nn.relu, "elu": nn.elu, "gelu": nn.gelu}


def _orthonormal_columns(a: jax.Array) -> jax.Array:
    """Q of ``a = Q R`` with ``diag(R) > 0`` for ``a`` [n, m], n >= m, by Gram-Schmidt with one
    reorthogonalisation pass ("twice is enough", Giraud et al. 2005): plain jnp, no LAPACK call."""

    def column(q, j):
        v = a[:, j]
        for _ in range(2):
            v = v - q @ (q.T @ v)  # columns >= j of q are still zero
        return q.at[:, j].set(v / jnp.linalg.norm(v)), None

    q, _ = jax.lax.scan(column, jnp.zeros_like(a), jnp.arange(a.shape[1]))
    return q


def orthogonal(scale: float = 1.0) -> Callable:
    """Orthogonal initialiser (Saxe et al. 2014) for kernels ``[..., fan_out]``: the same distribution as
    ``jax.nn.initializers.orthogonal`` (a Haar-random orthonormal matrix times ``scale``).

    It orthonormalises a Gaussian matrix with :func:`_orthonormal_columns` rather than a LAPACK QR:
    on XLA:CPU, batched LAPACK custom calls that run concurrently (a network's layers initialised under
    ``vmap`` over seeds) can wait on each other's pool threads forever when the pool is as small as the
    number of calls (jaxlib's ``ParallelBatchMap``; seen on 2-core machines).
    """

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        n, m = max(rows, cols), min(rows, cols)
        q = _orthonormal_columns(jax.random.normal(key, (n, m), jnp.float32))  # [n, m]
        q = q if rows >= cols else q.T  # [rows, cols]
        return (scale * q).reshape(shape).astype(dtype)

    return init


def _dense(features: int, scale: float) -> nn.Dense:
    return nn.Dense(features, kernel_init=orthogonal(scale), bias_init=nn.initializers.zeros)


class MLP(nn.Module):
    """Dense layers of ``hidden_sizes`` with ``activation``; ``[B, D] -> [B, hidden_sizes[-1]]``.

    ``layer_norm`` normalises each pre-activation (Dense -> LayerNorm -> activation), which keeps TD
    learning stable as the replay data shifts (Gallici et al. 2024, "Simplifying Deep Temporal
    Difference Learning", Sec. 4)."""

    hidden_sizes: Sequence[int]
    activation: str = "tanh"
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for width in self.hidden_sizes:
            x = _dense(width, np.sqrt(2))(x)
            x = act(nn.LayerNorm()(x) if self.layer_norm else x)
        return x


class MinAtarCNN(nn.Module):
    """``[B, H, W, C] -> [B, H * W * 16]``: one 3x3 stride-1 conv with 16 channels and a ReLU."""

    channels: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.channels, (3, 3), padding="SAME",
                    kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(x)  # [B, H, W, 16]
        return nn.relu(x).reshape(x.shape[0], -1)


class Torso(nn.Module):
    """Observation encoder: CNN for image observations ``[B, H, W, C]``, then the MLP."""

    hidden_sizes: Sequence[int]
    activation: str = "tanh"
    layer_norm: bool = False

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = obs.astype(jnp.float32)
        if x.ndim == 4:
            x = MinAtarCNN()(x)
        elif x.ndim != 2:
            x = x.reshape(x.shape[0], -1)
        return MLP(self.hidden_sizes, self.activation, self.layer_norm)(x)


class Critic(nn.Module):
    """State value ``V(s)``: ``[B, *O] -> [B]``."""

    hidden_sizes: Sequence[int] = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return _dense(1, 1.0)(Torso(self.hidden_sizes, self.activation)(obs))[..., 0]


class DiscreteActor(nn.Module):
    """Categorical policy logits: ``[B, *O] -> [B, A]``."""

    num_actions: int
    hidden_sizes: Sequence[int] = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return _dense(self.num_actions, 0.01)(Torso(self.hidden_sizes, self.activation)(obs))


class GaussianActor(nn.Module):
    """Diagonal Gaussian policy parameters ``(mean [B, A], log_std [B, A])``.

    ``state_dependent_std=False`` (PPO, TRPO) learns one ``log_std`` per action dimension, initialised
    to ``log_std_init``; ``True`` (SAC) predicts it with a second head, squashed into
    ``[log_std_min, log_std_max]`` with a tanh (as in Haarnoja et al.'s reference code).
    """

    action_dim: int
    hidden_sizes: Sequence[int] = (64, 64)
    activation: str = "tanh"
    state_dependent_std: bool = False
    log_std_init: float = 0.0
    log_std_min: float = -5.0
    log_std_max: float = 2.0

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = Torso(self.hidden_sizes, self.activation)(obs)
        mean = _dense(self.action_dim, 0.01)(h)
        if self.state_dependent_std:
            raw = jnp.tanh(_dense(self.action_dim, 0.01)(h))
            log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (raw + 1.0)
        else:
            param = self.param("log_std", nn.initializers.constant(self.log_std_init), (self.action_dim,))
            log_std = jnp.broadcast_to(param, mean.shape)
        return mean, log_std


class DeterministicActor(nn.Module):
    """Deterministic policy ``mu(s) = tanh(.)`` in ``[-1, 1]``: ``[B, *O] -> [B, A]`` (DDPG, TD3)."""

    action_dim: int
    hidden_sizes: Sequence[int] = (256, 256)
    activation: str = "relu"

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return jnp.tanh(_dense(self.action_dim, 0.01)(Torso(self.hidden_sizes, self.activation)(obs)))


class QNetwork(nn.Module):
    """Action values for discrete actions: ``[B, *O] -> [B, A]`` (DQN)."""

    num_actions: int
    hidden_sizes: Sequence[int] = (120, 84)
    activation: str = "relu"
    layer_norm: bool = False

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return _dense(self.num_actions, 1.0)(Torso(self.hidden_sizes, self.activation, self.layer_norm)(obs))


class _QHead(nn.Module):
    hidden_sizes: Sequence[int]
    activation: str

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs.reshape(obs.shape[0], -1).astype(jnp.float32), action], axis=-1)
        return _dense(1, 1.0)(MLP(self.hidden_sizes, self.activation)(x))[..., 0]


class ContinuousQ(nn.Module):
    """``K`` independent critics ``Q_i(s, a)``: ``([B, *O], [B, A]) -> [K, B]`` (DDPG K=1, TD3/SAC K=2)."""

    num_critics: int = 2
    hidden_sizes: Sequence[int] = (256, 256)
    activation: str = "relu"

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        ensemble = nn.vmap(_QHead, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=self.num_critics)
        return ensemble(self.hidden_sizes, self.activation)(obs, action)


def polyak_update(online, target, tau: float | jax.Array):
    """Target-network update ``theta' <- tau theta + (1 - tau) theta'`` (Lillicrap et al. 2016); ``tau=1`` copies."""
    return jax.tree.map(lambda o, t: tau * o + (1.0 - tau) * t, online, target)
