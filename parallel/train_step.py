"""One training step under a data-parallel strategy, compiled as a single SPMD program.

``make_train_step(loss_fn, mesh, strategy)`` returns a ``TrainStep``: calling it runs a
``jax.jit`` program whose ``in_shardings``/``out_shardings`` are the strategy's layouts of the
state (see ``jaxlab.parallel.strategies``) and whose input state buffers are donated, so the
new state reuses the old one's memory. Two implementations, identical in result:

* ``impl="jit"`` (default): the strategy is stated only as shardings, and the XLA partitioner
  (GSPMD/Shardy) inserts the collectives:

      ddp    grads constrained replicated  -> all-reduce
      zero1  grads replicated, optimizer state sharded -> all-reduce; the update runs on each
             device's slice; params leave replicated -> all-gather
      zero2  grads constrained sharded -> reduce-scatter (the CPU backend emits all-reduce +
             slice: XLA's reduce-scatter-creation pass runs only in the GPU/TPU pipelines)
      zero3  params constrained replicated where the loss uses them -> all-gather; grads
             sharded -> reduce-scatter; params stay sharded

* ``impl="shard_map"``: the same strategies written out per device with explicit
  ``psum`` / ``psum_scatter`` / ``all_gather`` (``jaxlab.parallel.shard_map_step``).

ZeRO-3 re-gathers parameters in the backward pass instead of keeping the gathered copies
(``regather=True``): the loss runs under ``jax.checkpoint`` with a policy that saves every
residual except gathered parameters (``regather_policy``), so the backward pass all-gathers the
weights it needs again; this is what gives ZeRO-3 its 1.5x communication and its 1/N parameter
memory (Rajbhandari et al. 2020, Sec. 7.2.2). A compiler may still decide to keep the gathered
copies when memory is no concern (XLA:CPU merges the two all-gathers).

The gradient of the global-batch mean loss is the mean of the per-shard gradients; this holds
when ``loss_fn`` is a mean over the batch (the usual case) and every shard has ``B / N`` rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from jaxlab.parallel.mesh import batch_sharding, check_batch, replicated, shard_batch
from jaxlab.parallel.strategies import (
    ShardedTrainState,
    Strategy,
    compute_specs,
    get_strategy,
    gradient_specs,
    is_sharded_state,
    state_shardings,
    to_shardings,
)

__all__ = ["GATHERED", "TrainStep", "make_train_step", "regather_policy"]

LossFn = Callable[[Any, Any], jax.Array]

GATHERED = "zero3_gathered_params"
"""``checkpoint_name`` of ZeRO-3's gathered parameters (not saved for the backward pass)."""

IMPLS = ("jit", "shard_map")


def scalar_loss(loss: jax.Array) -> jax.Array:
    """Raise when ``loss_fn`` did not return a scalar (a common slip: per-example losses)."""
    if jnp.ndim(loss) != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {jnp.shape(loss)}")
    return loss


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
    """A compiled ``step(state, batch) -> (new_state, metrics)`` for one mesh and strategy.

    ``metrics`` holds the global-batch ``loss`` and the global gradient norm ``grad_norm``.
    ``batch`` is the global batch (in a multi-process run every process passes the same one,
    or global arrays from ``shard_batch(..., process_local=True)``).
    The program is built on the first call for a given state structure (the shardings depend
    on the leaves' shapes) and cached. ``lower(state, batch)`` exposes it for inspection,
    e.g. ``step.lower(state, batch).compile().as_text()``.
    """

    def __init__(self, loss_fn: LossFn, mesh: Mesh, strategy: Strategy, *, impl: str,
                 donate: bool, regather: bool, allreduce: str):
        self.loss_fn, self.mesh, self.strategy = loss_fn, mesh, strategy
        self.impl, self.donate, self.regather, self.allreduce = impl, donate, regather, allreduce
        self._cache: dict[Any, Callable] = {}

    def __repr__(self) -> str:
        return (f"TrainStep(strategy={self.strategy.name!r}, impl={self.impl!r}, "
                f"mesh={dict(self.mesh.shape)})")

    def _check(self, state: Any, batch: Any) -> None:
        if not is_sharded_state(state):
            raise ValueError(f"state is a {type(state).__name__}; lay it out first with "
                             f"shard_train_state(state, mesh, {self.strategy.name!r})")
        if state.strategy != self.strategy.name:
            raise ValueError(f"state is sharded for strategy={state.strategy!r} but the step runs "
                             f"{self.strategy.name!r}; reshard it with shard_train_state(state, "
                             f"mesh, {self.strategy.name!r})")
        mesh = getattr(jax.tree.leaves(state.params)[0].sharding, "mesh", None)
        if mesh is not None and mesh != self.mesh:
            raise ValueError(f"state lives on mesh {dict(mesh.shape)} (devices "
                             f"{[d.id for d in mesh.devices.flat]}) but the step was built for "
                             f"{dict(self.mesh.shape)} (devices {[d.id for d in self.mesh.devices.flat]})")
        check_batch(batch, self.mesh)

    def jitted(self, state: ShardedTrainState) -> Callable:
        """The ``jax.jit``-compiled step for ``state``'s structure."""
        key = (jax.tree.structure(state),
               tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(state)))
        if key not in self._cache:
            shardings = state_shardings(state, self.mesh, self.strategy)
            if self.impl == "jit":
                fn = _gspmd_step(self.loss_fn, self.mesh, self.strategy, state, self.regather)
            else:
                from jaxlab.parallel.shard_map_step import shard_map_step

                fn = shard_map_step(self.loss_fn, self.mesh, self.strategy, state,
                                    regather=self.regather, allreduce=self.allreduce)
            self._cache[key] = jax.jit(
                fn,
                in_shardings=(shardings, batch_sharding(self.mesh)),
                out_shardings=(shardings, replicated(self.mesh)),
                donate_argnums=(0,) if self.donate else (),
            )
        return self._cache[key]

    def lower(self, state: ShardedTrainState, batch: Any):
        self._check(state, batch)
        return self.jitted(state).lower(state, batch)

    def __call__(self, state: ShardedTrainState, batch: Any) -> tuple[ShardedTrainState, dict]:
        self._check(state, batch)
        if jax.process_count() > 1:  # host arrays: every process passes the same global batch
            batch = shard_batch(batch, self.mesh)
        return self.jitted(state)(state, batch)


