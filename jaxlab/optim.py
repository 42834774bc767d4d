"""The optimizer factory every jaxlab trainer uses: Adam or AdamW after global-norm clipping, under a
learning-rate schedule, with weight decay masked by parameter name.

    cfg = OptimizerConfig(lr=3e-3, warmup_steps=100, decay_steps=2000, weight_decay=0.1)
    tx = make_optimizer(cfg, no_decay=NO_DECAY_PARAMS)      # the LM passes its own names
    schedule = lr_schedule(cfg)                             # step -> learning rate, for logging

The schedule (Loshchilov & Hutter 2017's cosine, after a linear warmup from 0):

    lr(t) = lr * t / warmup                                                  t <  warmup
    lr(t) = lr * (r + (1 - r) * (1 + cos(pi * (t - warmup) / (T - warmup))) / 2)    warmup <= t <= T
    lr(t) = lr * r                                                           t >  T

with ``T = decay_steps`` and ``r = min_lr_ratio``; ``decay_steps=None`` holds ``lr`` after the warmup
(``schedule="linear"`` decays linearly to ``lr * r`` instead, e.g. PPO's annealing with ``r = 0``).
Weight decay is decoupled (AdamW) and applies to every parameter whose name (the last key of its
path in the pytree) is not in ``no_decay``: norm scales and biases by default, and whatever a model
adds (the state-space dynamics of the LM's SSM mixers, :data:`jaxlab.models.lm.NO_DECAY_PARAMS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import jax
import optax

from jaxlab.validation import check_positive

__all__ = ["ALGORITHMS", "DEFAULT_NO_DECAY", "SCHEDULES", "OptimizerConfig", "decay_mask", "lr_schedule",
           "make_optimizer"]

ALGORITHMS = ("adamw", "adam")
SCHEDULES = ("cosine", "linear")
DEFAULT_NO_DECAY = frozenset({"bias", "scale"})
"""Names never decayed whatever the model: flax's ``Dense``/``Conv`` biases and norm scales."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer: algorithm, learning-rate schedule, Adam moments, weight decay and clipping."""

    lr: float = 3e-4
    """Peak learning rate (reached at the end of the warmup)."""
    algorithm: str = "adamw"
    """adamw (decoupled weight decay) | adam (no weight decay)."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps (0: start at lr)."""
    decay_steps: int | None = None
    """Step at which the decay reaches lr * min_lr_ratio (None: constant lr after the warmup)."""
    schedule: str = "cosine"
    """Shape of the decay: cosine | linear."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the decay as a fraction of lr."""
    b1: float = 0.9
    """Adam's first-moment decay."""
    b2: float = 0.95
    """Adam's second-moment decay."""
    eps: float = 1e-8
    """Adam's epsilon (added to the root of the second moment)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of AdamW (parameters not named in ``no_decay``)."""
    clip_norm: float = 1.0
    """Clip gradients to this global L2 norm before the update (0: no clipping)."""

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r} must be one of {ALGORITHMS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be >= 0")
        if self.decay_steps is not None:
            check_positive(self, "decay_steps")
            if self.warmup_steps > self.decay_steps:
                raise ValueError(f"warmup_steps={self.warmup_steps} must be <= decay_steps={self.decay_steps}")
        for name in ("b1", "b2", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [0, 1]")
        for name in ("eps", "weight_decay", "clip_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.algorithm == "adam" and self.weight_decay:
            raise ValueError(f"algorithm='adam' has no weight decay; got weight_decay={self.weight_decay} "
                             f"(use algorithm='adamw')")


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """``step -> learning rate``: linear warmup from 0, then constant or a cosine/linear decay."""
    if cfg.decay_steps is None:
        if not cfg.warmup_steps:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                                     optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.decay_steps, end_value=end)
    decay = optax.linear_schedule(cfg.lr, end, max(cfg.decay_steps - cfg.warmup_steps, 1))
    if not cfg.warmup_steps:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), decay], [cfg.warmup_steps])


def decay_mask(params: Any, no_decay: Collection[str] = DEFAULT_NO_DECAY) -> Any:
    """Pytree of bools, True where a leaf gets weight decay: its name (the last key of its path) is not
    in ``no_decay``. By name, not by rank: a rank-2 norm scale or SSM state matrix is still not decayed,
    and a rank-1 embedding of a custom module still is."""
    no_decay = frozenset(no_decay)

    def decays(path, leaf) -> bool:
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        return name not in no_decay

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, *, no_decay: Collection[str] = DEFAULT_NO_DECAY,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """``clip_by_global_norm(cfg.clip_norm)`` (unless 0), then Adam(W) under ``schedule`` (default:
    :func:`lr_schedule`). ``no_decay`` names the parameters AdamW leaves undecayed."""
    schedule = lr_schedule(cfg) if schedule is None else schedule
    if cfg.algorithm == "adam":
        opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    else:
        names = frozenset(no_decay)
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=lambda params: decay_mask(params, names))
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm > 0 else opt
