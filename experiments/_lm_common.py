"""Shared helpers of the LM experiments: train an :class:`LM` on a synthetic task in one compiled program.

``train_and_evaluate`` draws a fresh batch every step from ``task(key) -> {"inputs", "targets", "mask"}``
(see :mod:`jaxlab.models.synthetic`), trains with AdamW under warmup + cosine decay inside one
``lax.scan``, then scores accuracy on fresh batches (optionally of other lengths, for extrapolation).
One compile per model configuration; the whole run is a pure function of the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxlab.models.lm import LM, LMConfig, weight_decay_mask
from jaxlab.xla_options import FAST_COMPILE


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Optimisation of a synthetic-task run."""

    steps: int
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1

    def optimizer(self) -> optax.GradientTransformation:
        warmup = min(self.warmup, max(self.steps - 1, 0))
        schedule = optax.warmup_cosine_decay_schedule(0.0, self.lr, warmup, max(self.steps, warmup + 1),
                                                      end_value=0.1 * self.lr)
        return optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=self.weight_decay,
                                       mask=weight_decay_mask))


def masked_loss(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy, accuracy) over the masked positions; logits [B, L, V] aligned with targets."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, L, V]
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]  # [B, L]
    mask = batch["mask"].astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(nll * mask) / count, jnp.sum(correct * mask) / count


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
            return None, masked_loss(logits, batch)[1]

        return jnp.mean(jax.lax.scan(one, None, jax.random.split(k, eval_batches))[1])

    def run(key):
        k_init, k_data, k_eval = jax.random.split(key, 3)
        params = model.init(k_init, task(k_data)["inputs"])["params"]

        def step(carry, i):
            params, opt_state = carry
            batch = task(jax.random.fold_in(k_data, i))

            def loss_fn(p):
                logits, aux = model.apply({"params": p}, batch["inputs"])
                return masked_loss(logits, batch)[0] + aux["aux_loss"]

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(spec.steps))
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
