"""The training spine's step under a parallel strategy, compiled as a single SPMD program.

``jaxlab.train_state.make_train_step(loss_fn, optimizer, mesh=mesh, strategy=strategy,
param_axes=param_axes)`` lands here (``sharded_train_step``) and returns a ``TrainStep`` with the
spine's contract,

    state = shard_train_state(create_train_state(params, optimizer, key), mesh, strategy,
                              param_axes=param_axes)
    state, metrics = step(state, batch, step_key(state))    # loss_fn(params, batch, key) -> (loss, metrics)

and calling it runs a ``jax.jit`` program whose ``in_shardings``/``out_shardings`` are the strategy's
layouts of the state (see ``jaxlab.parallel.strategies``) and whose input state buffers are donated,
so the new state reuses the old one's memory. The loss, its gradient and the microbatch loop are the
spine's ``loss_and_grads``, the guarded update its ``apply_update``: a sharded step never applies a
non-finite update either. Two implementations, identical in result:

* ``impl="jit"`` (default): the strategy is stated only as shardings, and the XLA partitioner
  (GSPMD/Shardy) inserts the collectives. The step is traced under the mesh
  (``jax.sharding.use_abstract_mesh``) and ``nn.logical_axis_rules(rules_for_mesh(mesh))``, so the
  model's ``nn.with_logical_constraint``s resolve to mesh axes: with ``param_axes`` and a ``model``
  axis this is Megatron tensor parallelism (parameters split by their logical axes, activations
  constrained likewise, one all-reduce after each row-parallel projection), with an ``expert``
  axis expert parallelism. The batch's rows are split over ``data`` and, on a mesh with a ``seq``
  axis, its positions (dim 1) over ``seq``. The ZeRO stages act on ``data`` on top:

      ddp    grads constrained replicated  -> all-reduce
      zero1  grads replicated, optimizer state sharded -> all-reduce; the update runs on each
             device's slice; params leave replicated -> all-gather
      zero2  grads constrained sharded -> reduce-scatter (the CPU backend emits all-reduce +
             slice: XLA's reduce-scatter-creation pass runs only in the GPU/TPU pipelines)
      zero3  params constrained to their compute layout (whole over ``data``) where the loss
             uses them -> all-gather; grads sharded -> reduce-scatter; params stay sharded

* ``impl="shard_map"``: the same strategies written out per device with explicit
  ``psum`` / ``psum_scatter`` / ``all_gather`` (``jaxlab.parallel.shard_map_step``); data
  parallel only (a mesh axis other than ``data`` larger than 1 is an error).

ZeRO-3 re-gathers parameters in the backward pass instead of keeping the gathered copies
(``regather=True``): the loss runs under ``jax.checkpoint`` with a policy that saves every
residual except gathered parameters (``regather_policy``), so the backward pass all-gathers the
weights it needs again; this is what gives ZeRO-3 its 1.5x communication and its 1/N parameter
memory (Rajbhandari et al. 2020, Sec. 7.2.2). A compiler may still decide to keep the gathered
copies when memory is no concern (XLA:CPU merges the two all-gathers).

The gradient of the global-batch mean loss is the mean of the per-shard gradients; this holds
when ``loss_fn`` is a mean over the batch (the usual case) and every shard has ``B / N`` rows.
With ``grad_accum=K`` each device runs its ``B / N`` rows as K microbatches of ``B / (N K)`` rows
(global microbatch ``i`` is rows ``[i B/(NK), (i+1) B/(NK))`` of every device's block, and draws
``fold_in(key, i)``), so no row crosses devices; for a mean loss the gradient is the same as
unsharded accumulation over contiguous microbatches, up to summation order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from jaxlab.parallel.mesh import DATA, data_size, replicated
from jaxlab.parallel.rules import batch_specs, check_mesh, check_mesh_for, rules_for_mesh, tensor_axes
from jaxlab.parallel.strategies import (
    ShardedTrainState,
    Strategy,
    _place_global,
    compute_specs,
    get_strategy,
    gradient_specs,
    is_sharded_state,
    state_shardings,
    to_shardings,
)
from jaxlab.train_state import LossFn, apply_update, check_step_arguments, loss_and_grads

__all__ = ["GATHERED", "IMPLS", "TrainStep", "regather_policy", "sharded_train_step"]

GATHERED = "zero3_gathered_params"
"""``checkpoint_name`` of ZeRO-3's gathered parameters (not saved for the backward pass)."""

