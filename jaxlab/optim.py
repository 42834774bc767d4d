"""The optimizer factory every jaxlab trainer uses: Adam, AdamW or Muon after global-norm clipping, under a
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

Muon (Jordan et al. 2024; ``optax.contrib.scale_by_muon``) updates the hidden weight matrices with the
Newton-Schulz orthogonalised Nesterov momentum ``O_t ~ U V^T`` of ``M_t = U S V^T``, scaled as in Moonlight
(Liu et al. 2025, "Muon is Scalable for LLM Training", eq. 4) so that its RMS matches AdamW's::

    W_t = W_{t-1} - lr_t * (0.2 * sqrt(max(fan_in, fan_out)) * O_t + weight_decay * W_{t-1})

which lets AdamW's learning rate and weight decay carry over unchanged. Which leaves are matrices, and
which of their axes are the matrix's rows and columns (the others, e.g. a scanned ``layers`` or an
``experts`` axis, are batch axes orthogonalised independently), is data: ``muon_dims``, a tree of
``MuonDimensionNumbers`` or None per leaf (:func:`muon_dimensions` derives it from logical axis names).
Every other leaf (embeddings, norm scales, biases, SSM dynamics) takes optax's AdamW branch of
``optax.contrib.muon`` (AdamW with Nesterov momentum). Decay follows ``no_decay`` in both branches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

import jax
import optax

from jaxlab.validation import check_greater, check_positive

__all__ = ["ALGORITHMS", "DEFAULT_NO_DECAY", "SCHEDULES", "OptimizerConfig", "decay_mask", "lr_schedule",
           "make_optimizer", "muon_dimensions"]

ALGORITHMS = ("adamw", "adam", "muon")
SCHEDULES = ("cosine", "linear")
DEFAULT_NO_DECAY = frozenset({"bias", "scale"})
"""Names never decayed whatever the model: flax's ``Dense``/``Conv`` biases and norm scales."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer: algorithm, learning-rate schedule, Adam moments, weight decay and clipping."""

    lr: float = 3e-4
    """Peak learning rate (reached at the end of the warmup)."""
    algorithm: str = "adamw"
    """adamw (decoupled weight decay) | adam (no weight decay) | muon (orthogonalised momentum on the
    hidden matrices, AdamW on the rest; Moonlight's RMS matching)."""
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
    muon_momentum: float = 0.95
    """Muon's momentum (Nesterov) on the matrices."""
    muon_rms: float = 0.2
    """Muon's update RMS per unit learning rate (Moonlight: 0.2, AdamW's typical update RMS)."""
    ns_steps: int = 5
    """Newton-Schulz iterations of Muon's orthogonalisation."""

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
        check_positive(self, "ns_steps", integer=True)
        check_greater(self, "muon_rms")
        for name in ("b1", "b2", "min_lr_ratio", "muon_momentum"):
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


def _leaf_name(path) -> str | None:
    last = path[-1] if path else None
    return getattr(last, "key", getattr(last, "name", None))


def decay_mask(params: Any, no_decay: Collection[str] = DEFAULT_NO_DECAY) -> Any:
    """Pytree of bools, True where a leaf gets weight decay: its name (the last key of its path) is not
    in ``no_decay``. By name, not by rank: a rank-2 norm scale or SSM state matrix is still not decayed,
    and a rank-1 embedding of a custom module still is."""
    no_decay = frozenset(no_decay)

    def decays(path, leaf) -> bool:
        return _leaf_name(path) not in no_decay

    return jax.tree_util.tree_map_with_path(decays, params)


