"""The data-parallel strategies as explicit per-device programs (``jax.shard_map``).

Inside ``shard_map`` every array is the local block of one device and every byte that crosses
devices is a collective written below. With ``N = |data|`` and ``g_i`` the gradient of device
i's batch shard (the loss is a mean, so the global gradient is ``sum_i g_i / N``):

    ddp    g = psum(g_i) / N                     (or ring_allreduce: 2(N-1) ppermute steps)
           optimizer update on whole tensors, replicated on every device
    zero1  g = psum(g_i) / N; each device slices its 1/N of g and of the params, updates that
           slice with its optimizer-state shard, then all_gather reassembles the params
    zero2  g_shard = psum_scatter(g_i) / N (reduce-scatter: each device receives only its
           1/N), update the slice, all_gather the params
    zero3  params live as 1/N shards; ``gather_param`` all-gathers each one where the loss uses
           it and, as its custom VJP, reduce-scatters the cotangent, so the gradient arrives
           already sharded; the update never leaves the shard

The gradient of a parameter replicated over ``data`` would come back from ``jax.grad``
already summed over devices (shard_map's typing inserts the ``psum`` when a replicated value
meets per-device data), so parameters are first cast to per-device values with
``lax.pcast(..., to="varying")`` and the reduction is written out. Leaves that ZeRO does not
split (no dimension divisible by N) are treated as under DDP.

The optimizer runs on shards, so under ZeRO it must act elementwise (SGD, Adam, AdamW, ...);
transforms that reduce over a tensor (``clip_by_global_norm``, Adafactor) would see only a
shard and are rejected here; the ``impl="jit"`` path handles them.

With a ``model`` mesh axis only ``data`` is manual (``shard_map(axis_names={"data"})``); the
model-axis sharding inside the loss stays with the XLA partitioner.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxlab.parallel.collectives import ring_allreduce
from jaxlab.parallel.mesh import DATA, MODEL, data_size
from jaxlab.parallel.strategies import ShardedTrainState, Strategy, state_specs, zero_dim
from jaxlab.parallel.train_step import GATHERED, regather_policy, scalar_loss

__all__ = ["check_elementwise", "gather_param", "shard_map_step"]

_REDUCING_PRIMITIVES = {
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "argmax", "argmin", "dot_general", "cumsum", "cumprod", "cummax", "cummin", "sort",
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gather_param(shard: jax.Array, dim: int | None) -> jax.Array:
    """ZeRO-3: the whole parameter from this device's shard (``all_gather`` over ``data``).

    Backward: the cotangents of all devices are summed and each keeps its own slice
    (``psum_scatter``). ``dim=None`` marks a replicated leaf: forward is a cast to a per-device
    value, backward a ``psum``.
    """
    return _gather_fwd(shard, dim)[0]


def _gather_fwd(shard, dim):
    if dim is None:
        return lax.pcast(shard, DATA, to="varying"), None
    return lax.all_gather(shard, DATA, axis=dim, tiled=True), None


def _gather_bwd(dim, _, cotangent):
    if dim is None:
        return (lax.psum(cotangent, DATA),)
    return (lax.psum_scatter(cotangent, DATA, scatter_dimension=dim, tiled=True),)


gather_param.defvjp(_gather_fwd, _gather_bwd)


def _local_slice(x: jax.Array, dim: int | None) -> jax.Array:
    """This device's 1/N block of a replicated ``x`` along ``dim`` (no communication)."""
    if dim is None:
        return x
    size = x.shape[dim] // lax.axis_size(DATA)
    return lax.dynamic_slice_in_dim(x, lax.axis_index(DATA) * size, size, axis=dim)


