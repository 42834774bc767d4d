"""Mixture-of-experts feed-forward: fine-grained routed experts plus shared experts, dropless.

DeepSeek-MoE (Dai et al. 2024) / Moonlight style: ``E`` small SwiGLU experts of hidden size ``f``,
each token routed to ``k`` of them, plus ``S`` shared experts every token passes through::

    y_t = sum_{s<S} FFN_s(x_t) + sum_{e in TopK(g_t)} w_{t,e} FFN_e(x_t)

Gates: ``"softmax"`` (``g = softmax(x W_r)``, Switch/GShard; top-k weights renormalised to sum 1
when ``normalize_gates``) or ``"sigmoid"`` (``g = sigmoid(x W_r)``, DeepSeek-V3; top-k weights
always renormalised). Auxiliary losses, returned in ``aux``:

* load balancing (Fedus et al. 2021, Switch eq. 4, top-k form): ``E * sum_e f_e P_e`` with ``f_e``
  the fraction of the ``T k`` assignments going to expert e and ``P_e`` the mean (normalised)
  router probability of e; it equals 1 whenever the router is uniform.
* router z-loss (Zoph et al. 2022, ST-MoE eq. 5): ``mean_t logsumexp(x_t W_r)^2``.

Dispatch is dropless (no capacity factor, no token is ever dropped): the ``T k`` assignments are
sorted by expert so every expert's tokens are contiguous, and the experts run as grouped matmuls,
``jax.lax.ragged_dot`` (MegaBlocks, Gale et al. 2022). :func:`moe_dense_reference` runs every expert
on every token and masks, the reference the grouped path is tested against.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlab.models.layers import FeedForward

__all__ = ["GATES", "MoE", "load_balance_loss", "moe_dense_reference", "moe_ragged", "route", "router_z_loss"]

GATES = ("softmax", "sigmoid")
DISPATCH = ("ragged", "dense")


def route(logits, experts_per_token: int, gate: str = "softmax", normalize_gates: bool = True):
    """Top-k routing of router logits [T, E], ``k = experts_per_token``.

    Returns:
      weights [T, k] fp32 combine weights, experts [T, k] int32 chosen experts, probs [T, E]
      the per-token routing distribution used by the balancing loss (rows sum to 1).
    """
    if gate not in GATES:
        raise ValueError(f"gate={gate!r} must be one of {GATES}")
    logits = logits.astype(jnp.float32)
    if gate == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)  # [T, E]
        weights, experts = jax.lax.top_k(probs, experts_per_token)  # [T, k]
        if normalize_gates:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    else:
        scores = jax.nn.sigmoid(logits)
        weights, experts = jax.lax.top_k(scores, experts_per_token)
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def expert_load(experts, num_experts: int):
    """Fraction of the T*k assignments received by each expert, [E] (sums to 1)."""
    counts = jnp.bincount(experts.reshape(-1), length=num_experts)
    return counts.astype(jnp.float32) / experts.size


def load_balance_loss(probs, experts, num_experts: int):
    """``E * sum_e f_e P_e`` (Switch Transformer eq. 4 for top-k); 1 for a uniform router."""
    f = jax.lax.stop_gradient(expert_load(experts, num_experts))  # [E]
    P = jnp.mean(probs, axis=0)  # [E]
    return num_experts * jnp.sum(f * P)


def router_z_loss(logits):
    """ST-MoE z-loss ``mean_t logsumexp(logits_t)^2``: keeps router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def _swiglu_experts(h_gate, h_up):
    return checkpoint_name(jax.nn.silu(h_gate) * h_up, "ffn_hidden")


