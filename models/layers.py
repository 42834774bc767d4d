"""Shared building blocks of the models: dtypes, RMSNorm, rotary and sinusoidal positions, feed-forwards.

* :class:`RMSNorm`: ``y = x / sqrt(mean(x^2) + eps) * scale`` (Zhang & Sennrich 2019), computed in fp32;
  :class:`LayerNorm`: ``y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias`` (Ba et al. 2016; GPT-2's norm).
* :func:`apply_rope`: rotary position embedding (Su et al. 2021, RoFormer, eq. 34) in the
  rotate-half layout: channel ``i < D/2`` is paired with channel ``i + D/2`` (the layout of Hugging Face's
  Llama-family checkpoints, so their query/key weights load without a permutation); :class:`RopeScaling` is
  Llama 3.1's frequency-dependent rescaling of the rotation frequencies for long contexts.
* :func:`sinusoidal_positions`: the fixed encodings of "Attention Is All You Need" (Vaswani et al. 2017, §3.5).
* :class:`FeedForward`: SwiGLU ``W_down (silu(x W_gate) * x W_up)`` (Shazeer 2020), or the GELU (exact erf,
  or GPT-2's tanh approximation, Hendrycks & Gimpel 2016 §2) / ReLU MLP (ReLU: the original Transformer's
  ``max(0, x W_1 + b_1) W_2 + b_2``, Vaswani et al. 2017 eq. 2).
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

import dataclasses
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
    "LayerNorm",
    "NORMS",
    "Projection",
    "RMSNorm",
    "ResolvedDtypes",
    "RopeScaling",
    "apply_rope",
    "contract_last",
    "default_positions",
    "embed_init",
    "make_norm",
    "positions_from_segments",
    "resolve_dtype",
    "rope_angles",
    "segment_starts",
    "sinusoidal_positions",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FFN_KINDS = ("swiglu", "gelu", "gelu_tanh", "relu")
NORMS = ("rms", "layer")

embed_init = nn.initializers.normal(stddev=0.02)


def resolve_dtype(name: str, field: str = "dtype"):
    """``"bfloat16"`` -> ``jnp.bfloat16``; a ValueError naming ``field`` for unknown names."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r} must be one of {tuple(DTYPES)}")
    return DTYPES[name]


class ResolvedDtypes:
    """The jnp dtypes of a model config's string fields ``dtype`` and ``param_dtype`` (a base of the frozen
    config dataclasses)."""

    @property
    def compute_dtype(self):
        """``dtype`` resolved: the jnp dtype activations and matmuls run in."""
        return resolve_dtype(self.dtype)

    @property
    def storage_dtype(self):
        """``param_dtype`` resolved: the jnp dtype the parameters are stored in."""
        return resolve_dtype(self.param_dtype, "param_dtype")


