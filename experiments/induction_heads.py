"""``induction-heads``: the Mamba paper's induction heads task with length extrapolation (Gu & Dao 2023,
§4.1.2, Table 2 / Figure 3).

Models are trained on sequences of one length (:func:`jaxlab.models.synthetic.induction_heads`:
recall the token that followed the trigger) and tested on longer ones. The paper's shape: Mamba
keeps solving the task far beyond its training length, attention with rotary positions fails once
test lengths pass the training length, and time-invariant SSMs do not learn it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.experiments._lm_common import TrainSpec, plot_lines, synthetic_config, train_and_evaluate
from jaxlab.models.lm import MIXERS
from jaxlab.models.synthetic import induction_heads
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.validation import check_positive


@dataclasses.dataclass(frozen=True)
class InductionHeadsConfig:
    """Sizes of the induction heads extrapolation."""

    mixers: tuple[str, ...] = ("s4d", "mamba", "attention")
    train_len: int = 256
    """Training sequence length (as in the paper)."""
    test_lens: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    """Test sequence lengths (the paper goes to 2^20)."""
    vocab_size: int = 16
    """As in the paper."""
    d_model: int = 64
    """Width of every mixer. The quick size uses 96: at 64 (train length 64, 800 steps) Mamba reached 0.86, 0.89
    and 0.80 at L=512 over seeds 0-2 on one core, at 96 1.00, 0.90 and 1.00."""
    num_layers: int = 2
    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    eval_batches: int = 4

    def __post_init__(self):
        if not self.mixers or any(m not in MIXERS for m in self.mixers):
            raise ValueError(f"mixers={self.mixers} must be a non-empty subset of {MIXERS}")
        if self.train_len < 4 or not self.test_lens or min(self.test_lens) < 4:
            raise ValueError(f"train_len={self.train_len} and test_lens={self.test_lens} must be >= 4")
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 3")
        check_positive(self, "d_model", "num_layers", "steps", "batch_size", "eval_batches")


@register_experiment("induction-heads", description="induction heads: train at one length, test longer (S4D/Mamba/attention)",
                     paper="Gu & Dao 2023, Mamba: Linear-Time Sequence Modeling with Selective State Spaces, "
                           "Section 4.1.2, Table 2",
                     full_needs_gpu=True,
                     quick_seconds=138,
                     quick=InductionHeadsConfig(mixers=("mamba", "attention"), train_len=64, test_lens=(64, 128, 256, 512),
                                                d_model=96, steps=800, batch_size=32, lr=3e-3, eval_batches=16))
def induction_heads_experiment(cfg: InductionHeadsConfig, ctx: RunContext) -> ExperimentResult:
    make = lambda L: functools.partial(induction_heads, batch=cfg.batch_size, seq_len=L,  # noqa: E731
                                       vocab_size=cfg.vocab_size)
    max_len = max(cfg.train_len, *cfg.test_lens)
    accuracy = {}
    for i, mixer in enumerate(ctx.progress(cfg.mixers, desc="mixers")):
        model = synthetic_config(mixer, cfg.d_model, cfg.vocab_size, max_len, cfg.num_layers,
                                 chunk_size=min(64, cfg.train_len))
        r = train_and_evaluate(model, make(cfg.train_len), TrainSpec(cfg.steps, lr=cfg.lr),
                               jax.random.fold_in(ctx.key, i), eval_tasks=[make(L) for L in cfg.test_lens],
                               eval_batches=cfg.eval_batches)
        accuracy[mixer] = dict(zip(map(str, cfg.test_lens), r["eval_accuracy"]))
        ctx.log(f"{mixer}: " + ", ".join(f"L={L} {a:.2f}" for L, a in accuracy[mixer].items()))

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    plot_lines(ax, cfg.test_lens, {m: list(a.values()) for m, a in accuracy.items()}, xlabel="test sequence length",
               ylabel="accuracy", title=f"induction heads, trained at L={cfg.train_len}", logx=True)
    ax.axvline(cfg.train_len, color="gray", ls="--")
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    longest = str(max(cfg.test_lens))
    comparisons = tuple(Comparison(quantity=f"{m} accuracy at L={longest} (trained at {cfg.train_len})",
                                   ours=round(a[longest], 4), published=None,
                                   source="Mamba Table 2 (shape: Mamba extrapolates, attention does not)")
                        for m, a in accuracy.items())
    chance = 1 / (cfg.vocab_size - 1)
    far = [L for L in cfg.test_lens if L >= 8 * cfg.train_len]
    checked = sorted({cfg.train_len, *far} & set(cfg.test_lens))
    beyond = [L for L in cfg.test_lens if L > 2 * cfg.train_len]
    mamba, attn = accuracy.get("mamba", {}), accuracy.get("attention", {})
    claims = (
        Claim(claim=f"Mamba accuracy >= 0.9 at the training length and at >= 8x the training length "
                    f"(L={cfg.train_len} and L >= {8 * cfg.train_len})",
              holds=bool(mamba and cfg.train_len in cfg.test_lens and far
                         and all(mamba[str(L)] >= 0.9 for L in checked)),
              evidence=(", ".join(f"L={L}: {mamba[str(L)]:.3f}" for L in checked) if mamba else "mamba not run")
              + ("" if far else f"; no test length >= {8 * cfg.train_len}")),
        Claim(claim=f"attention accuracy < 0.5 at every test length beyond 2x the training length "
                    f"(L > {2 * cfg.train_len})",
              holds=bool(attn and beyond and all(attn[str(L)] < 0.5 for L in beyond)),
              evidence=(", ".join(f"L={L}: {attn[str(L)]:.3f}" for L in beyond) if attn else "attention not run")
              + ("" if beyond else f"; no test length > {2 * cfg.train_len}")))
    summary = (f"Accuracy at the training length {cfg.train_len} and at {longest} (chance {chance:.2f}): "
               + ", ".join(f"{m} {a.get(str(cfg.train_len), float('nan')):.2f} -> {a[longest]:.2f}"
                           for m, a in accuracy.items()) + ". "
               "The paper's shape is Mamba extrapolating far past the training length while attention (here with "
               "rotary positions, as in the paper's baselines) fails beyond it.")
    return ExperimentResult(metrics={"accuracy": accuracy, "chance": chance, "config": dataclasses.asdict(cfg)},
                            comparisons=comparisons, summary=summary, claims=claims)
