"""Data and ZeRO-style parallel training through jit + Mesh/NamedSharding and shard_map."""

from jaxlab.parallel.collectives import ring_allreduce
from jaxlab.parallel.memory import memory_report, zero_memory_bytes
from jaxlab.parallel.mesh import make_mesh
from jaxlab.parallel.strategies import shard_train_state
from jaxlab.parallel.train_step import make_train_step

__all__ = [
    "make_mesh",
    "make_train_step",
    "memory_report",
    "ring_allreduce",
    "shard_train_state",
    "zero_memory_bytes",
]