IMPLS = ("jit", "shard_map")
ALLREDUCES = ("psum", "ring")

# Primitives whose outputs are gathered parameters: shard_map's all_gather, and under jit the
# sharding constraint that makes XLA all-gather.
_GATHERING = frozenset({"all_gather", "all_gather_invariant", "sharding_constraint"})


def regather_policy() -> Callable[..., bool]:
    """Remat policy saving every residual except gathered parameters (recomputed = re-gathered).

    (``jax.checkpoint_policies.save_anything_except_these_names`` cannot express this: it
    saves the unnamed input of the ``checkpoint_name`` instead.)
    """

    def saveable(prim, *_, **params) -> bool:
        if prim.name in _GATHERING:
            return False
        return not (prim.name == "name" and params.get("name") == GATHERED)

    return saveable


class TrainStep:
    """A compiled ``step(state, batch, key) -> (new_state, metrics)`` for one mesh and strategy.

    ``metrics`` holds the global-batch ``loss``, the global gradient norm ``grad_norm``,
    ``nonfinite`` (1 when the update was skipped) and the loss function's own metrics, averaged
    over the global batch. ``batch`` is the global batch (in a multi-process run every process
    passes the same one, or global arrays from ``shard_batch(..., process_local=True)``); ``key``
    is the step's key (``step_key(state)``), the same on every device.
    The program is built on the first call for a given state and batch structure (the shardings
    depend on the leaves' shapes) and cached. ``lower(state, batch, key)`` exposes it for
    inspection, e.g. ``step.lower(state, batch, key).compile().as_text()``.
    """

    def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                 strategy: Strategy, *, grad_accum: int, impl: str, donate: bool, regather: bool,
                 allreduce: str, param_axes: Any = None, compiler_options: dict | None = None):
        self.loss_fn, self.optimizer, self.mesh, self.strategy = loss_fn, optimizer, mesh, strategy
        self.grad_accum, self.impl, self.donate = grad_accum, impl, donate
        self.regather, self.allreduce = regather, allreduce
        self.param_axes, self.compiler_options = param_axes, compiler_options
        self._cache: dict[Any, Callable] = {}
        self._layouts: dict[Any, Any] = {}

    def __repr__(self) -> str:
        return (f"TrainStep(strategy={self.strategy.name!r}, impl={self.impl!r}, "
                f"grad_accum={self.grad_accum}, mesh={dict(self.mesh.shape)})")

    def _check(self, state: Any, batch: Any) -> None:
        if not is_sharded_state(state):
            raise ValueError(f"state is a {type(state).__name__}; lay it out first with "
                             f"shard_train_state(state, mesh, {self.strategy.name!r})")
        if state.strategy != self.strategy.name:
            raise ValueError(f"state is sharded for strategy={state.strategy!r} but the step runs "
                             f"{self.strategy.name!r}; reshard it with shard_train_state(state, "
                             f"mesh, {self.strategy.name!r})")
        if state.tx is not self.optimizer:
            raise ValueError("state.tx is not the optimizer this step was built with; create the state "
                             "with create_train_state(params, optimizer, key) from the same optax object "
                             "that make_train_step(loss_fn, optimizer, ...) gets")
        mesh = getattr(jax.tree.leaves(state.params)[0].sharding, "mesh", None)
        if mesh is not None and mesh != self.mesh:
            raise ValueError(f"state lives on mesh {dict(mesh.shape)} (devices "
                             f"{[d.id for d in mesh.devices.flat]}) but the step was built for "
                             f"{dict(self.mesh.shape)} (devices {[d.id for d in self.mesh.devices.flat]})")
        want = self._shardings(state)
        for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                                          jax.tree.leaves(want.params)):
            have = getattr(leaf, "sharding", None)
            if isinstance(have, jax.sharding.NamedSharding) and not have.is_equivalent_to(sharding,
                                                                                          np.ndim(leaf)):
                raise ValueError(f"state.params{jax.tree_util.keystr(path)} is laid out as {have.spec} but "
                                 f"the step expects {sharding.spec} (param_axes="
                                 f"{'given' if self.param_axes is not None else 'None'}); lay the state out "
                                 "with the step's param_axes: shard_train_state(state, mesh, "
                                 f"{self.strategy.name!r}, param_axes=param_axes)")
        check_mesh_for(self.mesh, batch=batch)
        n, k = data_size(self.mesh), self.grad_accum
        for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
            rows = jnp.shape(leaf)[0]
            if (rows // n) % k:
                raise ValueError(f"grad_accum={k} must divide the rows each device gets: batch leaf "
                                 f"{jax.tree_util.keystr(path) or 'batch'} has {rows} rows, {rows // n} "
                                 f"per device on the data axis of size {n}")

    def _shardings(self, state: ShardedTrainState) -> Any:
        """The strategy's shardings of ``state`` (computed once per state structure)."""
        key = (jax.tree.structure(state), tuple(tuple(np.shape(x)) for x in jax.tree.leaves(state)))
        if key not in self._layouts:
            self._layouts[key] = state_shardings(state, self.mesh, self.strategy,
                                                 param_axes=self.param_axes)
        return self._layouts[key]

    def jitted(self, state: ShardedTrainState, batch: Any) -> Callable:
        """The ``jax.jit``-compiled ``step(state, batch, key)`` for ``state``'s and ``batch``'s
        structure."""
        key = (jax.tree.structure(state), tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves(state)),
               jax.tree.structure(batch), tuple(np.ndim(x) for x in jax.tree.leaves(batch)))
        if key not in self._cache:
            shardings = self._shardings(state)
            rows = to_shardings(batch_specs(batch, self.mesh), self.mesh)
            if self.impl == "jit":
                fn = _gspmd_step(self.loss_fn, self.optimizer, self.mesh, self.strategy, state, rows,
                                 grad_accum=self.grad_accum, regather=self.regather,
                                 param_axes=self.param_axes)
            else:
                from jaxlab.parallel.shard_map_step import shard_map_step

                fn = shard_map_step(self.loss_fn, self.optimizer, self.mesh, self.strategy, state,
                                    grad_accum=self.grad_accum, regather=self.regather,
                                    allreduce=self.allreduce)
            self._cache[key] = jax.jit(
                fn,
                in_shardings=(shardings, rows, replicated(self.mesh)),
                out_shardings=(shardings, replicated(self.mesh)),
                donate_argnums=(0,) if self.donate else (),
                compiler_options=self.compiler_options,
            )
        return self._cache[key]

    def lower(self, state: ShardedTrainState, batch: Any, key: jax.Array):
        self._check(state, batch)
        return self.jitted(state, batch).lower(state, batch, key)

    def __call__(self, state: ShardedTrainState, batch: Any,
                 key: jax.Array) -> tuple[ShardedTrainState, dict]:
        self._check(state, batch)
        if jax.process_count() > 1:  # host arrays: every process passes the same global batch and key
            batch = jax.tree.map(_place_global, batch, to_shardings(batch_specs(batch, self.mesh), self.mesh))
            if not (isinstance(key, jax.Array) and not key.is_fully_addressable):
                key = _place_global(key, replicated(self.mesh))
        return self.jitted(state, batch)(state, batch, key)


