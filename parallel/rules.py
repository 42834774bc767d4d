"""One table from logical axis names to mesh axes, and the checks that a mesh fits a model.

Parameters and activations name their dimensions logically (``nn.with_logical_partitioning`` and
``nn.with_logical_constraint``, MaxText's scheme; ``models.lm.param_logical_axes(model)`` gives every
parameter's names as a ``PartitionSpec``); the mesh names its device axes. ``LOGICAL_AXIS_RULES``
(defined beside the models in ``jaxlab.models.axes``, whose docstring tabulates it, and re-exported here)
connects the two, once for the whole repository: batch over ``data``, length over ``seq``, heads, MLP units
and vocabulary over ``model``, experts over ``expert``; ``embed``, ``head_dim`` and ``layers`` stay whole.

Megatron-LM's tensor parallelism (Shoeybi et al. 2019, Sec. 3) follows from the table alone: the
query/key/value and up/gate kernels ``[embed, heads|mlp, ...]`` split their output columns, the
output and down kernels ``[heads|mlp, ..., embed]`` their input rows, so each device computes its
heads' (hidden units') share and one all-reduce per block sums the row-parallel partial products;
the partitioner (GSPMD/Shardy) inserts it.

``logical_to_mesh_specs(param_axes, mesh)`` maps a tree of logical specs to mesh specs: a mesh axis
the mesh lacks, or of size 1, maps to ``None``; each mesh axis splits at most one dimension of an
array (the first whose name maps to it, as in ``flax.linen.logical_to_mesh_axes``); a name with no
rule is an error (a typo would otherwise silently replicate the parameter); a dimension the mesh
axis does not divide is an error naming the parameter, the dimension, its logical name and the axis
size. ``rules_for_mesh(mesh)`` is the table restricted to the mesh, the argument of
``nn.logical_axis_rules`` for the model's activation constraints. ``check_mesh_for`` runs these
checks on shapes only, before anything is compiled.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxlab.models.axes import LOGICAL_AXIS_RULES, active_axes, rules_for_mesh
from jaxlab.parallel.mesh import MESH_AXES

__all__ = [
    "BATCH_AXES",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "batch_specs",
    "check_mesh",
    "check_mesh_for",
    "logical_to_mesh_specs",
    "rules_for_mesh",
    "tensor_axes",
]

BATCH_AXES = ("batch", "length")
"""Logical names of a batch leaf's leading dimensions: rows, then (rank >= 2) positions."""


def _rule_table(rules) -> dict[str, str | None]:
    table: dict[str, str | None] = {}
    for logical, axis in rules:
        table.setdefault(logical, axis)  # the first rule for a name wins, as in flax
    return table


def check_mesh(mesh: Mesh) -> None:
    """``ValueError`` unless ``mesh`` has a ``data`` axis and only axes of ``MESH_AXES``."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh={mesh!r} must be a jax.sharding.Mesh (build it with make_mesh)")
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not among {MESH_AXES}; LOGICAL_AXIS_RULES maps "
                         f"logical names only to those")
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no 'data' axis; build it with make_mesh")


def tensor_axes(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """Mesh axes of size > 1 that split parameters (every rule target but ``data`` and ``seq``)."""
    targets = {axis for _, axis in rules if axis is not None} - {"data", "seq"}
    return tuple(a for a in mesh.axis_names if a in targets and mesh.shape[a] > 1)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def _mesh_spec(logical: P, shape: tuple[int, ...], mesh: Mesh, table: dict, where: str,
               errors: list[str]) -> P:
    """One array's mesh spec from its logical spec (divisibility failures appended to ``errors``)."""
    if len(logical) > len(shape):
        raise ValueError(f"{where}: logical axes {logical} name {len(logical)} dimensions but the "
                         f"array has shape {shape}")
    active = active_axes(mesh)
    used: set[str] = set()
    out: list[str | None] = []
    for dim, name in enumerate(tuple(logical) + (None,) * (len(shape) - len(logical))):
        if name is None:
            out.append(None)
            continue
        if not isinstance(name, str):
            raise ValueError(f"{where}: dim {dim} names {name!r}; logical specs hold one name (or None) "
                             "per dimension")
        if name not in table:
            raise ValueError(f"{where}: logical axis {name!r} (dim {dim}) has no rule in "
                             f"LOGICAL_AXIS_RULES {tuple(table)}; add one (mapping it to a mesh axis "
                             "or to None)")
        axis = table[name]
        if axis is None or axis not in active or axis in used:
            out.append(None)
            continue
        if shape[dim] % active[axis]:
            errors.append(f"{where} dim {dim}: {name}={shape[dim]} not divisible by "
                          f"{axis}={active[axis]}")
        used.add(axis)
        out.append(axis)
    return P(*out)


