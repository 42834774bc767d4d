"""Shared helpers of the LM experiments: train an :class:`LM` on a synthetic task in one compiled program.

``train_and_evaluate`` draws a fresh batch every step from ``task(key) -> {"inputs", "targets", "mask"}``
(see :mod:`jaxlab.models.synthetic`), trains with the spine's step (:func:`jaxlab.train_state.make_train_step`
on the LM's :func:`~jaxlab.models.lm.next_token_loss`, AdamW from :func:`jaxlab.optim.make_optimizer` under
warmup + cosine decay) inside one ``lax.scan``, then scores accuracy on fresh batches (optionally of other
lengths, for extrapolation). One compile per model configuration; the whole run is a pure function of the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxlab.models.lm import LM, NO_DECAY_PARAMS, LMConfig, init_params, next_token_loss
from jaxlab.optim import OptimizerConfig, make_optimizer
from jaxlab.train_state import create_train_state, make_train_step
from jaxlab.xla_options import FAST_COMPILE


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Optimisation of a synthetic-task run."""

    steps: int
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW (beta2 0.98) after clipping at 1, warmup then cosine decay to a tenth of ``lr``."""
        warmup = min(self.warmup, max(self.steps - 1, 0))
        cfg = OptimizerConfig(lr=self.lr, warmup_steps=warmup, decay_steps=max(self.steps, warmup + 1),
                              min_lr_ratio=0.1, b2=0.98, weight_decay=self.weight_decay, clip_norm=1.0)
        return make_optimizer(cfg, no_decay=NO_DECAY_PARAMS)


def train_and_evaluate(cfg: LMConfig, task: Callable[[jax.Array], dict], spec: TrainSpec, key: jax.Array, *,
                       eval_tasks: Sequence[Callable[[jax.Array], dict]] = (), eval_batches: int = 4,
                       fast_compile: bool | None = None) -> dict:
    """Train on ``task`` for ``spec.steps`` steps, then evaluate on ``task`` and each of ``eval_tasks``.

    Returns ``{"losses": [steps], "accuracy": float, "eval_accuracy": [len(eval_tasks)]}`` (host values).
    ``fast_compile`` skips XLA's backend optimisations (default: only for runs under 100 steps, where the
    compile time they cost is not won back: on CPU they roughly halve the step time).
    """
    model = LM(cfg)
    tx = spec.optimizer()

    def accuracy(params, make, k):
        def one(_, kk):
            batch = make(kk)
            logits, _ = model.apply({"params": params}, batch["inputs"])
            return None, next_token_loss(logits, batch["targets"], batch["mask"])[1]["accuracy"]

        return jnp.mean(jax.lax.scan(one, None, jax.random.split(k, eval_batches))[1])

    def loss_fn(params, batch, key):
        logits, aux = model.apply({"params": params}, batch["inputs"])
        ce, metrics = next_token_loss(logits, batch["targets"], batch["mask"])
        return ce + aux["aux_loss"], metrics

    train_step = make_train_step(loss_fn, tx)

    def run(key):
        k_init, k_data, k_eval = jax.random.split(key, 3)
        params = init_params(model, k_init, task(k_data)["inputs"])

        def step(state, i):
            state, metrics = train_step(state, task(jax.random.fold_in(k_data, i)), None)
            return state, metrics["loss"]

        state, losses = jax.lax.scan(step, create_train_state(params, tx, k_data), jnp.arange(spec.steps))
        params = state.params
        acc = accuracy(params, task, k_eval)
        extra = jnp.stack([accuracy(params, make, jax.random.fold_in(k_eval, j + 1))
                           for j, make in enumerate(eval_tasks)]) if eval_tasks else jnp.zeros(0)
        return losses, acc, extra

    if fast_compile is None:
        fast_compile = spec.steps < 100
    compiled = jax.jit(run, compiler_options=FAST_COMPILE if fast_compile else None)
    losses, acc, extra = jax.device_get(compiled(key))
    return {"losses": losses.tolist(), "accuracy": float(acc), "eval_accuracy": [float(a) for a in extra]}


def synthetic_config(mixer: str, d_model: int, vocab_size: int, max_len: int, num_layers: int = 2,
                     **overrides) -> LMConfig:
    """The small LMs of the synthetic tasks: heads of width 32 (at least one), SSM state 16, chunks <= L."""
    base = dict(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=max(1, d_model // 32),
                mixer=mixer, max_len=max_len, attention_impl="xla", d_state=16, ssm_head_dim=16,
                chunk_size=min(64, max_len), gau_qk_dim=min(64, d_model))
    base.update(overrides)
    return LMConfig(**base)


def plot_lines(ax, xs, series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str, title: str,
               logx: bool = False) -> None:
    """One marked line per series on ``ax``."""
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
