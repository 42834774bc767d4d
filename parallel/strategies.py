"""Parallel strategies as data: rule sets that map a train state's pytree to shardings.

Two layers of rules place every parameter. The *compute layout* is the parameter's logical layout
mapped through ``jaxlab.parallel.rules.LOGICAL_AXIS_RULES``: tensor parallelism (``heads``,
``kv_heads``, ``mlp``, ``vocab`` over ``model``, Megatron's column-then-row pairs) and expert
parallelism (``experts`` over ``expert``); it is the layout the model computes with. The *strategy*
then decides which of the three per-parameter quantities of Rajbhandari et al. 2020 (ZeRO, Sec. 5)
are also split over the ``data`` axis:

    strategy  optimizer state  gradients  parameters   per-device bytes (K bytes/param of state)
    ddp       replicated       replicated replicated   (2 + 2 + K) Psi
    zero1     sharded          replicated replicated   4 Psi + K Psi / N
    zero2     sharded          sharded    replicated   2 Psi + (2 + K) Psi / N
    zero3     sharded          sharded    sharded      (2 + 2 + K) Psi / N

(``Psi``: parameters per tensor-parallel shard, ``N = |data|``.) With the LM's logical axes
(``models.lm.param_logical_axes``) on a ``data=2, model=4`` mesh, for example:

    parameter            logical axes               compute layout          ZeRO adds ``data`` on
    embed/embedding      (vocab, embed)             (model, None)           embed
    mixer/query/kernel   (embed, heads, head_dim)   (None, model, None)     embed
    mixer/out/kernel     (heads, head_dim, embed)   (model, None, None)     embed
    ffn/up/kernel        (embed, mlp)               (None, model)           embed
    ffn/down/kernel      (mlp, embed)               (model, None)           embed
    *_norm/scale         (embed,)                   (None,)                 embed
    (scan_layers)        (layers, ...)              (None, ...)             the same dimension

A "sharded" leaf has its largest dimension not taken by the compute layout and divisible by the
data size split over ``data`` (``zero_dim``; the first on ties). Leaves with no such dimension
(scalars such as Adam's step count, odd-sized biases) keep their compute layout; ``memory_report``
counts them as they are, so the measured 1/N is exact only for divisible shapes.

Optimizer-state leaves (Adam's ``mu``/``nu``, ...) take the layout of the parameter they belong to:
the parameter whose key path is the longest suffix of the leaf's path and whose shape is the
leaf's (``.opt_state[0].mu['w']`` belongs to ``['w']``). Scalars are replicated; a leaf matching
no parameter gets the ZeRO split alone.

``param_axes`` (the tree of logical ``PartitionSpec``s, the structure of ``params``) is needed where
the mesh splits parameters (``model`` or ``expert`` > 1; without it that is an error); without it
every parameter's compute layout is replicated. ``shard_train_state`` turns a flax ``TrainState``
(or a subclass, such as the spine's ``jaxlab.train_state.TrainState``) into a ``ShardedTrainState``
(the same class plus a static ``strategy`` field) whose arrays are placed with these shardings;
fields other than ``params`` and ``opt_state`` (the step, the base PRNG key) are replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlab.parallel.mesh import DATA, data_size
from jaxlab.parallel.rules import check_mesh, check_mesh_for, logical_to_mesh_specs

__all__ = [
    "STRATEGIES",
    "ShardedTrainState",
    "Strategy",
    "abstract_train_state",
    "compute_specs",
    "gradient_specs",
    "get_strategy",
    "is_sharded_state",
    "leaf_spec",
    "shard_train_state",
    "sharded_state_type",
    "state_shardings",
    "state_specs",
    "to_shardings",
    "zero_dim",
]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Which of optimizer state, gradients and parameters are split over the ``data`` axis."""

    name: str
    shard_optimizer: bool
    shard_gradients: bool
    shard_parameters: bool
    description: str = ""

    def __post_init__(self):
        if self.shard_parameters and not self.shard_gradients:
            raise ValueError(f"{self.name}: shard_parameters=True needs shard_gradients=True")
        if self.shard_gradients and not self.shard_optimizer:
            raise ValueError(f"{self.name}: shard_gradients=True needs shard_optimizer=True")

    @property
    def stage(self) -> int:
        """ZeRO stage: 0 for plain data parallelism, 1, 2 or 3."""
        return int(self.shard_optimizer) + int(self.shard_gradients) + int(self.shard_parameters)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("ddp", False, False, False, "replicate everything; all-reduce gradients"),
        Strategy("zero1", True, False, False, "shard optimizer state; all-reduce gradients, "
                 "update the local shard, all-gather parameters"),
        Strategy("zero2", True, True, False, "also reduce-scatter gradients into shards"),
        Strategy("zero3", True, True, True, "also shard parameters; all-gather them where used"),
    )
}