def make_train_step(loss_fn: LossFn, mesh: Mesh, strategy: str | Strategy = "ddp", *,
                    impl: str = "jit", donate: bool = True, regather: bool = True,
                    allreduce: str = "psum") -> TrainStep:
    """Build the training step of ``strategy`` on ``mesh``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the batch it is given.
      mesh: from ``make_mesh``; the batch is split over its ``data`` axis.
      strategy: ``"ddp" | "zero1" | "zero2" | "zero3"`` (or a ``Strategy``).
      impl: ``"jit"`` (shardings + XLA partitioner) or ``"shard_map"`` (explicit collectives).
      donate: donate the input state's buffers to the output state.
      regather: ZeRO-3 re-gathers parameters in the backward pass rather than saving them.
      allreduce: ``"psum"`` or ``"ring"`` (``ring_allreduce`` over ppermute); the gradient
        all-reduce of the shard_map DDP and ZeRO-1 programs.
    """
    s = get_strategy(strategy)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    if allreduce not in ("psum", "ring"):
        raise ValueError(f"allreduce={allreduce!r} must be 'psum' or 'ring'")
    if allreduce == "ring" and impl != "shard_map":
        raise ValueError("allreduce='ring' needs impl='shard_map' (under jit XLA picks the algorithm)")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn={loss_fn!r} must be callable as loss_fn(params, batch)")
    return TrainStep(loss_fn, mesh, s, impl=impl, donate=donate, regather=regather,
                     allreduce=allreduce)


def _gspmd_step(loss_fn: LossFn, mesh: Mesh, strategy: Strategy, state: ShardedTrainState,
                regather: bool) -> Callable:
    """The strategy as sharding constraints on an ordinary (global-view) training step."""
    grad_shardings = to_shardings(gradient_specs(state.params, mesh, strategy), mesh)
    use_shardings = to_shardings(compute_specs(state.params, mesh), mesh)

    def loss_of(params, batch):
        if strategy.shard_parameters:  # ZeRO-3: all-gather each parameter where it is used
            params = jax.lax.with_sharding_constraint(params, use_shardings)
            params = jax.tree.map(lambda p: checkpoint_name(p, GATHERED), params)
        return scalar_loss(loss_fn(params, batch))

    if strategy.shard_parameters and regather:
        loss_of = jax.checkpoint(loss_of, policy=regather_policy())

    def step(state: ShardedTrainState, batch: Any):
        loss, grads = jax.value_and_grad(loss_of)(state.params, batch)
        # DDP / ZeRO-1: every device holds the whole reduced gradient (all-reduce);
        # ZeRO-2 / ZeRO-3: each holds its shard (reduce-scatter).
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        # The optimizer runs where its state lives; under ZeRO-1/2 out_shardings all-gather params.
        new_state = state.apply_gradients(grads=grads)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step