def _named(init, axis_name: str | None):
    """``init`` with the logical name ``axis_name`` on its one axis (a norm's scale or bias); None: unannotated."""
    return init if axis_name is None else nn.with_logical_partitioning(init, (axis_name,))


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
        scale = self.param("scale", _named(nn.initializers.ones, self.axis_name), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """Layer norm over the last axis with a scale and a bias (Ba et al. 2016), statistics in fp32, output in
    ``dtype``: ``(x - mean) / sqrt(var + eps) * scale + bias``. ``axis_name`` as in :class:`RMSNorm`."""

    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", _named(nn.initializers.ones, self.axis_name), (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", _named(nn.initializers.zeros_init(), self.axis_name), (x.shape[-1],),
                          self.param_dtype)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def make_norm(kind: str, eps: float, dtype, param_dtype, axis_name: str | None = None, **kwargs) -> nn.Module:
    """``kind`` "rms" (:class:`RMSNorm`) or "layer" (:class:`LayerNorm`); ``kwargs`` go to the constructor."""
    if kind not in NORMS:
        raise ValueError(f"norm={kind!r} must be one of {NORMS}")
    cls = RMSNorm if kind == "rms" else LayerNorm
    return cls(eps, dtype, param_dtype, axis_name, **kwargs)


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


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's rescaling of the rotary frequencies for long contexts (``apply_scaling`` of Meta's Llama 3.1
    reference code, Hugging Face's ``rope_type: "llama3"``): with wavelength ``lambda_i = 2 pi / f_i`` and ``L0 =
    original_max_position_embeddings``, frequencies with ``lambda_i < L0 / high_freq_factor`` stay,
    those with ``lambda_i > L0 / low_freq_factor`` are divided by ``factor``, and the band between
    interpolates: ``f_i' = (1 - s) f_i / factor + s f_i``, ``s = (L0 / lambda_i - low) / (high - low)``."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "original_max_position_embeddings"):
            if not getattr(self, name) > 0:
                raise ValueError(f"rope_scaling.{name}={getattr(self, name)!r} must be > 0")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"rope_scaling.high_freq_factor={self.high_freq_factor} must be > "
                             f"low_freq_factor={self.low_freq_factor}")

    def __call__(self, inv_freq):
        """The rescaled frequencies of ``inv_freq`` [D/2] (fp32)."""
        L0 = float(self.original_max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq  # [D/2]
        scaled = jnp.where(wavelen > L0 / self.low_freq_factor, inv_freq / self.factor, inv_freq)
        smooth = (L0 / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= L0 / self.high_freq_factor) & (wavelen <= L0 / self.low_freq_factor)
        return jnp.where(medium, smoothed, scaled)


def rope_angles(positions, head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None):
    """Rotation angles ``theta_{p, i} = p * base^(-2i / D)`` (frequencies rescaled by ``scaling`` when given):
    [B, L, D/2] fp32 for positions [B, L]."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {head_dim=}")
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [D/2]
    if scaling is not None:
        inv_freq = scaling(inv_freq)
    return positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]


def apply_rope(x, positions, base: float = 10000.0, scaling: RopeScaling | None = None):
    """Rotate channel pairs ``(x_i, x_{i+D/2})`` of x [B, L, H, D] by ``theta_{p, i}`` (fp32 math)."""
    D = x.shape[-1]
    angles = rope_angles(positions, D, base, scaling)[:, :, None, :]  # [B, L, 1, D/2]
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
        y = contract_last(x, kernel, n_in)  # [..., *features]
        return y if bias is None else y + bias


def contract_last(x, kernel, n: int = 1):
    """``x [..., *in] · kernel [*in, *out] -> [..., *out]``, contracting the last ``n`` axes of x with the first
    ``n`` of the kernel.

    Without a mesh the leading axes are folded into one row axis first (``[rows, *in]``): XLA:CPU runs that
    GEMM and its two backward GEMMs without the transposes it inserts for a ``[B, L, d]`` operand (the
    LM's training step at ``jaxlab train lm``'s default size: 0.88x the time). Under a mesh (``jax.set_mesh``)
    the axes stay apart, so their shardings (batch over ``data``, length over ``seq``) carry through.
    """
    lead = x.shape[:x.ndim - n]
    if len(lead) > 1 and jax.sharding.get_abstract_mesh().empty:
        y = jax.lax.dot_general(x.reshape(-1, *x.shape[x.ndim - n:]), kernel,
                                ((tuple(range(1, n + 1)), tuple(range(n))), ((), ())))  # [rows, *out]
        return y.reshape(*lead, *y.shape[1:])
    return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))


# ---- feed-forward ---------------------------------------------------------------------------------
class FeedForward(nn.Module):
    """Position-wise feed-forward: ``"swiglu"`` (gate, up, down), ``"gelu"`` (exact), ``"gelu_tanh"`` (the
    tanh approximation, GPT-2's "gelu_new") or ``"relu"`` (up, down).

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

        def dense(n, name, axes):  # axes: logical names of the kernel (in, out); parameters as nn.Dense's
            return Projection((n,), axes, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=self.kernel_init, name=name)

        column = ("embed", "mlp")
        if self.kind == "swiglu":
            h = nn.silu(dense(self.d_ff, "gate", column)(x)) * dense(self.d_ff, "up", column)(x)  # [..., d_ff]
        elif self.kind in ("gelu", "gelu_tanh"):
            h = nn.gelu(dense(self.d_ff, "up", column)(x), approximate=self.kind == "gelu_tanh")
        else:
            h = nn.relu(dense(self.d_ff, "up", column)(x))
        if h.ndim == 3:
            h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))  # [B, L, d_ff]
        h = checkpoint_name(h, "ffn_hidden")
        return dense(x.shape[-1], "down", ("mlp", "embed"))(h)
