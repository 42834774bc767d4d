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

The loss, its gradient and the microbatch loop are the spine's ``loss_and_grads`` run on the
device's rows (``grad_accum=K``: K microbatches of ``B / (N K)`` rows each, accumulated locally
before the one reduction), and the update is the spine's ``apply_update`` run on the device's
slice. Every device gets the step's key unchanged, so a loss that draws noise shaped like its local
rows draws the same noise on every device (fold ``lax.axis_index("data")`` into the key inside
the loss for independent draws). The loss and its metrics are averaged over ``data``
(``pmean``); ``apply_update`` decides to skip a non-finite update from the loss and the norm of the
gradient it is given, which on a shard is partial, so it is handed a loss that is NaN whenever the
global norm is not finite: every device takes the same decision.

The program is written per device throughout (``shard_map(check_vma=False)``): ``jax.grad`` of a
device's loss is that device's ``g_i`` and every reduction is written out. (With shard_map's
replication typing, the gradient of a replicated parameter would come back already summed, and
the spine's microbatch scan and skip decision, written for one device, would mix replicated and
per-device types.) Leaves that ZeRO does not split (no dimension divisible by N) are treated as
under DDP.

The optimizer runs on shards, so under ZeRO it must act elementwise (SGD, Adam, AdamW, ...);
transforms that reduce over a tensor (``clip_by_global_norm``, Adafactor) would see only a
shard and are rejected here; the ``impl="jit"`` path handles them.

The program is data parallel only: ``sharded_train_step`` rejects a mesh whose other axes
(``model``, ``expert``, ``seq``) are larger than 1 for it; size-1 axes are left out of the manual
ones (``shard_map(axis_names={"data"})``).
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
from jaxlab.parallel.mesh import DATA, data_size
from jaxlab.parallel.strategies import ShardedTrainState, Strategy, state_specs, zero_dim
from jaxlab.parallel.train_step import GATHERED, regather_policy
from jaxlab.train_state import LossFn, apply_update, loss_and_grads

__all__ = ["check_elementwise", "gather_param", "shard_map_step"]

_REDUCING_PRIMITIVES = {
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "argmax", "argmin", "dot_general", "cumsum", "cumprod", "cummax", "cummin", "sort",
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gather_param(shard: jax.Array, dim: int | None) -> jax.Array:
    """ZeRO-3: the whole parameter from this device's shard (``all_gather`` over ``data``).

    Backward: the cotangents of all devices are summed and each keeps its own slice
    (``psum_scatter``). ``dim=None`` marks a replicated leaf: forward is the identity, backward
    a ``psum``.
    """
    return _gather_fwd(shard, dim)[0]


def _gather_fwd(shard, dim):
    if dim is None:
        return shard, None
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


def shard_map_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                   strategy: Strategy, state: ShardedTrainState, *, grad_accum: int = 1,
                   regather: bool = True, allreduce: str = "psum") -> Callable:
    """``step(state, batch, key) -> (state, metrics)`` as one ``jax.shard_map`` over ``data``.

    Built for ``state``'s structure; wrap in ``jax.jit`` with the strategy's shardings
    (``TrainStep`` does).
    """
    n = data_size(mesh)
    leaves, treedef = jax.tree.flatten(state.params)
    dims = [zero_dim(x.shape, mesh) for x in leaves]
    if strategy.shard_optimizer:
        check_elementwise(optimizer, state.params, state.opt_state)
    specs = jax.tree.map(_manual, state_specs(state, mesh, strategy),
                         is_leaf=lambda x: isinstance(x, P))
    reduce = functools.partial(ring_allreduce, axis_name=DATA) if allreduce == "ring" else \
        functools.partial(lax.psum, axis_name=DATA)

    def local_loss(param_leaves, batch, key):
        return loss_fn(jax.tree.unflatten(treedef, param_leaves), batch, key)

    def zero3_grads(param_leaves, batch, key):
        def loss_of(shards, batch, key):
            whole = [checkpoint_name(gather_param(p, d), GATHERED) for p, d in zip(shards, dims)]
            return local_loss(whole, batch, key)

        if regather:
            loss_of = jax.checkpoint(loss_of, policy=regather_policy())
        # gather_param's VJP reduce-scatters: the gradients arrive as sums over devices
        loss, aux, grads = loss_and_grads(loss_of, param_leaves, batch, key, grad_accum)
        return loss, aux, [g / n for g in grads]

    def data_parallel_grads(param_leaves, batch, key):
        loss, aux, local = loss_and_grads(local_loss, param_leaves, batch, key, grad_accum)  # g_i
        if strategy.shard_gradients:  # ZeRO-2: reduce-scatter
            grads = [lax.psum(g, DATA) if d is None else
                     lax.psum_scatter(g, DATA, scatter_dimension=d, tiled=True)
                     for g, d in zip(local, dims)]
        else:  # DDP / ZeRO-1: all-reduce, then ZeRO-1 keeps its slice
            grads = [_local_slice(g, d) if strategy.shard_optimizer else g
                     for g, d in zip(reduce(local), dims)]
        return loss, aux, [g / n for g in grads]

    def global_norm(grads):
        """sqrt(sum g^2): shards' partial sums are added over devices, whole leaves counted once."""
        split = [strategy.shard_optimizer and d is not None for d in dims]
        sq = [jnp.sum(jnp.square(g)) for g in grads]
        partial = sum((q for q, s in zip(sq, split) if s), jnp.float32(0))
        whole = sum((q for q, s in zip(sq, split) if not s), jnp.float32(0))
        return jnp.sqrt(lax.psum(partial, DATA) + whole)

    def local_step(state: ShardedTrainState, batch: Any, key: jax.Array):
        params = jax.tree.leaves(state.params)
        if strategy.shard_parameters:
            loss, aux, grads = zero3_grads(params, batch, key)
            own = params
        else:
            loss, aux, grads = data_parallel_grads(params, batch, key)
            own = [_local_slice(p, d) if strategy.shard_optimizer else p
                   for p, d in zip(params, dims)]
        loss, aux = lax.pmean((loss, aux), DATA)  # global-batch means (equal shards)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # apply_update sees only this device's part of the gradient: a NaN loss whenever the global
        # norm is not finite makes every device skip alike.
        local = state.replace(params=jax.tree.unflatten(treedef, own))
        local, _ = apply_update(local, jax.tree.unflatten(treedef, grads), optimizer,
                                jnp.where(finite, loss, jnp.nan))
        new_own = jax.tree.leaves(local.params)
        if strategy.shard_optimizer and not strategy.shard_parameters:  # ZeRO-1/2: reassemble
            new_own = [p if d is None else lax.all_gather(p, DATA, axis=d, tiled=True)
                       for p, d in zip(new_own, dims)]
        new_state = local.replace(params=jax.tree.unflatten(treedef, new_own))
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "nonfinite": (~finite).astype(jnp.int32), **aux}
        return new_state, metrics

    manual = frozenset({DATA}) if len(mesh.axis_names) > 1 else frozenset()
    return jax.shard_map(local_step, mesh=mesh, in_specs=(specs, P(DATA), P()),
                         out_specs=(specs, P()), axis_names=manual, check_vma=False)
