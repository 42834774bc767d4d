"""``mqar``: multi-query associative recall accuracy against model width (Arora et al. 2023, "Zoology", Fig. 2).

Two-layer LMs with each token mixer are trained on fresh MQAR batches (the Zoology generator,
:func:`jaxlab.models.synthetic.mqar`) at a few sequence lengths, with the number of key-value pairs
growing with the length, and scored on held-out batches. As in Zoology, every point is the best over a
small learning-rate sweep: recall is learned through a plateau at chance among the K values in context
(loss ln K) followed by a sudden drop when the induction circuit forms, and how soon that happens
depends strongly on the learning rate (2-layer attention, d=64, L=64, K=4: still at 0.34 after 3000 steps
at 1e-3, past the drop by step 1500 at 1e-2). The published shape: attention solves MQAR
at every width, while gated-convolution and recurrent models (GAU, linear attention, Mamba, Mamba-2)
need a width that grows with the number of key-value pairs to fit them in their fixed-size state.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.experiments._lm_common import TrainSpec, plot_lines, synthetic_config, train_and_evaluate
from jaxlab.models.lm import MIXERS
from jaxlab.models.synthetic import mqar
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.validation import check_positive


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """Sizes of the MQAR sweep."""

    mixers: tuple[str, ...] = ("attention", "linear", "gau", "mamba", "mamba2")
    """Token mixers compared."""
    widths: tuple[int, ...] = (64, 128, 256, 512)
    """Model widths d_model (Zoology's; at d=32 a single attention head of width 32 was still on the plateau
    after 3000 steps at lr 1e-2, L=64, K=4)."""
    seq_lens: tuple[int, ...] = (64, 128, 256)
    """Sequence lengths (one panel each)."""
    kv_pairs: tuple[int, ...] = (4, 8, 16)
    """Key-value pairs per sequence, one per length (at most seq_len / 4)."""
    vocab_size: int = 256
    """Vocabulary: keys from the lower half, values from the upper half (Zoology uses 8192). The noise
    tokens between queries are drawn from the whole vocabulary, so a small one makes the task ambiguous:
    with 64 tokens and L=64 a queried key often also appears as noise before its query."""
    num_layers: int = 2
    steps: int = 3000
    batch_size: int = 64
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    """Peak learning rates swept per point; the best accuracy is reported (Zoology's protocol)."""
    eval_batches: int = 8

    def __post_init__(self):
        if not self.mixers or any(m not in MIXERS for m in self.mixers):
            raise ValueError(f"mixers={self.mixers} must be a non-empty subset of {MIXERS}")
        if not self.widths or min(self.widths) < 16:
            raise ValueError(f"widths={self.widths} must be non-empty and >= 16")
        if len(self.kv_pairs) != len(self.seq_lens) or not self.seq_lens:
            raise ValueError(f"kv_pairs={self.kv_pairs} needs one entry per length in seq_lens={self.seq_lens}")
        for L, K in zip(self.seq_lens, self.kv_pairs):
            if K < 1 or L < 4 * K:
                raise ValueError(f"kv_pairs={K} must be in [1, seq_len / 4] for seq_len={L}")
            if self.vocab_size // 2 - 1 < K:
                raise ValueError(f"vocab_size={self.vocab_size} has too few keys for kv_pairs={K}")
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"lrs={self.lrs} must be a non-empty tuple of positive learning rates")
        check_positive(self, "num_layers", "steps", "batch_size", "eval_batches")


@register_experiment("mqar", description="MQAR accuracy vs width: attention, linear attention, GAU, Mamba, Mamba-2",
                     paper="Arora et al. 2023, Zoology: Measuring and Improving Recall in Efficient LMs, Figure 2",
                     full_needs_gpu=True,
                     quick=MQARConfig(mixers=("attention", "mamba2"), widths=(64, 128), seq_lens=(64,), kv_pairs=(4,),
                                      vocab_size=256, steps=300, batch_size=16, lrs=(1e-2,), eval_batches=2))
