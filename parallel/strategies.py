"""Data-parallel strategies as data: rule sets that map a train state's pytree to shardings.

The four strategies differ only in which of the three per-parameter quantities of
Rajbhandari et al. 2020 (ZeRO, Sec. 5) are split over the ``data`` axis of the mesh:

    strategy  optimizer state  gradients  parameters   per-device bytes (K bytes/param of state)
    ddp       replicated       replicated replicated   (2 + 2 + K) Psi
    zero1     sharded          replicated replicated   4 Psi + K Psi / N
    zero2     sharded          sharded    replicated   2 Psi + (2 + K) Psi / N
    zero3     sharded          sharded    sharded      (2 + 2 + K) Psi / N

A leaf is "sharded" by one rule that depends only on its shape (so Adam's ``mu``/``nu`` always
get the same layout as their parameter): with a ``model`` axis, a leaf of rank >= 2 first has its
last dimension split over ``model`` (column-parallel); a ZeRO-sharded leaf then has its largest
remaining dimension divisible by the data size split over ``data``. Leaves with no such
dimension (scalars such as Adam's step count, odd-sized biases) stay replicated; ``memory_report``
counts them as they are, so the measured 1/N is exact only for divisible shapes.

``shard_train_state`` turns a flax ``TrainState`` (or a subclass, such as the spine's
``jaxlab.train_state.TrainState``) into a ``ShardedTrainState`` (the same class plus a static
``strategy`` field) whose arrays are placed with these shardings; fields other than ``params`` and
``opt_state`` (the step, the base PRNG key) are replicated.
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

from jaxlab.parallel.mesh import DATA, MODEL, data_size, model_size

__all__ = [
    "STRATEGIES",
    "ShardedTrainState",
    "Strategy",
    "abstract_train_state",
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


def zero_dim(shape: tuple[int, ...], mesh: Mesh) -> int | None:
    """The dimension of a leaf that ZeRO splits over ``data`` (``None``: the leaf stays whole).

    The largest dimension not taken by the ``model`` axis and divisible by the data size
    (the first one on ties). With a data axis of size 1 nothing is split.
    """
    n = data_size(mesh)
    if n == 1:
        return None
    taken = _model_dim(shape, mesh)
    candidates = [d for d in range(len(shape)) if d != taken and shape[d] % n == 0]
    if not candidates:
        return None
    return max(candidates, key=lambda d: (shape[d], -d))


def _model_dim(shape: tuple[int, ...], mesh: Mesh) -> int | None:
    m = model_size(mesh)
    if m > 1 and len(shape) >= 2 and shape[-1] % m == 0:
        return len(shape) - 1
    return None


def leaf_spec(shape: tuple[int, ...], mesh: Mesh, *, shard_data: bool) -> P:
    """PartitionSpec of one leaf: the model-axis rule, plus the ZeRO rule when ``shard_data``."""
    axes: list[str | None] = [None] * len(shape)
    md = _model_dim(shape, mesh)
    if md is not None:
        axes[md] = MODEL
    zd = zero_dim(shape, mesh) if shard_data else None
    if zd is not None:
        axes[zd] = DATA
    return P(*axes)


def _specs(tree: Any, mesh: Mesh, shard_data: bool) -> Any:
    return jax.tree.map(lambda x: leaf_spec(tuple(np.shape(x)), mesh, shard_data=shard_data), tree)


def state_specs(state: train_state.TrainState, mesh: Mesh, strategy: str | Strategy) -> Any:
    """A pytree shaped like ``state`` whose leaves are the strategy's ``PartitionSpec``s.

    ``params`` and ``opt_state`` follow the strategy; ``step`` and any other field replicate.
    """
    s = get_strategy(strategy)
    everything_replicated = jax.tree.map(lambda _: P(), state)
    return everything_replicated.replace(params=_specs(state.params, mesh, s.shard_parameters),
                                         opt_state=_specs(state.opt_state, mesh, s.shard_optimizer))


def gradient_specs(params: Any, mesh: Mesh, strategy: str | Strategy) -> Any:
    """``PartitionSpec``s of the gradients after the strategy's reduction."""
    return _specs(params, mesh, get_strategy(strategy).shard_gradients)


def compute_specs(params: Any, mesh: Mesh) -> Any:
    """``PartitionSpec``s of the parameters where the model uses them (``data`` never split)."""
    return _specs(params, mesh, False)


def to_shardings(specs: Any, mesh: Mesh) -> Any:
    """Map a pytree of ``PartitionSpec`` to ``NamedSharding`` on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def state_shardings(state: train_state.TrainState, mesh: Mesh, strategy: str | Strategy) -> Any:
    """A pytree shaped like ``state`` whose leaves are the strategy's ``NamedSharding``s."""
    return to_shardings(state_specs(state, mesh, strategy), mesh)


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


def shard_train_state(state: train_state.TrainState, mesh: Mesh,
                      strategy: str | Strategy = "ddp") -> ShardedTrainState:
    """Lay ``state`` out on ``mesh`` by ``strategy``; also reshards an already sharded state.

    In a multi-process run every process passes the same (e.g. same-seed) state.
    """
    s = get_strategy(strategy)
    if DATA not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no {DATA!r} axis; build it with make_mesh")
    state = _as_sharded_state(state, s)
    shardings = state_shardings(state, mesh, s)
    if jax.process_count() == 1:
        return jax.device_put(state, shardings)
    return jax.tree.map(_place_global, state, shardings)


def abstract_train_state(state: train_state.TrainState, mesh: Mesh,
                         strategy: str | Strategy = "ddp") -> ShardedTrainState:
    """``state`` as ``jax.ShapeDtypeStruct`` leaves carrying the strategy's shardings.

    The target for restoring a checkpoint onto another mesh or strategy, and for memory
    accounting without allocating anything.
    """
    s = get_strategy(strategy)
    state = _as_sharded_state(state, s)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh),
                        state, state_shardings(state, mesh, s))