def muon_dimensions(logical_axes: Any, shapes: Any = None, *, matrix_axis: str = "embed",
                    batch_axes: Collection[str] = ("layers", "experts"),
                    exclude_axes: Collection[str] = ("vocab",)) -> Any:
    """Muon's view of each parameter from its logical axis names (a pytree of tuples or
    ``PartitionSpec``s, e.g. ``jaxlab.models.lm.param_logical_axes(model)``): a leaf whose non-batch axes
    are at least two and start or end with ``matrix_axis`` is a matrix, ``embed -> rest``
    (reduction = the leading ``embed``, e.g. a query ``[embed, heads, head_dim]`` as ``[d, H * Dh]``) or
    ``rest -> embed`` (an output projection ``[heads, head_dim, embed]``, a down projection ``[mlp,
    embed]``); ``batch_axes`` are orthogonalised independently; leaves with an ``exclude_axes`` axis (the
    embedding table and LM head) and every other leaf map to None (AdamW). With ``shapes`` (the parameters,
    or their ``jax.eval_shape``), a leaf named ``kernel`` that carries no axis names but batch axes and has
    two other dimensions is a flax ``Dense`` kernel ``[in, out]``, taken as the matrix it is."""
    from optax.contrib import MuonDimensionNumbers
    batch, exclude = frozenset(batch_axes), frozenset(exclude_axes)

    def dims(path, axes, shape=None):
        names = tuple(axes)
        if shape is not None and _leaf_name(path) == "kernel" and not set(names) - batch - {None}:
            ndim = len(shape.shape)
            lead = len([n for n in names if n in batch])
            if ndim - lead == 2:
                return MuonDimensionNumbers(reduction_axis=ndim - 2, output_axis=ndim - 1)
        kept = [i for i, n in enumerate(names) if n not in batch]
        if len(kept) < 2 or exclude.intersection(names):
            return None
        if names[kept[0]] == matrix_axis:
            return MuonDimensionNumbers(reduction_axis=kept[0], output_axis=tuple(kept[1:]))
        if names[kept[-1]] == matrix_axis:
            return MuonDimensionNumbers(reduction_axis=tuple(kept[:-1]), output_axis=kept[-1])
        return None

    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    if shapes is None:
        return jax.tree_util.tree_map_with_path(dims, logical_axes, is_leaf=is_axes)
    return jax.tree_util.tree_map_with_path(dims, logical_axes, shapes, is_leaf=is_axes)


def _decoupled_weight_decay(schedule: optax.Schedule, rate: float, mask) -> optax.GradientTransformation:
    """``updates - schedule(t) * rate * params`` on the leaves ``mask`` selects: AdamW's decoupled decay,
    scaled by the learning rate, applied after an update that already carries its learning rate."""

    def init(params):
        return optax.ScaleByScheduleState(count=jax.numpy.zeros([], jax.numpy.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the parameters: call tx.update(grads, state, params)")
        lr = schedule(state.count)
        decayed = jax.tree.map(lambda u, p, m: u - lr * rate * p if m else u, updates, params, mask(params))
        return decayed, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig, *, no_decay: Collection[str] = DEFAULT_NO_DECAY,
                   schedule: optax.Schedule | None = None, muon_dims: Any = None,
                   sign_descent: Mapping[str, float] | None = None) -> optax.GradientTransformation:
    """``clip_by_global_norm(cfg.clip_norm)`` (unless 0), then Adam(W) or Muon under ``schedule``
    (default: :func:`lr_schedule`). ``no_decay`` names the parameters left undecayed; ``muon_dims`` (Muon
    only, required there) is a tree like the parameters of ``MuonDimensionNumbers`` or None per leaf
    (:func:`muon_dimensions`). ``sign_descent`` maps parameter names to a fixed rate: those leaves take
    ``p <- p - rate * sign(g)`` instead (no schedule, no decay; e.g. an MoE's balancing ``router_bias``)."""
    if sign_descent:
        rates = dict(sign_descent)
        label = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: _leaf_name(path) if _leaf_name(path) in rates else "main", params)
        if muon_dims is not None:  # the main branch sees the other leaves only
            muon_dims = jax.tree_util.tree_map_with_path(
                lambda path, d: None if _leaf_name(path) in rates else d, muon_dims,
                is_leaf=lambda x: x is None or type(x).__name__ == "MuonDimensionNumbers")
        main = make_optimizer(cfg, no_decay=no_decay, schedule=schedule, muon_dims=muon_dims)
        signs = {name: optax.chain(optax.scale_by_sign(), optax.scale(-rate)) for name, rate in rates.items()}
        return optax.partition({"main": main, **signs}, label)
    schedule = lr_schedule(cfg) if schedule is None else schedule
    names = frozenset(no_decay)
    if cfg.algorithm == "adam":
        opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.algorithm == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=lambda params: decay_mask(params, names))
    else:
        if muon_dims is None:
            raise ValueError("algorithm='muon' needs muon_dims= (which leaves are matrices, e.g. "
                             "muon_dimensions(jaxlab.models.lm.param_logical_axes(model)))")
        from optax.contrib import muon
        opt = muon(schedule, ns_steps=cfg.ns_steps, beta=cfg.muon_momentum, eps=cfg.eps, adam_b1=cfg.b1,
                   adam_b2=cfg.b2, muon_weight_dimension_numbers=muon_dims, consistent_rms=cfg.muon_rms)
        if cfg.weight_decay:
            opt = optax.chain(opt, _decoupled_weight_decay(schedule, cfg.weight_decay,
                                                           lambda params: decay_mask(params, names)))
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm > 0 else opt