def sharded_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                       strategy: str | Strategy = "ddp", *, grad_accum: int = 1, impl: str = "jit",
                       donate: bool = True, regather: bool = True, allreduce: str = "psum",
                       param_axes: Any = None, compiler_options: dict | None = None) -> TrainStep:
    """The training step of ``strategy`` on ``mesh`` (what ``make_train_step(..., mesh=)`` returns).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (loss, metrics)``, the mean loss over the rows it
        is given and a dict of scalar metrics (means over those rows).
      optimizer: the ``optax`` transformation; the state's ``tx`` must be this very object.
      mesh: from ``make_mesh``; the batch's rows are split over its ``data`` axis (positions over
        ``seq`` when it has one), parameters by ``param_axes`` over ``model`` and ``expert``.
      strategy: ``"ddp" | "zero1" | "zero2" | "zero3"`` (or a ``Strategy``).
      grad_accum: microbatches per step, run one after another on every device; it must divide
        the rows each device gets (``B / N``).
      impl: ``"jit"`` (shardings + XLA partitioner) or ``"shard_map"`` (explicit collectives).
      donate: donate the input state's buffers to the output state.
      regather: ZeRO-3 re-gathers parameters in the backward pass rather than saving them.
      allreduce: ``"psum"`` or ``"ring"`` (``ring_allreduce`` over ppermute); the gradient
        all-reduce of the shard_map DDP and ZeRO-1 programs.
      param_axes: the parameters' logical axes (``models.lm.param_logical_axes(model)``): their
        compute layout, required where the mesh splits parameters (``model`` or ``expert`` > 1);
        the state must be laid out with the same (``shard_train_state(..., param_axes=)``).
      compiler_options: XLA options of the compiled step (e.g. ``jaxlab.xla_options.FAST_COMPILE``).
    """
    s = get_strategy(strategy)
    check_step_arguments(loss_fn, optimizer, grad_accum)
    check_mesh(mesh)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    if allreduce not in ALLREDUCES:
        raise ValueError(f"allreduce={allreduce!r} must be one of {ALLREDUCES}")
    if allreduce == "ring" and impl != "shard_map":
        raise ValueError("allreduce='ring' needs impl='shard_map' (under jit XLA picks the algorithm)")
    if param_axes is None and tensor_axes(mesh):
        raise ValueError(f"mesh {dict(mesh.shape)} splits parameters over {tensor_axes(mesh)} but no "
                         "param_axes were given; pass the parameters' logical axes "
                         "(param_axes=models.lm.param_logical_axes(model))")
    others = {a: int(n) for a, n in mesh.shape.items() if a != DATA and n > 1}
    if impl == "shard_map" and others:
        raise ValueError(f"impl='shard_map' is data parallel only, but the mesh also splits {others}; "
                         "use impl='jit' for tensor, expert or context parallelism")
    return TrainStep(loss_fn, optimizer, mesh, s, grad_accum=grad_accum, impl=impl, donate=donate,
                     regather=regather, allreduce=allreduce, param_axes=param_axes,
                     compiler_options=compiler_options)


