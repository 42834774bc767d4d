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

Single-device dispatch is dropless (no capacity factor, no token is ever dropped): the ``T k`` assignments are
sorted by expert so every expert's tokens are contiguous, and the experts run as grouped matmuls,
``jax.lax.ragged_dot`` (MegaBlocks, Gale et al. 2022). :func:`moe_dense_reference` runs every expert
on every token and masks, the reference the grouped path is tested against.

Expert parallelism (GShard, Lepikhin et al. 2021; Switch, Fedus et al. 2022; DeepSpeed-MoE, Rajbhandari
et al. 2022): when the ambient mesh (``jax.set_mesh(mesh)``, read at trace time through
``jax.sharding.get_abstract_mesh()``; the deprecated ``with mesh:`` sets no abstract mesh and is not seen)
has an ``expert`` axis of size n > 1, ``dispatch="ragged"`` runs the routed experts under ``jax.shard_map``
(:func:`moe_expert_parallel`): each device holds ``E / n`` experts and its share of the tokens, sorts its
assignments by destination device, sends them with ``all_to_all``, runs its experts as grouped matmuls and
returns the results with the inverse ``all_to_all``. Routing, the auxiliary losses and the shared experts
stay outside, on the partitioner, exactly as on one device (routing stays local to each device's tokens:
top-k is taken as k argmaxes, see :func:`_top_k`). The exchange buffers have a fixed size per
destination: dropless by default (room for every local assignment, the worst case), or
``capacity_factor`` times the balanced share, in which case the overflow is dropped and counted in
``aux["dropped_fraction"]``. The layout that needs no resharding around the exchange is the batch split
over ``data`` and ``expert`` together (GShard/DeepSpeed-MoE: the expert axis is a data axis for every
other layer); with the batch over ``data`` only, the ``expert`` devices hold the same rows, each takes
a slice into the exchange and the partitioner all-gathers the result.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jaxlab.models.layers import FeedForward

__all__ = [
    "DISPATCH",
    "EXPERT_AXIS",
    "GATES",
    "TENSOR_AXIS",
    "MoE",
    "expert_parallel_size",
    "load_balance_loss",
    "moe_dense_reference",
    "moe_expert_parallel",
    "moe_ragged",
    "route",
    "router_z_loss",
    "bias_balance_term",
    "BALANCE",
]

GATES = ("softmax", "sigmoid")
BALANCE = ("aux_loss", "bias")
"""Load balancing: Switch's auxiliary loss, or DeepSeek-V3's auxiliary-loss-free routing bias."""
DISPATCH = ("ragged", "dense")
EXPERT_AXIS = "expert"
"""Mesh axis over which the routed experts are split (expert parallelism)."""
TENSOR_AXIS = "model"
"""Mesh axis left to the partitioner inside the expert-parallel region (it splits weights, not tokens)."""


def route(logits, experts_per_token: int, gate: str = "softmax", normalize_gates: bool = True, bias=None):
    """Top-k routing of router logits [T, E], ``k = experts_per_token``.

    ``bias`` [E] (DeepSeek-V3's auxiliary-loss-free balancing, eqs. 16-18) is added to the scores for the
    choice of the experts only: the combine weights are the unbiased scores of the chosen experts.

    Returns:
      weights [T, k] fp32 combine weights, experts [T, k] int32 chosen experts, probs [T, E]
      the per-token routing distribution used by the balancing loss (rows sum to 1).
    """
    if gate not in GATES:
        raise ValueError(f"gate={gate!r} must be one of {GATES}")
    logits = logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if gate == "softmax" else jax.nn.sigmoid(logits)  # [T, E]
    if bias is None:
        weights, experts = _top_k(scores, experts_per_token)  # [T, k]
    else:
        _, experts = _top_k(scores + jax.lax.stop_gradient(bias).astype(jnp.float32), experts_per_token)
        weights = jnp.take_along_axis(scores, experts, axis=-1)  # [T, k]
    if gate == "softmax":
        probs = scores
        if normalize_gates:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    else:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return weights, experts, probs


def _top_k(scores, k: int):
    """``jax.lax.top_k(scores, k)`` over the last axis (ties to the lower index), as k rounds of argmax.

    The SPMD partitioner keeps an argmax over a token-sharded [T, E] local, whereas it all-gathers the
    operand of XLA's TopK (seen with jax 0.10.2 on CPU): every device would route every token. k is small.
    """
    chosen, masked = [], scores
    for _ in range(k):
        e = jnp.argmax(masked, axis=-1).astype(jnp.int32)  # [T]
        chosen.append(e)
        masked = jnp.where(jax.nn.one_hot(e, scores.shape[-1], dtype=bool), -jnp.inf, masked)
    experts = jnp.stack(chosen, axis=-1)  # [T, k]
    return jnp.take_along_axis(scores, experts, axis=-1), experts