def _walk(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _walk(inner)
    return names


def check_elementwise(tx: optax.GradientTransformation, params: Any, opt_state: Any) -> None:
    """Raise ``ValueError`` if ``tx.update`` reduces over tensor elements (so it cannot run on shards)."""
    jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(params, opt_state, params)
    found = sorted(_walk(jaxpr.jaxpr) & _REDUCING_PRIMITIVES)
    if found:
        raise ValueError(f"the optimizer's update uses {found}, which on a ZeRO shard would see "
                         "only 1/N of each tensor; use make_train_step(..., impl='jit') for it")


def _manual(spec: P) -> P:
    """Keep only the ``data`` entries of a spec (the manual axis of the shard_map)."""
    return P(*(DATA if a == DATA else None for a in spec))


def shard_map_step(loss_fn: Callable, mesh: Mesh, strategy: Strategy, state: ShardedTrainState,
                   *, regather: bool = True, allreduce: str = "psum") -> Callable:
    """``step(state, batch) -> (state, metrics)`` as one ``jax.shard_map`` over ``data``.

    Built for ``state``'s structure; wrap in ``jax.jit`` with the strategy's shardings
    (``TrainStep`` does).
    """
    n = data_size(mesh)
    leaves, treedef = jax.tree.flatten(state.params)
    dims = [zero_dim(x.shape, mesh) for x in leaves]
    if strategy.shard_optimizer:
        check_elementwise(state.tx, state.params, state.opt_state)
    specs = jax.tree.map(_manual, state_specs(state, mesh, strategy),
                         is_leaf=lambda x: isinstance(x, P))
    reduce = functools.partial(ring_allreduce, axis_name=DATA) if allreduce == "ring" else \
        functools.partial(lax.psum, axis_name=DATA)

    def local_loss(param_leaves, batch):
        return scalar_loss(loss_fn(jax.tree.unflatten(treedef, param_leaves), batch))

    def zero3_grads(param_leaves, batch):
        def loss_of(shards):
            whole = [checkpoint_name(gather_param(p, d), GATHERED) for p, d in zip(shards, dims)]
            return local_loss(whole, batch)

        if regather:
            loss_of = jax.checkpoint(loss_of, policy=regather_policy())
        loss, grads = jax.value_and_grad(loss_of)(param_leaves)  # reduce-scattered sums
        return loss, [g / n for g in grads]

    def data_parallel_grads(param_leaves, batch):
        per_device = [lax.pcast(p, DATA, to="varying") for p in param_leaves]
        loss, local = jax.value_and_grad(local_loss)(per_device, batch)  # g_i
        if strategy.shard_gradients:  # ZeRO-2: reduce-scatter
            grads = [lax.psum(g, DATA) if d is None else
                     lax.psum_scatter(g, DATA, scatter_dimension=d, tiled=True)
                     for g, d in zip(local, dims)]
        else:  # DDP / ZeRO-1: all-reduce, then ZeRO-1 keeps its slice
            grads = [_local_slice(g, d) if strategy.shard_optimizer else g
                     for g, d in zip(reduce(local), dims)]
        return loss, [g / n for g in grads]

    def global_norm(grads):
        """sqrt(sum g^2): shards' partial sums are added over devices, whole leaves counted once."""
        split = [strategy.shard_optimizer and d is not None for d in dims]
        sq = [jnp.sum(jnp.square(g)) for g in grads]
        partial = sum((q for q, s in zip(sq, split) if s), jnp.float32(0))
        whole = sum((q for q, s in zip(sq, split) if not s), jnp.float32(0))
        return jnp.sqrt(lax.psum(partial, DATA) + whole)

    # ZeRO-1/2 params leave replicated: the all-gather's result is the same on every device
    # (typed invariant, except in the ring program, which opts out of the typing below).
    gathered_type = "varying" if allreduce == "ring" else "invarying"

    def local_step(state: ShardedTrainState, batch: Any):
        params = jax.tree.leaves(state.params)
        if strategy.shard_parameters:
            loss, grads = zero3_grads(params, batch)
            own = params
        else:
            loss, grads = data_parallel_grads(params, batch)
            own = [_local_slice(p, d) if strategy.shard_optimizer else p
                   for p, d in zip(params, dims)]
        grads_tree, own_tree = jax.tree.unflatten(treedef, grads), jax.tree.unflatten(treedef, own)
        updates, opt_state = state.tx.update(grads_tree, state.opt_state, own_tree)
        new_own = jax.tree.leaves(optax.apply_updates(own_tree, updates))
        if strategy.shard_optimizer and not strategy.shard_parameters:  # ZeRO-1/2: reassemble
            new_own = [p if d is None else
                       lax.all_gather(p, DATA, axis=d, tiled=True, to=gathered_type)
                       for p, d in zip(new_own, dims)]
        new_state = state.replace(step=state.step + 1, params=jax.tree.unflatten(treedef, new_own),
                                  opt_state=opt_state)
        return new_state, {"loss": lax.pmean(loss, DATA), "grad_norm": global_norm(grads)}

    manual = {DATA} if MODEL in mesh.axis_names else frozenset()
    # The ring result is equal on every device but typed "varying" (ppermute), so that path
    # opts out of shard_map's replication typing; gradients stay per-device there as well.
    return jax.shard_map(local_step, mesh=mesh, in_specs=(specs, P(DATA)), out_specs=(specs, P()),
                         axis_names=manual, check_vma=allreduce != "ring")
