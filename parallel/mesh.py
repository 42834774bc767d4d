"""Device meshes and batch placement for data-parallel training.

A mesh names the devices' axes. Every strategy in ``jaxlab.parallel`` splits the batch and
(for ZeRO) the training state over the ``data`` axis; an optional ``model`` axis shards the
last dimension of every matrix (column-parallel, Megatron-style) and is left to the XLA SPMD
partitioner (GSPMD/Shardy) to turn into collectives.

Axis types. ``jax.make_mesh`` defaults to ``AxisType.Explicit`` axes, where shardings are part
of array types and every op must have an unambiguous output sharding. The strategies here are
stated as in/out shardings and ``with_sharding_constraint`` hints on top of an arbitrary user
``loss_fn`` that knows nothing about meshes, which is exactly what ``AxisType.Auto`` (the
partitioner propagates shardings through the user's code) is for. Hence ``make_mesh`` builds
``Auto`` axes deliberately.

    mesh = make_mesh(data=8)              # 1-D: {'data': 8}
    mesh = make_mesh(data=2, model=4)     # 2-D: {'data': 2, 'model': 4}
    batch = shard_batch(batch, mesh)      # leading axis B split over 'data'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA",
    "MODEL",
    "batch_sharding",
    "check_batch",
    "data_size",
    "make_mesh",
    "model_size",
    "replicated",
    "shard_batch",
]

DATA = "data"
"""Mesh axis over which the batch (and, under ZeRO, the training state) is split."""
MODEL = "model"
"""Optional mesh axis over which the last dimension of every matrix is split."""


def make_mesh(data: int | None = None, model: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with a ``data`` axis and, when ``model > 1``, a ``model`` axis.

    Args:
      data: size of the data axis; ``None`` uses every device left after ``model``.
      model: size of the model axis (1 means no model axis).
      devices: devices to use (default ``jax.devices()``, all processes' devices). A mesh
        smaller than the device list takes its first ``data * model`` devices, so
        ``make_mesh(data=2)`` on 8 devices is a sub-mesh of devices 0 and 1.

    Raises:
      ValueError: non-positive sizes, or a mesh larger than the available devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(model, int) or model < 1:
        raise ValueError(f"model={model!r} must be a positive int")
    if data is None:
        if len(devices) % model:
            raise ValueError(f"model={model} does not divide the {len(devices)} available devices; "
                             "pass data= explicitly")
        data = len(devices) // model
    if not isinstance(data, int) or data < 1:
        raise ValueError(f"data={data!r} must be a positive int")
    needed = data * model
    if needed > len(devices):
        raise ValueError(f"a mesh of data={data} x model={model} needs {needed} devices but only "
                         f"{len(devices)} are available (jax.device_count()={jax.device_count()}); "
                         "on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         "set before JAX starts")
    shape, names = ((data,), (DATA,)) if model == 1 else ((data, model), (DATA, MODEL))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices[:needed])


def data_size(mesh: Mesh) -> int:
    """Size of the mesh's ``data`` axis (1 when it has none)."""
    return int(mesh.shape.get(DATA, 1))


def model_size(mesh: Mesh) -> int:
    """Size of the mesh's ``model`` axis (1 when it has none)."""
    return int(mesh.shape.get(MODEL, 1))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value held whole by every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``, the rest replicated: ``[B/N, ...]`` per device."""
    return NamedSharding(mesh, P(DATA) if DATA in mesh.axis_names else P())


def check_batch(batch: Any, mesh: Mesh) -> None:
    """Raise ``ValueError`` unless every batch leaf has a leading axis divisible by ``data``."""
    n = data_size(mesh)
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = np.shape(leaf)
        name = jax.tree_util.keystr(path) or "batch"
        if not shape:
            raise ValueError(f"batch leaf {name} is a scalar; every batch leaf needs a leading "
                             f"batch axis to split over the data axis of size {n}")
        if shape[0] % n:
            raise ValueError(f"batch size {shape[0]} (leaf {name}, shape {shape}) is not divisible "
                             f"by the mesh's data axis size {n}")


def shard_batch(batch: Any, mesh: Mesh, *, process_local: bool = False) -> Any:
    """Place a batch with its leading axis split over ``data``.

    Args:
      batch: pytree of arrays ``[B, ...]``.
      mesh: the mesh.
      process_local: ``False``: every process passes the same *global* batch and each device
        takes its slice. ``True``: each process passes only its own rows ``[B / P, ...]``
        (``P`` processes) and the global batch is their concatenation in process order.

    Returns:
      The batch as global ``jax.Array``s sharded ``[B/N, ...]`` per device.
    """
    sharding = batch_sharding(mesh)
    if process_local:
        out = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                           batch)
        check_batch(out, mesh)
        return out
    check_batch(batch, mesh)

    def place(x):
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        host = np.asarray(x)  # every process holds the same global batch; each keeps its rows
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, batch)