def expert_load(experts, num_experts: int):
    """Fraction of the T*k assignments received by each expert, [E] (sums to 1)."""
    counts = jnp.bincount(experts.reshape(-1), length=num_experts)
    return counts.astype(jnp.float32) / experts.size


def load_balance_loss(probs, experts, num_experts: int):
    """``E * sum_e f_e P_e`` (Switch Transformer eq. 4 for top-k); 1 for a uniform router."""
    f = jax.lax.stop_gradient(expert_load(experts, num_experts))  # [E]
    P = jnp.mean(probs, axis=0)  # [E]
    return num_experts * jnp.sum(f * P)


def bias_balance_term(bias, load):
    """DeepSeek-V3's bias update as a gradient: ``sum_e (b_e - sg(b_e)) * sg(f_e - 1/E)`` is 0 in value
    and has gradient ``f_e - mean(f)`` in ``b``, so sign descent at rate ``gamma`` (the optimizer's
    ``sign_descent`` leaves) is ``b_e <- b_e - gamma * sign(f_e - mean f)``: an overloaded expert's bias
    falls, an underloaded one's rises. ``bias`` [E], ``load`` [E] (fractions, sum 1)."""
    target = jax.lax.stop_gradient(load - jnp.mean(load))
    return jnp.sum((bias - jax.lax.stop_gradient(bias)) * target)


def router_z_loss(logits):
    """ST-MoE z-loss ``mean_t logsumexp(logits_t)^2``: keeps router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def _swiglu_experts(h_gate, h_up):
    return checkpoint_name(jax.nn.silu(h_gate) * h_up, "ffn_hidden")


def _grouped_swiglu(xs, group_sizes, w_gate, w_up, w_down):
    """SwiGLU experts on rows grouped by expert: xs [M, d], group_sizes [E] -> [M, d] fp32.

    Rows past ``sum(group_sizes)`` belong to no expert (padding); their results are unspecified.
    """
    mm = lambda a, w: jax.lax.ragged_dot(a, w.astype(a.dtype), group_sizes,  # noqa: E731
                                         preferred_element_type=jnp.float32)
    h = _swiglu_experts(mm(xs, w_gate), mm(xs, w_up)).astype(xs.dtype)  # [M, f]
    return mm(h, w_down)  # [M, d] fp32


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
    ys = _grouped_swiglu(xs, group_sizes, w_gate, w_up, w_down)  # [T*k, d] fp32
    w_sorted = jnp.take(weights.reshape(-1), order)  # [T*k]
    return jnp.zeros((T, x.shape[-1]), jnp.float32).at[token].add(ys * w_sorted[:, None])


def expert_parallel_size(mesh=None) -> int:
    """Size of the ``expert`` axis of ``mesh`` (default: the ambient mesh of ``jax.set_mesh``), 1 if none."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return int(dict(mesh.shape).get(EXPERT_AXIS, 1)) if mesh.axis_names else 1


def _exchange(v, n: int, capacity: int):
    """all_to_all over ``expert``: v [n*C, ...] holds one block of C rows per device; block j goes to
    device j, and the result's block j came from device j (the inverse of itself)."""
    blocks = v.reshape(n, capacity, *v.shape[1:])  # [n, C, ...]
    return jax.lax.all_to_all(blocks, EXPERT_AXIS, 0, 0).reshape(v.shape)