def _device_local_microbatches(batch: Any, n: int, k: int) -> Any:
    """Reorder rows so that contiguous microbatch ``i`` of ``K`` is rows ``[i m, (i+1) m)`` of every
    device's block of ``b = B / N`` rows (``m = b / K``): ``[B, ...] -> [K, N, m, ...] -> [B, ...]``."""

    def reorder(x):
        blocks = x.reshape(n, k, x.shape[0] // (n * k), *x.shape[1:])  # [N, K, m, ...]
        return jnp.swapaxes(blocks, 0, 1).reshape(x.shape)  # [K * N * m, ...]

    return jax.tree.map(reorder, batch)


def _gspmd_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                strategy: Strategy, state: ShardedTrainState, rows: Any, *, grad_accum: int,
                regather: bool, param_axes: Any) -> Callable:
    """The strategy as sharding constraints on the spine's (global-view) training step; ``rows``:
    the batch's shardings."""
    grad_shardings = to_shardings(gradient_specs(state.params, mesh, strategy, param_axes=param_axes),
                                  mesh)
    use_shardings = to_shardings(compute_specs(state.params, mesh, param_axes), mesh)
    rules = rules_for_mesh(mesh)

    def loss_of(params, batch, key):
        if strategy.shard_parameters:  # ZeRO-3: all-gather each parameter where it is used
            params = jax.lax.with_sharding_constraint(params, use_shardings)
            params = jax.tree.map(lambda p: checkpoint_name(p, GATHERED), params)
        if grad_accum > 1:  # every microbatch is spread over all devices
            batch = jax.lax.with_sharding_constraint(batch, rows)
        return loss_fn(params, batch, key)

    if strategy.shard_parameters and regather:
        loss_of = jax.checkpoint(loss_of, policy=regather_policy())

    def step(state: ShardedTrainState, batch: Any, key: jax.Array):
        # the model's logical constraints (nn.with_logical_constraint) resolve on this mesh
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            if grad_accum > 1:
                batch = _device_local_microbatches(batch, data_size(mesh), grad_accum)
            loss, aux, grads = loss_and_grads(loss_of, state.params, batch, key, grad_accum)
        # DDP / ZeRO-1: every device holds the whole reduced gradient (all-reduce);
        # ZeRO-2 / ZeRO-3: each holds its shard (reduce-scatter).
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        # The optimizer runs where its state lives; under ZeRO-1/2 out_shardings all-gather params.
        state, metrics = apply_update(state, grads, optimizer, loss)
        return state, {"loss": loss, **metrics, **aux}

    return step
