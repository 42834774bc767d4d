"""Device meshes and batch placement.

A mesh names the devices' axes: ``data`` (the batch and, under ZeRO, the training state), and
optionally ``model`` (tensor parallel), ``expert`` (expert parallel) and ``seq`` (context
parallel). Which dimension of which array lives on which axis is decided by the logical-axis
rules of ``jaxlab.parallel.rules``; the XLA SPMD partitioner (GSPMD/Shardy) turns the layouts
into collectives.

Axis types. ``jax.make_mesh`` defaults to ``AxisType.Explicit`` axes, where shardings are part
of array types and every op must have an unambiguous output sharding. The strategies here are
stated as in/out shardings and ``with_sharding_constraint`` hints on top of an arbitrary user
``loss_fn`` that knows nothing about meshes, which is exactly what ``AxisType.Auto`` (the
partitioner propagates shardings through the user's code) is for. Hence ``make_mesh`` builds
``Auto`` axes deliberately.

    mesh = make_mesh(data=8)              # 1-D: {'data': 8}
    mesh = make_mesh(data=2, model=4)     # 2-D: {'data': 2, 'model': 4}
    mesh = mesh_from_spec("data=2,model=2,seq=2")   # what the trainers' --mesh takes
    batch = shard_batch(batch, mesh)      # leading axis B split over 'data'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA",
    "EXPERT",
    "MESH_AXES",
    "MODEL",
    "SEQ",
    "batch_sharding",
    "check_batch",
    "data_size",
    "format_mesh",
    "make_mesh",
    "mesh_from_spec",
    "model_size",
    "parse_mesh",
    "replicated",
    "shard_batch",
]

DATA = "data"
"""Mesh axis over which the batch (and, under ZeRO, the training state) is split."""
MODEL = "model"
"""Tensor-parallel axis: attention heads, MLP hidden units and the vocabulary split over it
(``jaxlab.parallel.rules``)."""
EXPERT = "expert"
"""Expert-parallel axis: the MoE's experts split over it, tokens exchanged with all-to-all."""
SEQ = "seq"
"""Context-parallel axis: the sequence split over it, attention as ring attention."""
MESH_AXES = (DATA, MODEL, EXPERT, SEQ)
"""Every mesh axis, in mesh order."""


def make_mesh(data: int | None = None, model: int = 1, expert: int = 1, seq: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with a ``data`` axis and each of ``model``, ``expert``, ``seq`` whose size is > 1, in that order.

    Args:
      data: size of the data axis; ``None`` uses every device left after the other axes.
      model: tensor-parallel axis size (1 means no ``model`` axis).
      expert: expert-parallel axis size (1 means no ``expert`` axis).
      seq: context-parallel axis size (1 means no ``seq`` axis).
      devices: devices to use (default ``jax.devices()``, all processes' devices). A mesh
        smaller than the device list takes its first devices, so ``make_mesh(data=2)`` on 8
        devices is a sub-mesh of devices 0 and 1.

    Raises:
      ValueError: non-positive sizes, or a mesh larger than (or, with ``data=None``, not dividing)
        the available devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    others = {MODEL: model, EXPERT: expert, SEQ: seq}
    for name, size in others.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}={size!r} must be a positive int")
    rest = math.prod(others.values())
    if data is None:
        if len(devices) % rest:
            raise ValueError(f"{' x '.join(f'{k}={v}' for k, v in others.items() if v > 1)} does not divide the "
                             f"{len(devices)} available devices; pass data= explicitly")
        data = len(devices) // rest
    if isinstance(data, bool) or not isinstance(data, int) or data < 1:
        raise ValueError(f"data={data!r} must be a positive int")
    axes = {DATA: data, **{k: v for k, v in others.items() if v > 1}}
    needed = math.prod(axes.values())
    if needed > len(devices):
        raise ValueError(f"a mesh of {format_mesh(axes)} needs {needed} devices but only {len(devices)} are "
                         f"available (jax.device_count()={jax.device_count()}); on CPU, simulate more with "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts")
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                         devices=devices[:needed])


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=4,model=2"`` -> ``{"data": 4, "model": 2}``: axis names from ``MESH_AXES``, each once, sizes >= 1.

    Raises:
      ValueError: an unknown or repeated axis, a malformed entry or a size that is not a positive int.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh={spec!r} must look like 'data=4,model=2' (axes {MESH_AXES})")
    axes: dict[str, int] = {}
    for entry in spec.split(","):
        name, sep, size = (part.strip() for part in entry.partition("="))
        if not sep:
            raise ValueError(f"mesh={spec!r}: entry {entry!r} must be AXIS=SIZE (axes {MESH_AXES})")
        if name not in MESH_AXES:
            raise ValueError(f"mesh={spec!r}: unknown axis {name!r}; the axes are {MESH_AXES}")
        if name in axes:
            raise ValueError(f"mesh={spec!r}: axis {name!r} given twice")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh={spec!r}: {name}={size!r} must be a positive int")
        axes[name] = int(size)
    return axes


def mesh_from_spec(spec: str | None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh a trainer's ``--mesh`` names (``None``: every device on ``data``); ``data`` left out takes
    the devices the other axes leave."""
    axes = {} if spec is None else parse_mesh(spec)
    return make_mesh(axes.get(DATA), axes.get(MODEL, 1), axes.get(EXPERT, 1), axes.get(SEQ, 1), devices=devices)


def format_mesh(axes: dict[str, int] | Mesh) -> str:
    """``{"data": 4, "model": 2}`` (or a mesh) -> ``"data=4,model=2"``."""
    shape = dict(axes.shape) if isinstance(axes, Mesh) else axes
    return ",".join(f"{k}={v}" for k, v in shape.items())


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