def _expert_parallel_local(x, weights, experts, w_gate, w_up, w_down, *, n: int, capacity: int):
    """One device of :func:`moe_expert_parallel`: x [t, d] its tokens, weights/experts [t, k] their routes
    (global expert ids), w_gate/w_up [e, d, f] and w_down [e, f, d] its ``e = E / n`` experts (device j
    holds experts ``j e .. (j + 1) e - 1``). Returns (y [t, d] fp32, dropped [1] int32)."""
    t, k = experts.shape
    d = x.shape[-1]
    e = w_gate.shape[0]
    flat = experts.reshape(-1)  # [a = t*k], assignment i belongs to token i // k
    order = jnp.argsort(flat, stable=True)  # by expert, hence by destination device
    expert_sorted = jnp.take(flat, order)  # [a]
    dest = expert_sorted // e  # [a] device holding the expert
    per_dest = jnp.bincount(dest, length=n)  # [n]
    rank = jnp.arange(t * k) - (jnp.cumsum(per_dest) - per_dest)[dest]  # [a] place in its destination's block
    keep = rank < capacity  # always True when dropless
    slot = jnp.where(keep, dest * capacity + rank, n * capacity)  # [a]; n*C (out of range): dropped
    token = order // k  # [a]
    send_x = jnp.zeros((n * capacity, d), x.dtype).at[slot].set(jnp.take(x, token, axis=0), mode="drop")
    # local expert id on the destination; e marks an empty slot (no expert, sorted last there)
    send_e = jnp.full((n * capacity,), e, jnp.int32).at[slot].set(expert_sorted % e, mode="drop")
    recv_x, recv_e = _exchange(send_x, n, capacity), _exchange(send_e, n, capacity)  # [n*C, d], [n*C]
    by_expert = jnp.argsort(recv_e, stable=True)  # [n*C] received rows grouped by local expert
    group_sizes = jnp.bincount(recv_e, length=e).astype(jnp.int32)  # [e], empty slots not counted
    ys = _grouped_swiglu(jnp.take(recv_x, by_expert, axis=0), group_sizes, w_gate, w_up, w_down)  # [n*C, d]
    ys = jnp.zeros_like(ys).at[by_expert].set(ys).astype(x.dtype)  # received order, compute dtype
    back = _exchange(ys, n, capacity)  # [n*C, d]: this device's slots, through their experts
    y_sorted = jnp.take(back, slot, axis=0, mode="fill", fill_value=0)  # [a, d]; dropped -> 0
    w_sorted = jnp.take(weights.reshape(-1), order)  # [a]
    y = jnp.zeros((t, d), jnp.float32).at[token].add(y_sorted.astype(jnp.float32) * w_sorted[:, None])
    return y, jnp.sum(~keep, dtype=jnp.int32)[None]


def moe_expert_parallel(x, weights, experts, w_gate, w_up, w_down, mesh, capacity_factor: float | None = None):
    """Routed experts split over the ``expert`` axis of ``mesh``: all_to_all dispatch and combine.

    Same arguments as :func:`moe_ragged` (x [T, d], weights/experts [T, k], w_gate/w_up [E, d, f],
    w_down [E, f, d]) plus the mesh (a ``Mesh`` or the ``AbstractMesh`` of ``jax.set_mesh``). Returns
    (y [T, d] fp32, dropped: the number of the T*k assignments dropped, an int32 scalar).

    Layout. The body is a ``jax.shard_map`` manual over every mesh axis but ``model`` (and those an
    enclosing ``shard_map`` already made manual, whose tokens are already this device's): the T tokens are
    split over those axes in mesh order, ``t = T / (product of their sizes)`` rows per device (no
    resharding when the batch is split the same way, e.g. over ``("data", "expert")``; with the batch
    over ``data`` only, each group of ``expert`` devices takes disjoint slices of the same rows and the
    partitioner all-gathers the output), and the experts over ``expert`` (``[E / n, d, f]`` per device,
    gathered over ``data`` by the partitioner if a ZeRO strategy split them there). ``model`` stays with
    the partitioner (the experts' ``mlp`` dimension may be split on it). The all_to_all runs within each
    group of n ``expert`` devices.

    Capacity. Each device sends every destination a block of C rows. ``capacity_factor=None`` is
    dropless: ``C = t k``, room for all of a device's assignments going to one
    destination, so the exchange buffers and the grouped matmul hold ``n t k`` rows, n times the
    balanced load. ``capacity_factor=c`` sets ``C = min(t k, ceil(c t k / n))``: a destination's
    assignments past C (in expert, then token order) are dropped: they contribute nothing (the token keeps
    its residual and the shared experts) and are counted in ``dropped``.

    Raises:
      ValueError: E not divisible by the ``expert`` axis size, or T by the product of the token axes'
        sizes, or a non-positive ``capacity_factor``; all at trace time.
    """
    n = expert_parallel_size(mesh)
    T, k = experts.shape
    E = w_gate.shape[0]
    if E % n:
        raise ValueError(f"num_experts={E} is not divisible by the mesh's {EXPERT_AXIS!r} axis size {n}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} must be positive (or None: dropless)")
    if EXPERT_AXIS in mesh.manual_axes:
        raise ValueError(f"the MoE is traced inside a shard_map manual over {EXPERT_AXIS!r} (one manual over "
                         f"every mesh axis?); expert parallelism needs {EXPERT_AXIS!r} left to it: make only "
                         "the data axes manual there")
    shape = dict(mesh.shape)
    token_axes = tuple(a for a in mesh.axis_names if a != TENSOR_AXIS and a not in mesh.manual_axes)
    shards = math.prod(shape[a] for a in token_axes)
    if T % shards:
        raise ValueError(f"the MoE's {T} tokens (batch x length) are not divisible by the {shards} devices of "
                         f"the mesh axes {token_axes} they are split over under expert parallelism")
    t = T // shards
    capacity = t * k if capacity_factor is None else min(t * k, math.ceil(capacity_factor * t * k / n))
    tokens = P(token_axes)
    local = functools.partial(_expert_parallel_local, n=n, capacity=capacity)
    y, dropped = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens) + (P(EXPERT_AXIS),) * 3,
                               out_specs=(tokens, tokens), axis_names=set(token_axes))(
        x, weights, experts, w_gate, w_up, w_down)
    return y, jnp.sum(dropped)


