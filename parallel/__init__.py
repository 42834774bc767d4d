"""Data and ZeRO-style parallel training through jit + Mesh/NamedSharding and shard_map.

The sharded step is the training spine's: ``jaxlab.train_state.make_train_step(loss_fn, optimizer,
mesh=mesh, strategy=strategy)`` returns ``sharded_train_step(...)``, a ``TrainStep`` called as
``step(state, batch, key)`` on a state laid out by ``shard_train_state``.
"""

from jaxlab.parallel.collectives import ring_allreduce
from jaxlab.parallel.memory import memory_report, zero_memory_bytes
from jaxlab.parallel.mesh import make_mesh, shard_batch
from jaxlab.parallel.strategies import shard_train_state
from jaxlab.parallel.train_step import TrainStep, sharded_train_step

__all__ = [
    "TrainStep",
    "make_mesh",
    "memory_report",
    "ring_allreduce",
    "shard_batch",
    "shard_train_state",
    "sharded_train_step",
    "zero_memory_bytes",
]
