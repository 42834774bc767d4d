"""Data, tensor and ZeRO-style parallel training through jit + Mesh/NamedSharding and shard_map.

Parameters are placed by one table, ``rules.LOGICAL_AXIS_RULES``, from their logical axis names
(``models.lm.param_logical_axes(model)``) to the mesh axes ``data``, ``model``, ``expert``, ``seq``
(tensor parallelism over ``model``); the strategies ``ddp | zero1 | zero2 | zero3`` add the ZeRO
split over ``data`` on top (``strategies``). The sharded step is the training spine's:
``jaxlab.train_state.make_train_step(loss_fn, optimizer, mesh=mesh, strategy=strategy,
param_axes=param_axes)`` returns ``sharded_train_step(...)``, a ``TrainStep`` called as
``step(state, batch, key)`` on a state laid out by ``shard_train_state(state, mesh, strategy,
param_axes=param_axes)``.
"""

from jaxlab.parallel.collectives import ring_allreduce
from jaxlab.parallel.memory import memory_report, zero_memory_bytes
from jaxlab.parallel.mesh import make_mesh, mesh_from_spec, parse_mesh, shard_batch
from jaxlab.parallel.rules import LOGICAL_AXIS_RULES, check_mesh_for, logical_to_mesh_specs, rules_for_mesh
from jaxlab.parallel.strategies import shard_train_state
from jaxlab.parallel.train_step import TrainStep, sharded_train_step

__all__ = [
    "LOGICAL_AXIS_RULES",
    "TrainStep",
    "check_mesh_for",
    "logical_to_mesh_specs",
    "make_mesh",
    "memory_report",
    "mesh_from_spec",
    "parse_mesh",
    "ring_allreduce",
    "rules_for_mesh",
    "shard_batch",
    "shard_train_state",
    "sharded_train_step",
    "zero_memory_bytes",
]