class MoE(nn.Module):
    """Routed + shared SwiGLU experts; x [B, L, d] -> (y [B, L, d], aux).

    ``aux``: ``load_balance_loss`` and ``router_z_loss`` (scalars), ``expert_load`` [E] (fraction
    of assignments per expert: the utilisation; uniform is 1/E), ``dropped_fraction`` (fraction of
    the assignments dropped for capacity: 0 unless expert-parallel with a ``capacity_factor``) and
    ``bias_balance`` (``balance="bias"``: :func:`bias_balance_term`, 0 in value, to add to the loss so
    that the ``router_bias`` parameter gets its balancing gradient; 0 otherwise).

    Parameters carry logical axis names (``nn.with_logical_partitioning``; ``MoE(...).init`` returns
    ``nn.Partitioned`` boxes, ``nn.unbox`` gives the arrays): ``router`` ``("embed", None)`` (replicated
    across experts), ``w_gate``/``w_up`` ``("experts", "embed", "mlp")``, ``w_down``
    ``("experts", "mlp", "embed")``, the shared experts as the dense feed-forward.
    """

    num_experts: int
    experts_per_token: int
    """Routed experts per token, the k of top-k routing."""
    d_expert: int
    num_shared_experts: int = 0
    gate: str = "softmax"
    normalize_gates: bool = True
    dispatch: str = "ragged"
    """``"ragged"``: grouped matmuls, expert-parallel over the ambient mesh's ``expert`` axis when it has
    size > 1 (:func:`moe_expert_parallel`), else on each device; ``"dense"``: every expert on every
    token (the reference; never expert-parallel)."""
    capacity_factor: float | None = None
    """Expert-parallel exchange capacity per destination device, in multiples of the balanced share;
    None is dropless. Single-device dispatch is always dropless."""
    balance: str = "aux_loss"
    """aux_loss | bias: ``bias`` adds a ``router_bias`` [E] (replicated) to the scores that choose the
    experts (not to the gates), trained by sign descent on the load (:func:`bias_balance_term`)."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be in "
                             f"[1, num_experts={self.num_experts}]")
        if self.dispatch not in DISPATCH:
            raise ValueError(f"dispatch={self.dispatch!r} must be one of {DISPATCH}")
        if self.balance not in BALANCE:
            raise ValueError(f"balance={self.balance!r} must be one of {BALANCE}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor!r} must be positive (or None: dropless)")
        B, L, d = x.shape
        E, f = self.num_experts, self.d_expert
        mesh = jax.sharding.get_abstract_mesh()
        parallel = self.dispatch == "ragged" and expert_parallel_size(mesh) > 1
        tokens = x.reshape(B * L, d)  # [T, d]
        router = self.param("router", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
                            (d, E), jnp.float32)
        logits = tokens.astype(jnp.float32) @ router  # [T, E]
        bias = None
        if self.balance == "bias":
            bias = self.param("router_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (E,),
                              jnp.float32)
        weights, experts, probs = route(logits, self.experts_per_token, self.gate, self.normalize_gates, bias)

        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                                batch_axis=(0,))
        expert_param = lambda name, shape, axes: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
        w_gate = expert_param("w_gate", (E, d, f), ("experts", "embed", "mlp"))
        w_up = expert_param("w_up", (E, d, f), ("experts", "embed", "mlp"))
        w_down = expert_param("w_down", (E, f, d), ("experts", "mlp", "embed"))
        routed = (tokens.astype(self.dtype), weights, experts, w_gate, w_up, w_down)
        dropped = jnp.zeros((), jnp.int32)
        if parallel:
            y, dropped = moe_expert_parallel(*routed, mesh, self.capacity_factor)
        elif self.dispatch == "ragged":
            y = moe_ragged(*routed)
        else:
            y = moe_dense_reference(*routed)
        y = y.reshape(B, L, d)
        if self.num_shared_experts:
            y = y + FeedForward(self.num_shared_experts * f, "swiglu", dtype=self.dtype,
                                param_dtype=self.param_dtype, name="shared")(x)
        load = expert_load(experts, E)
        aux = {
            "load_balance_loss": load_balance_loss(probs, experts, E),
            "router_z_loss": router_z_loss(logits),
            "expert_load": load,
            "bias_balance": jnp.zeros((), jnp.float32) if bias is None else bias_balance_term(bias, load),
            "dropped_fraction": dropped.astype(jnp.float32) / experts.size,
        }
        return y.astype(self.dtype), aux
