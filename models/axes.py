"""The logical axis names of jaxlab's models and the mesh axes they live on by default.

Parameters and activations name their dimensions logically (``nn.with_logical_partitioning`` and
``nn.with_logical_constraint``, MaxText's scheme; ``models.lm.param_logical_axes(model)`` gives every
parameter's names as a ``PartitionSpec``); a device mesh names its axes ``data``, ``model``, ``expert`` and
``seq``. ``LOGICAL_AXIS_RULES`` connects the two, once for the whole repository:

    logical    mesh axis   what is split
    batch      data        rows of the batch (data parallel)
    length     seq         positions of a row (context parallel)
    heads      model       query heads (Megatron column-then-row attention)
    kv_heads   model       key/value heads
    mlp        model       feed-forward hidden units (column-parallel up/gate, row-parallel down)
    vocab      model       the embedding's and the head's vocabulary rows
    experts    expert      MoE experts (expert parallel)
    embed      -           d_model: whole on every device
    head_dim   -           whole
    layers     -           the scanned stack of blocks: whole

The table is data about the models (it lives beside them, so that ``models.hub.load_pretrained`` can place a
checkpoint on a mesh without importing ``parallel``); ``jaxlab.parallel.rules`` re-exports it with the checks
that a mesh fits a model.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LOGICAL_AXIS_RULES", "active_axes", "rules_for_mesh"]

LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", "seq"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("experts", "expert"),
    ("embed", None),
    ("head_dim", None),
    ("layers", None),
)
"""``(logical name, mesh axis or None)`` pairs: where every named dimension of the models lives."""


def active_axes(mesh: Any) -> dict[str, int]:
    """``{axis: size}`` of the mesh axes that split anything (size > 1)."""
    return {name: int(size) for name, size in mesh.shape.items() if size > 1}


def rules_for_mesh(mesh: Any, rules=LOGICAL_AXIS_RULES) -> tuple[tuple[str, str | None], ...]:
    """``rules`` with every mesh axis that ``mesh`` lacks or holds once (size 1) replaced by ``None``:
    the rules for ``nn.logical_axis_rules`` while tracing on ``mesh``."""
    active = active_axes(mesh)
    return tuple((logical, axis if axis in active else None) for logical, axis in rules)