def moe_dense_reference(x, weights, experts, w_gate, w_up, w_down):
    """Every expert on every token, combined with the routing weights (fp32; the reference).

    x [T, d]; weights, experts [T, k]; w_gate, w_up [E, d, f]; w_down [E, f, d] -> [T, d].
    """
    E = w_gate.shape[0]
    x, w_gate, w_up, w_down = (a.astype(jnp.float32) for a in (x, w_gate, w_up, w_down))
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x, w_gate)) * jnp.einsum("td,edf->tef", x, w_up)  # [T, E, f]
    y = jnp.einsum("tef,efd->ted", h, w_down)  # [T, E, d]
    combine = jnp.sum(weights[..., None] * jax.nn.one_hot(experts, E), axis=1)  # [T, E]
    return jnp.einsum("te,ted->td", combine, y)


def moe_ragged(x, weights, experts, w_gate, w_up, w_down):
    """Dropless dispatch: sort the T*k assignments by expert, grouped matmuls, scatter-add back.

    Same arguments and result as :func:`moe_dense_reference`; matmuls take x's dtype and
    accumulate in fp32. Work is O(T k d f) instead of the reference's O(T E d f).
    """
    T, k = experts.shape
    E = w_gate.shape[0]
    flat = experts.reshape(-1)  # [T*k], assignment a belongs to token a // k
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    token = order // k  # [T*k]
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E]
    xs = jnp.take(x, token, axis=0)  # [T*k, d], sorted by expert
    mm = lambda a, w: jax.lax.ragged_dot(a, w.astype(a.dtype), group_sizes,  # noqa: E731
                                         preferred_element_type=jnp.float32)
    h = _swiglu_experts(mm(xs, w_gate), mm(xs, w_up)).astype(x.dtype)  # [T*k, f]
    ys = mm(h, w_down)  # [T*k, d] fp32
    w_sorted = jnp.take(weights.reshape(-1), order)  # [T*k]
    return jnp.zeros((T, x.shape[-1]), jnp.float32).at[token].add(ys * w_sorted[:, None])


class MoE(nn.Module):
    """Routed + shared SwiGLU experts; x [B, L, d] -> (y [B, L, d], aux).

    ``aux``: ``load_balance_loss`` and ``router_z_loss`` (scalars), ``expert_load`` [E] (fraction
    of assignments per expert: the utilisation; uniform is 1/E).
    """

    num_experts: int
    experts_per_token: int
    """Routed experts per token, the k of top-k routing."""
    d_expert: int
    num_shared_experts: int = 0
    gate: str = "softmax"
    normalize_gates: bool = True
    dispatch: str = "ragged"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be in "
                             f"[1, num_experts={self.num_experts}]")
        if self.dispatch not in DISPATCH:
            raise ValueError(f"dispatch={self.dispatch!r} must be one of {DISPATCH}")
        B, L, d = x.shape
        E, f = self.num_experts, self.d_expert
        tokens = x.reshape(B * L, d)  # [T, d]
        router = self.param("router", nn.initializers.normal(0.02), (d, E), jnp.float32)
        logits = tokens.astype(jnp.float32) @ router  # [T, E]
        weights, experts, probs = route(logits, self.experts_per_token, self.gate, self.normalize_gates)

        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                                batch_axis=(0,))
        w_gate = self.param("w_gate", init, (E, d, f), self.param_dtype)
        w_up = self.param("w_up", init, (E, d, f), self.param_dtype)
        w_down = self.param("w_down", init, (E, f, d), self.param_dtype)
        dispatch = moe_ragged if self.dispatch == "ragged" else moe_dense_reference
        y = dispatch(tokens.astype(self.dtype), weights, experts, w_gate, w_up, w_down).reshape(B, L, d)
        if self.num_shared_experts:
            y = y + FeedForward(self.num_shared_experts * f, "swiglu", dtype=self.dtype,
                                param_dtype=self.param_dtype, name="shared")(x)
        aux = {
            "load_balance_loss": load_balance_loss(probs, experts, E),
            "router_z_loss": router_z_loss(logits),
            "expert_load": expert_load(experts, E),
        }
        return y.astype(self.dtype), aux
