"""Shared building blocks of the models: dtypes, RMSNorm, rotary and sinusoidal positions, feed-forwards.

* :class:`RMSNorm`: ``y = x / sqrt(mean(x^2) + eps) * scale`` (Zhang & Sennrich 2019), computed in fp32.
* :func:`apply_rope`: rotary position embedding (Su et al. 2021, RoFormer, eq. 34) in the
  rotate-half layout: channel ``i < D/2`` is paired with channel ``i + D/2``.
* :func:`sinusoidal_positions`: the fixed encodings of "Attention Is All You Need" (Vaswani et al. 2017, §3.5).
* :class:`FeedForward`: SwiGLU ``W_down (silu(x W_gate) * x W_up)`` (Shazeer 2020), or the GELU / ReLU
  MLP (ReLU: the original Transformer's ``max(0, x W_1 + b_1) W_2 + b_2``, Vaswani et al. 2017 eq. 2).
* :func:`positions_from_segments` / :func:`segment_starts`: what packed rows of documents need
  (``segment_starts`` is ``jaxlab.kernels.scan.segment_starts``, True at t = 0, the one convention of the
  models and the recurrent kernels).

Logical axis names (MaxText's scheme, read by ``flax.linen.logical_axis_rules``): parameters are created
through ``nn.with_logical_partitioning`` and activations pass ``nn.with_logical_constraint``, both no-ops
until a mesh and rules are active. The feed-forward is Megatron's pair (Shoeybi et al. 2019, §3): gate/up
are column-parallel ``("embed", "mlp")``, down is row-parallel ``("mlp", "embed")``, so with ``mlp`` on a
model axis the hidden ``[B, L, mlp]`` stays sharded and the block needs one all-reduce after ``down``.

Everything here is shape-polymorphic in the leading axes; the axis vocabulary is B batch, L length,
H heads, D head dim.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax.ad_checkpoint import checkpoint_name

from jaxlab.kernels.scan import segment_starts

__all__ = [
    "DTYPES",
    "FeedForward",
    "Projection",
    "RMSNorm",
    "apply_rope",
    "default_positions",
    "embed_init",
    "positions_from_segments",
    "resolve_dtype",
    "rope_angles",
    "segment_starts",
    "sinusoidal_positions",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FFN_KINDS = ("swiglu", "gelu", "relu")

embed_init = nn.initializers.normal(stddev=0.02)


def resolve_dtype(name: str, field: str = "dtype"):
    """``"bfloat16"`` -> ``jnp.bfloat16``; a ValueError naming ``field`` for unknown names."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r} must be one of {tuple(DTYPES)}")
    return DTYPES[name]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last axis, statistics in fp32, output in ``dtype``.

    ``axis_name`` is the logical name of the normalised axis given to ``scale`` (``"embed"`` for the
    residual stream, ``"head_dim"`` for QK-norm); None leaves the parameter unannotated (replicated).
    """

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.ones
        if self.axis_name is not None:
            init = nn.with_logical_partitioning(init, (self.axis_name,))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


# ---- positions ------------------------------------------------------------------------------------
def default_positions(batch: int, length: int, segment_ids=None):
    """Token positions [B, L]: ``0..L-1`` per row, restarting at every segment when ids are given."""
    if segment_ids is not None:
        return positions_from_segments(segment_ids)
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def positions_from_segments(segment_ids):
    """Position of every token inside its segment, [B, L] int32 (0 at each segment start)."""
    B, L = segment_ids.shape
    t = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    start = jax.lax.cummax(jnp.where(segment_starts(segment_ids), t, 0), axis=1)  # [B, L]
    return t - start


def rope_angles(positions, head_dim: int, base: float = 10000.0):
    """Rotation angles ``theta_{p, i} = p * base^(-2i / D)``: [B, L, D/2] fp32 for positions [B, L]."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {head_dim=}")
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [D/2]
    return positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]


def apply_rope(x, positions, base: float = 10000.0):
    """Rotate channel pairs ``(x_i, x_{i+D/2})`` of x [B, L, H, D] by ``theta_{p, i}`` (fp32 math)."""
    D = x.shape[-1]
    angles = rope_angles(positions, D, base)[:, :, None, :]  # [B, L, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, L, H, D/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def sinusoidal_positions(positions, d_model: int, max_timescale: float = 10000.0):
    """Vaswani et al. (2017) §3.5: ``PE[p, 2i] = sin(p / 10000^(2i/d))``, ``PE[p, 2i+1] = cos(...)``.

    positions: int [..., L]; returns fp32 [..., L, d_model].
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal positions need an even {d_model=}")
    inv = jnp.exp(-math.log(max_timescale) * jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    angles = positions.astype(jnp.float32)[..., None] * inv  # [..., L, d/2]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], d_model)


# ---- projections ----------------------------------------------------------------------------------
class Projection(nn.Module):
    """``y = x · kernel (+ bias)`` contracting the last ``contract`` axes of x into ``features``, with the
    kernel's logical axis names: ``[..., *in] -> [..., *features]``, kernel ``in + features``.

    ``flax.linen.DenseGeneral`` with names that fit the kernel's real shape (the attention projections:
    query ``("embed", "heads", "head_dim")``, output ``("heads", "head_dim", "embed")``); the kernel is drawn
    from ``kernel_init`` on its flattened ``[prod(in), prod(features)]`` shape, as DenseGeneral does.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    contract: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        n_in, n_out = self.contract, len(self.features)
        if len(self.kernel_axes) != n_in + n_out:
            raise ValueError(f"kernel_axes={self.kernel_axes} must name {n_in} input and {n_out} output axes")
        in_shape = x.shape[x.ndim - n_in:]

        def init(key, shape, dtype):
            flat = (math.prod(in_shape), math.prod(self.features))
            return jnp.reshape(self.kernel_init(key, flat, dtype), shape)

        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                            in_shape + tuple(self.features), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   self.kernel_axes[n_in:]),
                              tuple(self.features), self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))  # [..., *features]
        return y if bias is None else y + bias


# ---- feed-forward ---------------------------------------------------------------------------------
class FeedForward(nn.Module):
    """Position-wise feed-forward: ``"swiglu"`` (gate, up, down), ``"gelu"`` or ``"relu"`` (up, down).

    x [..., d_model] -> [..., d_model]; the hidden activation is tagged ``"ffn_hidden"`` for remat.
    Parameters: gate/up kernels ``("embed", "mlp")`` (column-parallel), down ``("mlp", "embed")``
    (row-parallel); a hidden ``[B, L, d_ff]`` is constrained to ``("batch", "length", "mlp")``.
    """

    d_ff: int
    kind: str = "swiglu"
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        if self.kind not in FFN_KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {FFN_KINDS}")

        def dense(n, name, axes):  # axes: logical names of the kernel (in, out)
            return nn.Dense(n, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
                            name=name)

        column = ("embed", "mlp")
        if self.kind == "swiglu":
            h = nn.silu(dense(self.d_ff, "gate", column)(x)) * dense(self.d_ff, "up", column)(x)  # [..., d_ff]
        elif self.kind == "gelu":
            h = nn.gelu(dense(self.d_ff, "up", column)(x), approximate=False)
        else:
            h = nn.relu(dense(self.d_ff, "up", column)(x))
        if h.ndim == 3:
            h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))  # [B, L, d_ff]
        h = checkpoint_name(h, "ffn_hidden")
        return dense(x.shape[-1], "down", ("mlp", "embed"))(h)
