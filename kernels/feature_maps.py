"""Feature maps phi for linear attention: softmax(q . k) is replaced by phi(q) . phi(k).

* ``elu_plus_one``: phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, "Transformers are RNNs", eq. 7).
* ``relu_features``: phi(x) = relu(x), or Performer's random ReLU features relu(W x) / sqrt(m).
* ``favor_features``: Performer's FAVOR+ positive orthogonal random features (Choromanski et al. 2021,
  "Rethinking Attention with Performers", Lemma 1 and Section 2.4): with x' = x / D^{1/4} and rows w_r of W,

      phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),   E[phi(q) . phi(k)] = exp(q . k / sqrt(D)),

  an unbiased, strictly positive estimate of the softmax kernel whose variance falls as 1/m. The rows of W
  are drawn in orthogonal blocks (``orthogonal_gaussian``), which lowers the variance further, and are
  redrawn during training (``favor_projection`` with ``redraw_every``).

All maps act on the last axis: x [..., D] -> phi [..., m] (m = D for the deterministic maps).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["elu_plus_one", "favor_features", "favor_projection", "orthogonal_gaussian", "relu_features"]


def elu_plus_one(x: jax.Array) -> jax.Array:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020, eq. 7)."""
    return jax.nn.elu(x) + 1.0


def relu_features(x: jax.Array, projection: jax.Array | None = None) -> jax.Array:
    """phi(x) = relu(x); with a projection W [m, D], Performer's generalised kernel relu(x W^T) / sqrt(m)."""
    if projection is None:
        return jax.nn.relu(x)
    _check_projection(x, projection)
    return jax.nn.relu(x @ projection.T) / math.sqrt(projection.shape[0])


def orthogonal_gaussian(key: jax.Array, num_features: int, dim: int) -> jax.Array:
    """W [num_features, dim]: blocks of ``dim`` mutually orthogonal rows, each with a chi(dim)-distributed norm.

    Every row is marginally N(0, I_dim), as the unbiased estimator needs, while rows in a block are exactly
    orthogonal (Performer's "ORF" with the Gaussian-norm scaling).
    """
    if num_features < 1 or dim < 1:
        raise ValueError(f"{num_features=} and {dim=} must be positive")
    num_blocks = -(-num_features // dim)
    block_key, norm_key = jax.random.split(key)
    gaussian = jax.random.normal(block_key, (num_blocks, dim, dim))
    q, _ = jnp.linalg.qr(gaussian)  # [blocks, D, D], orthonormal columns
    directions = jnp.swapaxes(q, -1, -2).reshape(num_blocks * dim, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim)), axis=-1)
    return directions * norms[:, None]


def favor_projection(key: jax.Array, num_features: int, dim: int, *, step=None, redraw_every: int | None = None):
    """The FAVOR+ projection in use at training ``step``: redrawn every ``redraw_every`` steps.

    The draw for a step is a pure function of (key, step // redraw_every), so every replica and every restart
    sees the same features. Without ``step``/``redraw_every`` the projection is drawn once from ``key``.
    """
    if (step is None) != (redraw_every is None):
        raise ValueError(f"give both step and redraw_every or neither, got {step=} and {redraw_every=}")
    if redraw_every is not None:
        if redraw_every < 1:
            raise ValueError(f"{redraw_every=} must be >= 1")
        key = jax.random.fold_in(key, step // redraw_every)
    return orthogonal_gaussian(key, num_features, dim)


def _check_projection(x, projection):
    if projection.ndim != 2 or projection.shape[1] != x.shape[-1]:
        raise ValueError(f"projection.shape={projection.shape} must be [m, D] with D = x.shape[-1] = {x.shape[-1]}")


def favor_features(x: jax.Array, projection: jax.Array, *, is_query: bool, causal: bool = False) -> jax.Array:
    """FAVOR+ positive random features of queries or keys x [B, L, H, D] -> [B, L, H, m].

    phi(x) = exp(W x' - |x'|^2 / 2 - c) / sqrt(m) with x' = x / D^{1/4}. The stabiliser c (held constant under
    differentiation) keeps exp in range and must cancel in normalised attention:

    * queries: the row maximum, one constant per query, which cancels exactly under any mask;
    * keys, ``causal=False``: Performer's choice, one constant per (batch, head) over all positions;
    * keys, ``causal=True``: c = 0. A key's features then depend on that key alone (a shared maximum would
      let later keys rescale earlier ones: a causality leak, and decoding would disagree with the full
      forward). The exponent stays far from fp32 overflow (88) unless |w . x'| is, i.e. key norms ~10x
      beyond D^{1/4} sqrt(D) / |w|. (A data-independent bound such as c = max_r |w_r|^2 / 2 is safe from
      overflow but shrinks all features by ~exp(-D/2), below the normaliser's eps.)
    """
    _check_projection(x, projection)
    if x.ndim != 4:
        raise ValueError(f"x must be [B, L, H, D], got shape {x.shape}")
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32)) * x.shape[-1] ** -0.25
    logits = jnp.einsum("blhd,md->blhm", x, projection.astype(x.dtype))  # [B, L, H, m]
    logits = logits - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    if is_query or not causal:
        axes = (-1,) if is_query else (1, -1)
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=axes, keepdims=True))
    return jnp.exp(logits) / math.sqrt(projection.shape[0])
