"""Memory accounting: measured per-device bytes of a sharded train state, and the ZeRO formula.

Rajbhandari et al. 2020 (ZeRO, Sec. 3.1 and Figure 1) count, for Psi parameters trained with
mixed-precision Adam, 2 Psi bytes of fp16 parameters, 2 Psi of fp16 gradients and K Psi of
optimizer state (K = 12: fp32 master parameters, momentum and variance). Per device on N devices:

    DP      (2 + 2 + K) Psi              7.5B params, N = 64: 120 GB
    ZeRO-1  (2 + 2) Psi + K Psi / N                           31.4 GB
    ZeRO-2  2 Psi + (2 + K) Psi / N                           16.6 GB
    ZeRO-3  (2 + 2 + K) Psi / N                                1.9 GB

A 7B model thus needs 7e9 x 16 = 112 GB under plain data parallelism. Plain fp32 AdamW (what
``optax.adamw`` keeps) is 4 + 4 + 8 bytes per parameter, the same 16 bytes split differently.

``memory_report`` measures instead of assuming: it sums the bytes of the state's buffers that
live on one device. Gradients are not part of the state (they are temporaries of the step);
they are reported as the bytes the strategy's gradient layout puts on that device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxlab.parallel.strategies import STRATEGIES, gradient_specs, to_shardings

__all__ = ["MemoryReport", "compiled_memory", "memory_report", "normalize_stage",
           "zero_memory_breakdown", "zero_memory_bytes"]

_STAGES = {name: s.stage for name, s in STRATEGIES.items()}


def normalize_stage(stage: int | str) -> int:
    """ZeRO stage from ``0..3`` or a strategy name (``"ddp"`` is stage 0)."""
    if isinstance(stage, str):
        if stage not in _STAGES:
            raise ValueError(f"unknown stage={stage!r}; choose 0-3 or one of {sorted(_STAGES)}")
        return _STAGES[stage]
    if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or not 0 <= stage <= 3:
        raise ValueError(f"stage={stage!r} must be 0 (DDP), 1, 2 or 3")
    return int(stage)


def zero_memory_breakdown(num_params: float, num_devices: int, stage: int | str, *,
                          param_bytes: float = 2, grad_bytes: float = 2,
                          optimizer_bytes: float = 12) -> dict[str, float]:
    """Per-device bytes of parameters, gradients and optimizer state under ZeRO ``stage``."""
    if num_params <= 0:
        raise ValueError(f"num_params={num_params} must be positive")
    if int(num_devices) != num_devices or num_devices < 1:
        raise ValueError(f"num_devices={num_devices} must be a positive integer")
    for name, value in (("param_bytes", param_bytes), ("grad_bytes", grad_bytes),
                        ("optimizer_bytes", optimizer_bytes)):
        if value < 0:
            raise ValueError(f"{name}={value} must be non-negative")
    stage = normalize_stage(stage)
    n = num_devices
    out = {
        "params": num_params * param_bytes / (n if stage >= 3 else 1),
        "grads": num_params * grad_bytes / (n if stage >= 2 else 1),
        "optimizer": num_params * optimizer_bytes / (n if stage >= 1 else 1),
    }
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def zero_memory_bytes(num_params: float, num_devices: int, stage: int | str,
                      param_bytes: float = 2, grad_bytes: float = 2,
                      optimizer_bytes: float = 12) -> float:
    """Per-device bytes of model states under ZeRO ``stage`` (0 = DDP), ZeRO paper Sec. 5.

    ``zero_memory_bytes(7.5e9, 64, 3) / 1e9 == 1.875`` (Figure 1: 1.9 GB).
    """
    return zero_memory_breakdown(num_params, num_devices, stage, param_bytes=param_bytes,
                                 grad_bytes=grad_bytes, optimizer_bytes=optimizer_bytes)["total"]


# ----------------------------------------------------------------------------- measurement


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of a train state on one device, and of one whole (unsharded) copy.

    ``params`` / ``grads`` / ``opt_state``: bytes on ``device``. ``*_total``: bytes of the whole
    tensors (what one device holds under DDP). ``all_devices``: bytes of params and optimizer
    state summed over every device (replicas included), measured from the buffers.
    """

    device: str
    strategy: str
    num_devices: int
    params: int
    grads: int
    opt_state: int
    params_total: int
    grads_total: int
    opt_state_total: int
    all_devices: int

    @property
    def per_device(self) -> int:
        return self.params + self.grads + self.opt_state

    @property
    def total(self) -> int:
        return self.params_total + self.grads_total + self.opt_state_total

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "per_device": self.per_device, "total": self.total}

    def __str__(self) -> str:
        rows = [("params", self.params, self.params_total), ("grads", self.grads, self.grads_total),
                ("opt_state", self.opt_state, self.opt_state_total),
                ("sum", self.per_device, self.total)]
        lines = [f"{self.strategy} on {self.num_devices} devices, {self.device}:",
                 f"{'':10} {'device':>12} {'whole':>12} {'ratio':>7}"]
        lines += [f"{name:10} {a:12,d} {b:12,d} {a / max(b, 1):7.3f}" for name, a, b in rows]
        return "\n".join(lines)