def get_strategy(strategy: str | Strategy) -> Strategy:
    """Look a strategy up by name (``"ddp" | "zero1" | "zero2" | "zero3"``)."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy={strategy!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy]


class ShardedTrainState(train_state.TrainState):
    """A flax ``TrainState`` that also records (statically) the strategy its arrays are laid out by.

    Subclasses of ``TrainState`` with more fields (the spine's ``jaxlab.train_state.TrainState``
    and its base key) get a class of their own deriving from both (``sharded_state_type``), so a
    sharded state is an instance of its own class and of this one; their extra fields are
    replicated.
    """

    strategy: str = struct.field(pytree_node=False, default="ddp")


_SHARDED_TYPES: dict[type, type] = {train_state.TrainState: ShardedTrainState}


def sharded_state_type(cls: type) -> type:
    """``cls`` and ``ShardedTrainState`` in one class (``cls`` itself when it already has a
    ``strategy`` field)."""
    if not (isinstance(cls, type) and issubclass(cls, train_state.TrainState)):
        raise ValueError(f"state must be a flax TrainState, got {cls.__name__}")
    if any(f.name == "strategy" for f in dataclasses.fields(cls)):
        return cls
    if cls not in _SHARDED_TYPES:
        _SHARDED_TYPES[cls] = type(f"Sharded{cls.__name__}", (cls, ShardedTrainState), {
            "__annotations__": {"strategy": str},
            "strategy": struct.field(pytree_node=False, default="ddp"),
            "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} with the static strategy field of ShardedTrainState.",
        })
    return _SHARDED_TYPES[cls]


def is_sharded_state(state: Any) -> bool:
    """Whether ``state`` came from ``shard_train_state`` (it records its strategy)."""
    return isinstance(state, train_state.TrainState) and isinstance(getattr(state, "strategy", None), str)


# ----------------------------------------------------------------------------- leaf rules


def zero_dim(shape: tuple[int, ...], mesh: Mesh, compute: P = P()) -> int | None:
    """The dimension of a leaf that ZeRO splits over ``data`` (``None``: the leaf stays whole on it).

    The largest dimension not split by the leaf's compute layout ``compute`` (a mesh
    ``PartitionSpec``) and divisible by the data size (the first one on ties). With a data axis of
    size 1 nothing is split.
    """
    n = data_size(mesh)
    if n == 1:
        return None
    taken = tuple(compute) + (None,) * (len(shape) - len(compute))
    candidates = [d for d in range(len(shape)) if taken[d] is None and shape[d] % n == 0]
    if not candidates:
        return None
    return max(candidates, key=lambda d: (shape[d], -d))


def leaf_spec(shape: tuple[int, ...], mesh: Mesh, compute: P = P(), *, shard_data: bool) -> P:
    """PartitionSpec of one leaf: its compute layout, plus the ZeRO split when ``shard_data``."""
    axes = list(tuple(compute) + (None,) * (len(shape) - len(compute)))
    zd = zero_dim(shape, mesh, compute) if shard_data else None
    if zd is not None:
        axes[zd] = DATA
    return P(*axes)


def compute_specs(params: Any, mesh: Mesh, param_axes: Any = None) -> Any:
    """``PartitionSpec``s of the parameters where the model uses them: the logical layout of
    ``param_axes`` mapped by ``LOGICAL_AXIS_RULES`` (``data`` never split), padded to each rank;
    every dimension whole without ``param_axes``.

    Raises:
      ValueError: an unknown mesh axis, a mesh that splits parameters without ``param_axes``, or a
        parameter dimension its mesh axis does not divide (see ``check_mesh_for``).
    """
    check_mesh_for(mesh, params=params, param_axes=param_axes)
    if param_axes is None:
        return jax.tree.map(lambda x: P(*[None] * np.ndim(x)), params)
    return logical_to_mesh_specs(param_axes, mesh, shapes=params)


def _zero_specs(tree: Any, compute: Any, mesh: Mesh, shard_data: bool) -> Any:
    return jax.tree.map(lambda x, c: leaf_spec(tuple(np.shape(x)), mesh, c, shard_data=shard_data),
                        tree, compute)


def _names(path: tuple) -> tuple[str, ...]:
    """A key path as plain names: ``.opt_state[0].mu['w']`` ends in ``('w',)``, as ``['w']`` does."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _opt_state_specs(opt_state: Any, params: Any, compute: Any, mesh: Mesh, shard_data: bool) -> Any:
    """Each optimizer-state leaf takes the layout of its parameter: the one whose path is the
    longest suffix of the leaf's path and whose shape is the leaf's. Scalars are replicated; other
    unmatched leaves get the ZeRO split alone."""
    owners = {}
    for (path, x), c in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(compute, is_leaf=lambda v: isinstance(v, P))):
        owners[_names(path)] = (tuple(np.shape(x)), c)

    def spec(path, leaf):
        shape = tuple(np.shape(leaf))
        if not shape:
            return P()
        names = _names(path)
        for start in range(len(names) + 1):
            owner = owners.get(names[start:])
            if owner is not None and owner[0] == shape:
                return leaf_spec(shape, mesh, owner[1], shard_data=shard_data)
        return leaf_spec(shape, mesh, shard_data=shard_data)

    return jax.tree_util.tree_map_with_path(spec, opt_state)


