"""``sa-mean``: stochastic approximation (Zhao, *Mathematical Foundations of RL*, Chapter 6).

Three panels, each averaged over seeds (vmapped):

1. incremental mean estimation ``w_{k+1} = w_k - a_k (w_k - x_k)`` with ``a_k = 1/k`` (the sample mean)
   and with a constant step, which never stops moving;
2. Robbins-Monro on the book's example ``g(w) = tanh(w - 1)`` (root ``w* = 1``, ``w_1 = 3``) observed
   with Gaussian noise, for ``a_k = 1/k`` and ``a_k = 1/k^0.6`` (both meet the step-size conditions) and a
   constant step (it does not);
3. BGD, mini-batch GD and SGD minimising ``E[||w - X||^2 / 2]`` (whose minimiser is ``E[X]``) over
   ``n`` samples uniform on a square (Sec. 6.4): distance to the sample mean against the iteration.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.registry import Claim, ExperimentResult, register_experiment
from jaxlab.rl.tabular.stochastic_approximation import (
    mean_estimation,
    mean_estimation_gradient_descent,
    robbins_monro,
)
from jaxlab.xla_options import FAST_COMPILE
from jaxlab.validation import check_positive


@dataclasses.dataclass(frozen=True)
class SAConfig:
    """Sizes of the stochastic-approximation study."""

    num_steps: int = 2000
    """Iterations per run."""
    num_seeds: int = 16
    """Independent runs averaged per curve."""
    noise_std: float = 1.0
    """Standard deviation of the Robbins-Monro observation noise."""
    constant_step: float = 0.1
    """The constant step size compared against the decaying ones."""
    num_samples: int = 100
    """Size n of the gradient-descent data set."""
    half_width: float = 10.0
    """The data are uniform on the square [-half_width, half_width]^2."""
    batch_sizes: tuple[int, ...] = (1, 5, 50, 100)
    """Batch sizes m to compare: 1 is SGD, num_samples is BGD, in between MBGD."""

    def __post_init__(self):
        check_positive(self, "num_steps", "num_seeds", "num_samples")
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std} must be >= 0")
        if not 0 < self.constant_step <= 1:
            raise ValueError(f"constant_step={self.constant_step} must lie in (0, 1]")
        if not self.half_width > 0:
            raise ValueError(f"half_width={self.half_width} must be > 0")
        if not self.batch_sizes or not all(1 <= m <= self.num_samples for m in self.batch_sizes):
            raise ValueError(f"batch_sizes={self.batch_sizes} must lie in [1, num_samples={self.num_samples}]")


def _noisy_tanh(sigma: float):
    """``g~(w, eta) = tanh(w - 1) + sigma eta``; cached per sigma so the jit sees one hashable callable."""
    return _NOISY_TANH.setdefault(sigma, lambda w, eta: jnp.tanh(w - 1.0) + sigma * eta)


_NOISY_TANH: dict = {}


def _band(ax, x, runs, label, color):
    """Mean curve over runs ``[R, K]`` with a band of +-1 standard deviation."""
    mean, std = runs.mean(0), runs.std(0)
    ax.plot(x, mean, color=color, label=label, lw=1.2)
    ax.fill_between(x, np.maximum(mean - std, 1e-8), mean + std, color=color, alpha=0.2, lw=0)


def _label(m: int, n: int) -> str:
    return "BGD" if m == n else ("SGD" if m == 1 else f"MBGD, m={m}")


@partial(jax.jit, static_argnames=("cfg",), compiler_options=FAST_COMPILE)
def _simulate(key: jax.Array, cfg: SAConfig) -> dict:
    """Every run of the study in one program (one compilation instead of dozens of small ones; at
    these sizes compiling dominates, hence the low XLA optimisation level).
    Returns error trajectories ``[R, K + 1]`` keyed by panel and label."""
    K, R = cfg.num_steps, cfg.num_seeds
    seeds = jax.random.split(jax.random.fold_in(key, 0), R)

    # 1. Mean estimation of X ~ N(5, 2^2).
    x = 5.0 + 2.0 * jax.random.normal(jax.random.fold_in(key, 1), (R * K,)).reshape(R, K)  # [R, K]
    w_mean = {
        "a_k = 1/k": jax.vmap(lambda xs: mean_estimation(xs, 0.0))(x),
        f"a_k = {cfg.constant_step}": jax.vmap(lambda xs: mean_estimation(xs, 0.0, cfg.constant_step, 0.0))(x),
    }
    out = {"mean": {k: jnp.abs(w - 5.0) for k, w in w_mean.items()},
           "to_sample_mean": jnp.abs(w_mean["a_k = 1/k"][:, -1] - x.mean(1)).max()}

    # 2. Robbins-Monro root finding of tanh(w - 1) from w_1 = 3.
    g = _noisy_tanh(cfg.noise_std)
    schedules = {"a_k = 1/k": (1.0, 1.0), "a_k = 1/k^0.6": (1.0, 0.6),
                 f"a_k = {cfg.constant_step}": (cfg.constant_step, 0.0)}
    out["rm"] = {label: jnp.abs(jax.vmap(lambda k: robbins_monro(k, g, 3.0, K, a0, p))(seeds) - 1.0)
                 for label, (a0, p) in schedules.items()}
    out["rm_clean"] = robbins_monro(seeds[0], _noisy_tanh(0.0), 3.0, K)

    # 3. BGD / MBGD / SGD on the mean of n points uniform on a square.
    data = jax.random.uniform(jax.random.fold_in(key, 2), (cfg.num_samples * 2,),
                              minval=-cfg.half_width, maxval=cfg.half_width).reshape(cfg.num_samples, 2)
    w1 = jnp.full((2,), 2.0 * cfg.half_width)
    out["gd"] = {}
    for m in cfg.batch_sizes:
        keys = jax.random.split(jax.random.fold_in(key, 10 + m), R)  # independent draws per batch size
        w = jax.vmap(lambda k: mean_estimation_gradient_descent(k, data, w1, m, K))(keys)  # [R, K + 1, 2]
        out["gd"][_label(m, cfg.num_samples)] = jnp.linalg.norm(w - data.mean(0), axis=-1)  # [R, K + 1]
    return out


@register_experiment(
    "sa-mean",
    description="Robbins-Monro mean estimation and root finding; SGD vs mini-batch GD vs BGD",
    paper="Zhao 2025, Mathematical Foundations of Reinforcement Learning, Ch. 6 (Secs. 6.1, 6.2, 6.4)",
    quick_seconds=1.7,
    quick=SAConfig(num_steps=1000, num_seeds=8),
)
def sa_mean(cfg: SAConfig, ctx: RunContext) -> ExperimentResult:
    K = cfg.num_steps
    ks = np.arange(1, K + 2)  # iterate index of w_1 ... w_{K+1}
    out = jax.tree.map(np.asarray, _simulate(ctx.key, cfg))
    mean_err, rm_err, gd_err, clean = out["mean"], out["rm"], out["gd"], out["rm_clean"]
    metrics: dict = {
        "mean_estimation_final_abs_error": {k: float(e[:, -1].mean()) for k, e in mean_err.items()},
        # With a_k = 1/k the last iterate is exactly the sample mean (up to float32 rounding).
        "max_abs(w_K+1 - sample mean), a_k = 1/k": float(out["to_sample_mean"]),
        "robbins_monro_final_abs_error": {k: float(e[:, -1].mean()) for k, e in rm_err.items()},
        "robbins_monro_noise_free_final_w": float(clean[-1]),
        "gradient_descent_final_distance": {k: float(e[:, -1].mean()) for k, e in gd_err.items()},
    }
    checkpoints = [c for c in (10, 100, 1000, K) if c <= K]
    metrics["gradient_descent_distance_at"] = {
        k: {str(c): float(e[:, c].mean()) for c in checkpoints} for k, e in gd_err.items()}

    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    for i, (label, e) in enumerate(mean_err.items()):
        _band(axes[0], ks, e, label, f"C{i}")
    axes[0].set(xscale="log", yscale="log", xlabel="iteration k", ylabel="|w_k - E[X]|",
                title="Incremental mean estimation")
    for i, (label, e) in enumerate(rm_err.items()):
        _band(axes[1], ks, e, label, f"C{i}")
    axes[1].plot(ks, np.maximum(np.abs(clean - 1.0), 1e-8), "k--", lw=1, label="a_k = 1/k, no noise")
    axes[1].set(xscale="log", yscale="log", xlabel="iteration k", ylabel="|w_k - w*|",
                title=f"Robbins-Monro, g(w) = tanh(w - 1) + {cfg.noise_std:g} eta")
    for i, (label, e) in enumerate(gd_err.items()):
        _band(axes[2], ks, e, label, f"C{i}")
    axes[2].set(xscale="log", yscale="log", xlabel="iteration k", ylabel="||w_k - mean||",
                title=f"SGD / MBGD / BGD, n={cfg.num_samples}")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    rm = metrics["robbins_monro_final_abs_error"]
    gd = metrics["gradient_descent_final_distance"]
    summary = (
        f"With a_k = 1/k the incremental estimate is the sample mean; a constant step keeps fluctuating. "
        f"Robbins-Monro reaches the root of tanh(w - 1) under noise (mean |w - 1| after {K} steps: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in rm.items())
        + "). Gradient descent on the mean: final distance "
        + ", ".join(f"{k}: {v:.3f}" for k, v in gd.items())
        + "; larger batches are less noisy, as in the book's Sec. 6.4 comparison."
    )
    me = metrics["mean_estimation_final_abs_error"]
    const = f"a_k = {cfg.constant_step}"
    to_sample = metrics["max_abs(w_K+1 - sample mean), a_k = 1/k"]
    by_m = sorted(cfg.batch_sizes)
    gd_by_m = [gd[_label(m, cfg.num_samples)] for m in by_m]
    claims = (
        Claim("with a_k = 1/k the incremental estimate w_{K+1} is the sample mean (|difference| < 1e-4) and "
              "approaches E[X] = 5 (mean |w - 5| < 0.1) (Sec. 6.1)",
              holds=to_sample < 1e-4 and me["a_k = 1/k"] < 0.1,
              evidence=f"max |w_K+1 - sample mean| {to_sample:.1e}; mean |w - 5| {me['a_k = 1/k']:.3f} "
                       f"({const}: {me[const]:.3f})"),
        Claim("Robbins-Monro with a_k = 1/k finds the root w* = 1 of tanh(w - 1) under noise (mean |w - 1| < 0.1, "
              "below the constant step's) and, without noise, converges to it (1 < w < 1.01) (Sec. 6.2)",
              holds=rm["a_k = 1/k"] < 0.1 and rm["a_k = 1/k"] < rm[const]
              and 1.0 < metrics["robbins_monro_noise_free_final_w"] < 1.01,
              evidence="mean |w - 1|: " + ", ".join(f"{k} {v:.3f}" for k, v in rm.items())
                       + f"; noise-free w = {metrics['robbins_monro_noise_free_final_w']:.4f}"),
        Claim("BGD, MBGD and SGD converge to the mean, closer the larger the batch: final distance falls as m grows, "
              "BGD's < 1e-4 and SGD's < 1 (Sec. 6.4)",
              holds=all(a > b for a, b in zip(gd_by_m, gd_by_m[1:])) and gd.get("BGD", 0.0) < 1e-4
              and gd.get("SGD", 0.0) < 1.0,
              evidence=", ".join(f"{_label(m, cfg.num_samples)} {v:.2g}" for m, v in zip(by_m, gd_by_m))),
    )
    return ExperimentResult(metrics=metrics, summary=summary, claims=claims)