def _dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def _nbytes(shape: tuple[int, ...], dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _bytes_on(leaf: Any, device: jax.Device) -> int:
    """Bytes of ``leaf`` stored on ``device``: from its buffers when addressable, else its sharding."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return _nbytes(np.shape(leaf), _dtype(leaf))
    if device not in sharding.device_set:
        return 0
    if isinstance(leaf, jax.Array) and device.process_index == jax.process_index():
        return sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return _nbytes(sharding.shard_shape(leaf.shape), leaf.dtype)


def _bytes_everywhere(leaf: Any) -> int:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return _nbytes(np.shape(leaf), _dtype(leaf))
    return _nbytes(sharding.shard_shape(leaf.shape), leaf.dtype) * len(sharding.device_set)


def _tree_bytes(tree: Any) -> int:
    return sum(_nbytes(np.shape(x), _dtype(x)) for x in jax.tree.leaves(tree))


def memory_report(state: Any, strategy: str | None = None, *, device: jax.Device | None = None,
                  param_axes: Any = None) -> MemoryReport:
    """Per-device bytes of params / grads / optimizer state, and whole-copy totals.

    Args:
      state: a ``TrainState`` (usually from ``shard_train_state``); its leaves may also be
        ``jax.ShapeDtypeStruct`` with shardings (``abstract_train_state``), then nothing is
        allocated and bytes follow from ``sharding.shard_shape``.
      strategy: the layout of the gradients; defaults to ``state.strategy`` (``"ddp"`` for a
        plain ``TrainState``).
      device: the device to measure (default: the lowest-id device holding the params,
        device 0 on a full mesh).
      param_axes: the parameters' logical axes (``models.lm.param_logical_axes(model)``), as given
        to ``shard_train_state``; needed on a mesh that splits parameters (``model`` > 1), where
        the gradients take the parameters' tensor-parallel layout.
    """
    strategy = strategy or getattr(state, "strategy", "ddp")
    normalize_stage(strategy)
    params = jax.tree.leaves(state.params)
    if not params:
        raise ValueError("state.params has no arrays")
    sharding = getattr(params[0], "sharding", None)
    if device is None:
        device = min(sharding.device_set, key=lambda d: d.id) if sharding else jax.devices()[0]
    opt_leaves = jax.tree.leaves(state.opt_state)

    if isinstance(sharding, NamedSharding):
        mesh = sharding.mesh
        grad_specs = gradient_specs(state.params, mesh, strategy, param_axes=param_axes)
        grad_shardings = jax.tree.leaves(to_shardings(grad_specs, mesh))
        grads = sum(_nbytes(s.shard_shape(p.shape), p.dtype) if device in s.device_set else 0
                    for p, s in zip(params, grad_shardings))
        num_devices = mesh.size
    else:
        grads, num_devices = sum(_bytes_on(p, device) for p in params), 1

    return MemoryReport(
        device=str(device), strategy=strategy, num_devices=num_devices,
        params=sum(_bytes_on(x, device) for x in params),
        grads=grads,
        opt_state=sum(_bytes_on(x, device) for x in opt_leaves),
        params_total=_tree_bytes(state.params), grads_total=_tree_bytes(state.params),
        opt_state_total=_tree_bytes(state.opt_state),
        all_devices=sum(_bytes_everywhere(x) for x in params + opt_leaves),
    )


def compiled_memory(compiled: Any) -> dict[str, int]:
    """XLA's per-device memory analysis of a compiled program (``jit(f).lower(...).compile()``).

    ``argument``/``output``: bytes of inputs and outputs; ``alias``: output bytes that reuse
    donated inputs; ``temp``: scratch (e.g. gradients and gathered parameters inside a step);
    ``peak`` = argument + output - alias + temp, an upper bound on what the step holds at once.
    """
    stats = compiled.memory_analysis()
    if stats is None:
        raise ValueError("this backend gives no memory analysis for compiled programs")
    out = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out