def state_specs(state: train_state.TrainState, mesh: Mesh, strategy: str | Strategy, *,
                param_axes: Any = None) -> Any:
    """A pytree shaped like ``state`` whose leaves are the strategy's ``PartitionSpec``s.

    ``params`` and ``opt_state`` take their compute layout (from ``param_axes``) plus the
    strategy's ZeRO split; ``step`` and any other field replicate.
    """
    s = get_strategy(strategy)
    compute = compute_specs(state.params, mesh, param_axes)
    everything_replicated = jax.tree.map(lambda _: P(), state)
    return everything_replicated.replace(
        params=_zero_specs(state.params, compute, mesh, s.shard_parameters),
        opt_state=_opt_state_specs(state.opt_state, state.params, compute, mesh, s.shard_optimizer))


def gradient_specs(params: Any, mesh: Mesh, strategy: str | Strategy, *, param_axes: Any = None) -> Any:
    """``PartitionSpec``s of the gradients after the strategy's reduction."""
    compute = compute_specs(params, mesh, param_axes)
    return _zero_specs(params, compute, mesh, get_strategy(strategy).shard_gradients)


def to_shardings(specs: Any, mesh: Mesh) -> Any:
    """Map a pytree of ``PartitionSpec`` to ``NamedSharding`` on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def state_shardings(state: train_state.TrainState, mesh: Mesh, strategy: str | Strategy, *,
                    param_axes: Any = None) -> Any:
    """A pytree shaped like ``state`` whose leaves are the strategy's ``NamedSharding``s."""
    return to_shardings(state_specs(state, mesh, strategy, param_axes=param_axes), mesh)


# ----------------------------------------------------------------------------- placement


def _int32(step: Any) -> Any:
    """The step counter as int32, the dtype a jitted step returns (so no recompilation)."""
    if isinstance(step, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(step.shape, jnp.int32, sharding=step.sharding)
    if isinstance(step, jax.Array):
        return step if step.dtype == jnp.int32 else step.astype(jnp.int32)
    return np.asarray(step, np.int32)


def _as_sharded_state(state: train_state.TrainState, strategy: Strategy) -> ShardedTrainState:
    cls = sharded_state_type(type(state))
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "strategy"}
    fields["step"] = _int32(fields["step"])
    return cls(**fields, strategy=strategy.name)


def _place_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Multi-process placement: every process passes the same value and keeps its own shards."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_train_state(state: train_state.TrainState, mesh: Mesh, strategy: str | Strategy = "ddp", *,
                      param_axes: Any = None) -> ShardedTrainState:
    """Lay ``state`` out on ``mesh`` by ``strategy``; also reshards an already sharded state.

    ``param_axes``: the parameters' logical axes (``models.lm.param_logical_axes(model)``), needed
    when the mesh splits parameters (``model`` or ``expert`` > 1). Every check runs on shapes
    before anything is placed. In a multi-process run every process passes the same (e.g.
    same-seed) state.
    """
    s = get_strategy(strategy)
    check_mesh(mesh)
    state = _as_sharded_state(state, s)
    shardings = state_shardings(state, mesh, s, param_axes=param_axes)
    if jax.process_count() == 1:
        return jax.device_put(state, shardings)
    return jax.tree.map(_place_global, state, shardings)


def abstract_train_state(state: train_state.TrainState, mesh: Mesh, strategy: str | Strategy = "ddp", *,
                         param_axes: Any = None) -> ShardedTrainState:
    """``state`` as ``jax.ShapeDtypeStruct`` leaves carrying the strategy's shardings.

    The target for restoring a checkpoint onto another mesh or strategy, and for memory
    accounting without allocating anything.
    """
    s = get_strategy(strategy)
    state = _as_sharded_state(state, s)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh),
                        state, state_shardings(state, mesh, s, param_axes=param_axes))