def logical_to_mesh_specs(logical_specs: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES, *,
                          shapes: Any = None, what: str = "parameter") -> Any:
    """Map a pytree of logical ``PartitionSpec``s to ``PartitionSpec``s over ``mesh``'s axes.

    Args:
      logical_specs: pytree of ``PartitionSpec`` of logical names (``models.lm.param_logical_axes``);
        a spec shorter than its array leaves the trailing dimensions whole.
      mesh: the device mesh.
      rules: ``(logical, mesh axis or None)`` pairs.
      shapes: a pytree of arrays (or ``ShapeDtypeStruct``s) with the structure of ``logical_specs``:
        checks that the structures match, pads each spec to its array's rank and checks that every
        split dimension is divisible by its mesh axis. Without it only the names are mapped.
      what: the noun for a leaf in error messages.

    Raises:
      ValueError: a name without a rule, a structure or rank mismatch, or indivisible dimensions
        (all of them listed: path, dim, logical name, size and the mesh axis size).
    """
    table = _rule_table(rules)
    spec_leaves, spec_def = jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=_is_spec)
    for path, spec in spec_leaves:
        if not _is_spec(spec):
            raise ValueError(f"{what} {jax.tree_util.keystr(path)}: {spec!r} is not a PartitionSpec "
                             "of logical names")
    if shapes is None:  # names only: size 0 passes every divisibility check
        return jax.tree.map(lambda s: _mesh_spec(s, (0,) * len(s), mesh, table, what, []),
                            logical_specs, is_leaf=_is_spec)
    shape_leaves, _ = jax.tree_util.tree_flatten_with_path(shapes)
    if [p for p, _ in shape_leaves] != [p for p, _ in spec_leaves]:
        have = {jax.tree_util.keystr(p) for p, _ in shape_leaves}
        named = {jax.tree_util.keystr(p) for p, _ in spec_leaves}
        raise ValueError(f"the logical axes do not match the {what}s' structure: {what}s without axes "
                         f"{sorted(have - named)[:5]}, axes without a {what} {sorted(named - have)[:5]}")
    errors: list[str] = []
    out = [_mesh_spec(spec, tuple(np.shape(x)), mesh, table, f"{what} {jax.tree_util.keystr(path)}",
                      errors) for (path, spec), (_, x) in zip(spec_leaves, shape_leaves)]
    if errors:
        raise ValueError(f"mesh {dict(mesh.shape)} does not fit the model: " + "; ".join(errors))
    return jax.tree.unflatten(spec_def, out)


def batch_specs(batch: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """``PartitionSpec`` of every batch leaf: rows by the ``batch`` rule (over ``data``) and, for a leaf
    of rank >= 2, positions (dim 1) by the ``length`` rule (over ``seq`` when the mesh splits it)."""
    return jax.tree.map(lambda x: logical_to_mesh_specs(P(*BATCH_AXES[:np.ndim(x)]), mesh, rules),
                        batch)


def check_mesh_for(mesh: Mesh, *, params: Any = None, param_axes: Any = None, batch: Any = None,
                   rules=LOGICAL_AXIS_RULES) -> None:
    """Every check of a mesh against a model and a batch, on shapes only (nothing is compiled).

    Args:
      mesh: the device mesh (``data`` plus any of ``model``, ``expert``, ``seq``).
      params: the parameters (arrays or ``ShapeDtypeStruct``s).
      param_axes: the parameters' logical specs; required when the mesh splits parameters
        (``model`` or ``expert`` larger than 1).
      batch: a batch (arrays or shapes): rows divisible by ``data``, positions by ``seq``.

    Raises:
      ValueError: naming the axis, the parameter or batch leaf, the sizes.
    """
    check_mesh(mesh)
    splitting = tensor_axes(mesh, rules)
    if params is not None and param_axes is None and splitting:
        raise ValueError(f"mesh {dict(mesh.shape)} splits parameters over {splitting} but no "
                         "param_axes were given; pass the parameters' logical axes "
                         "(param_axes=models.lm.param_logical_axes(model))")
    if params is not None and param_axes is not None:
        logical_to_mesh_specs(param_axes, mesh, rules, shapes=params)
    if batch is not None:
        active = active_axes(mesh)
        table = _rule_table(rules)
        for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
            shape, name = np.shape(leaf), jax.tree_util.keystr(path) or "batch"
            if not shape:
                raise ValueError(f"batch leaf {name} is a scalar; every batch leaf needs a leading "
                                 f"batch axis to split over the data axis of size {mesh.shape['data']}")
            for dim, logical in enumerate(BATCH_AXES[:len(shape)]):
                axis = table.get(logical)
                if axis in active and shape[dim] % active[axis]:
                    size = "batch size" if dim == 0 else "length"
                    raise ValueError(f"{size} {shape[dim]} (leaf {name}, shape {shape}) is not "
                                     f"divisible by the mesh's {axis} axis size {active[axis]}")