def mqar_experiment(cfg: MQARConfig, ctx: RunContext) -> ExperimentResult:
    accuracy: dict[str, dict[str, dict[str, float]]] = {m: {} for m in cfg.mixers}  # best over lrs
    best_lr: dict[str, dict[str, dict[str, float]]] = {m: {} for m in cfg.mixers}
    by_lr: dict[str, dict[str, dict[str, dict[str, float]]]] = {m: {} for m in cfg.mixers}
    runs = [(m, L, K, d, lr) for m in cfg.mixers for L, K in zip(cfg.seq_lens, cfg.kv_pairs) for d in cfg.widths
            for lr in cfg.lrs]
    for i, (mixer, L, K, d, lr) in enumerate(ctx.progress(runs, desc="runs")):
        task = functools.partial(mqar, batch=cfg.batch_size, seq_len=L, num_kv_pairs=K, vocab_size=cfg.vocab_size)
        model = synthetic_config(mixer, d, cfg.vocab_size, L, cfg.num_layers)
        acc = train_and_evaluate(model, task, TrainSpec(cfg.steps, lr=lr), jax.random.fold_in(ctx.key, i),
                                 eval_batches=cfg.eval_batches)["accuracy"]
        by_lr[mixer].setdefault(str(L), {}).setdefault(str(d), {})[f"{lr:g}"] = acc
        if acc >= accuracy[mixer].get(str(L), {}).get(str(d), -1.0):
            accuracy[mixer].setdefault(str(L), {})[str(d)] = acc
            best_lr[mixer].setdefault(str(L), {})[str(d)] = lr
        ctx.log(f"{mixer} L={L} K={K} d={d} lr={lr:g}: accuracy {acc:.3f}")

    fig = Figure(figsize=(4.5 * len(cfg.seq_lens), 3.6))
    axes = fig.subplots(1, len(cfg.seq_lens), squeeze=False)
    for ax, L, K in zip(axes[0], cfg.seq_lens, cfg.kv_pairs):
        plot_lines(ax, cfg.widths, {m: [accuracy[m][str(L)][str(d)] for d in cfg.widths] for m in cfg.mixers},
                   xlabel="model width d_model", ylabel="MQAR accuracy", title=f"L={L}, {K} key-value pairs",
                   logx=True)
        ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    smallest = {m: min(accuracy[m][str(L)][str(cfg.widths[0])] for L in cfg.seq_lens) for m in cfg.mixers}
    widest = {m: min(accuracy[m][str(L)][str(cfg.widths[-1])] for L in cfg.seq_lens) for m in cfg.mixers}
    comparisons = tuple(Comparison(quantity=f"{m}: worst accuracy over lengths at d={cfg.widths[0]} / d={cfg.widths[-1]}",
                                   ours=f"{smallest[m]:.3f} / {widest[m]:.3f}", published=None,
                                   source="Zoology Fig. 2 (shape only: attention near 1.0 at every width)")
                        for m in cfg.mixers)
    chance = 2 / cfg.vocab_size
    d0, d1 = cfg.widths[0], cfg.widths[-1]
    fixed = [m for m in cfg.mixers if m != "attention"]
    attn = {d: min(accuracy["attention"][str(L)][str(d)] for L in cfg.seq_lens)
            for d in cfg.widths} if "attention" in cfg.mixers else {}
    claims = (
        Claim(claim="attention MQAR accuracy >= 0.9 at every width",
              holds=bool(attn and min(attn.values()) >= 0.9),
              evidence=", ".join(f"d={d}: {a:.3f}" for d, a in attn.items()) or "attention not run"),
        Claim(claim=f"at the smallest width (d={d0}) every fixed-state mixer is below attention by >= 0.2",
              holds=bool(attn and fixed and all(attn[d0] - smallest[m] >= 0.2 for m in fixed)),
              evidence=(f"attention {attn[d0]:.3f}; " if attn else "attention not run; ")
              + (", ".join(f"{m} {smallest[m]:.3f}" for m in fixed) or "no fixed-state mixer run")),
        Claim(claim=f"each fixed-state mixer's accuracy rises with width (d={d0} -> d={d1})",
              holds=bool(fixed and d1 > d0 and all(widest[m] > smallest[m] for m in fixed)),
              evidence=", ".join(f"{m} {smallest[m]:.3f} -> {widest[m]:.3f}" for m in fixed)
              or "no fixed-state mixer run"),
    )
    best = max(cfg.mixers, key=lambda m: smallest[m])
    lrs = ", ".join(f"{lr:g}" for lr in cfg.lrs)
    sweep = f"best of learning rates {lrs}" if len(cfg.lrs) > 1 else f"lr {lrs}"
    summary = (f"MQAR accuracy of 2-layer LMs after {cfg.steps} steps ({sweep}; {len(runs)} runs; chance is about "
               f"{chance:.3f}). "
               f"At the smallest width ({d0}) the best mixer is **{best}** "
               f"({smallest[best]:.2f}); " + ", ".join(f"{m} {smallest[m]:.2f}" for m in cfg.mixers) + "; at the "
               f"widest ({d1}): " + ", ".join(f"{m} {widest[m]:.2f}" for m in cfg.mixers) + ". "
               "Zoology's shape is attention solving MQAR at every width while the fixed-state mixers need width "
               "growing with the number of key-value pairs."
               + (f" Attention is still on the plateau at accuracy about 1/K, where it returns one of the K values "
                  f"of the context but not the one bound to the queried key: the induction circuit that binds them "
                  f"forms late. Measured on 2 CPU cores at L=64, K=4: d=64 (batch 16, lr 3e-3) stays at 0.25 through "
                  f"3000 steps (also with 4 heads, or batch 64 for 600 steps), and d=128 (batch 32, lr 1e-3) reaches "
                  f"0.63 after 1500 steps (90 s), still rising. Zoology trains 64 epochs of 100,000 sequences; runs "
                  f"of that length per point do not fit this size's time budget, so the claims fail here."
                  if attn and min(attn.values()) < 0.5 else ""))
    return ExperimentResult(metrics={"accuracy": accuracy, "best_lr": best_lr, "accuracy_by_lr": by_lr,
                                     "config": dataclasses.asdict(cfg), "chance": chance},
                            comparisons=comparisons, summary=summary, claims=claims)
