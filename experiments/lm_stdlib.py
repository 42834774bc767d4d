"""``lm-stdlib``: validation bits per byte against training steps for two token mixers on the default
corpus (the Python standard library's ``.py`` files), trained by the same driver as ``jaxlab train lm``.

Each mixer gets the same data order, schedule and width; the curves compare how fast attention and
a recurrent mixer compress source code, a small-scale version of the language-modelling comparisons of
the Mamba and Mamba-2 papers (which train far larger models on natural language).
"""

from __future__ import annotations

import dataclasses
import math

from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.experiments._stdlib_runs import eval_curve, train_fresh
from jaxlab.models.lm import MIXERS
from jaxlab.models.lm_training import LMTrainConfig
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment

LEARNS_BPB = 3.0
"""A mixer "learns" when its validation bits per byte fall below this (uniform bytes: 8; byte unigrams of
Python source: about 4.5-5)."""
MATCH_TOLERANCE = 0.05
"""Mamba-2 matches attention when its final bits per byte are within this fraction (or better)."""


@dataclasses.dataclass(frozen=True)
class LMStdlibConfig:
    """Sizes of the two-mixer LM comparison."""

    mixers: tuple[str, ...] = ("attention", "mamba2")
    steps: int = 3000
    batch_size: int = 16
    seq_len: int = 512
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    lr: float = 2e-3
    warmup_steps: int = 200
    eval_every: int = 250
    eval_batches: int = 8
    max_documents: int | None = None
    """Use a deterministic subset of the stdlib files (None: all)."""

    def __post_init__(self):
        if not self.mixers or any(m not in MIXERS for m in self.mixers):
            raise ValueError(f"mixers={self.mixers} must be a non-empty subset of {MIXERS}")
        if self.eval_every > self.steps:
            raise ValueError(f"eval_every={self.eval_every} must be <= steps={self.steps}")
        self.train_config(self.mixers[0], seed=0)  # LMTrainConfig validates the sizes and the optimiser fields

    def train_config(self, mixer: str, seed: int) -> LMTrainConfig:
        """One device (``mesh="data=1"``) whatever the machine has, so every mixer's run is the same program."""
        return LMTrainConfig(mesh="data=1", mixer=mixer, steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
                             d_model=self.d_model, num_layers=self.num_layers, num_heads=self.num_heads, lr=self.lr,
                             warmup_steps=self.warmup_steps, eval_every=self.eval_every,
                             eval_batches=self.eval_batches, sample_every=0, log_every=self.eval_every,
                             checkpoint_every=self.steps, max_documents=self.max_documents, seed=seed,
                             resume=False, progress=False)


@register_experiment("lm-stdlib", description="validation bits/byte vs steps, attention vs Mamba-2, Python stdlib",
                     paper="Gu & Dao 2023 (Mamba) / Dao & Gu 2024 (Mamba-2): LM quality of SSMs vs attention, "
                           "small-scale byte-level analogue",
                     full_needs_gpu=True,
                     quick_seconds=52,
                     quick=LMStdlibConfig(steps=500, batch_size=16, seq_len=128, d_model=64, num_layers=2,
                                          lr=5e-3, warmup_steps=50, eval_every=100, eval_batches=4,
                                          max_documents=None))
def lm_stdlib(cfg: LMStdlibConfig, ctx: RunContext) -> ExperimentResult:
    curves, summaries = {}, {}
    for mixer in ctx.progress(cfg.mixers, desc="mixers"):
        summaries[mixer], records = train_fresh(cfg.train_config(mixer, ctx.seed),
                                                ctx.out_dir / "lm-stdlib-runs" / mixer)
        curves[mixer] = eval_curve(records, "eval/bpb")
        ctx.log(f"{mixer}: final validation {summaries[mixer]['val_bpb']:.3f} bits/byte")

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for mixer, curve in curves.items():
        ax.plot(*zip(*curve), marker="o", label=mixer)
    ax.set(xlabel="step", ylabel="validation bits per byte", title="byte-level LM on the Python stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    final = {m: s["val_bpb"] for m, s in summaries.items()}
    params = {m: s["num_params"] for m, s in summaries.items()}
    comparisons = tuple(Comparison(quantity=f"{m} validation bits/byte after {cfg.steps} steps ({params[m]:,} "
                                            "parameters)", ours=round(b, 4),
                                   published=None, source="no published number for this corpus")
                        for m, b in final.items())
    claims = [Claim(claim=f"every mixer learns: validation bits per byte below {LEARNS_BPB:g}",
                    holds=all(b < LEARNS_BPB for b in final.values()),
                    evidence=", ".join(f"{m} {b:.3f}" for m, b in final.items()) + f" after {cfg.steps} steps")]
    if "attention" in final and "mamba2" in final:
        ratio = final["mamba2"] / final["attention"]
        claims.append(Claim(
            claim=f"Mamba-2 matches attention at comparable parameters: final bits per byte within "
                  f"{MATCH_TOLERANCE:.0%} of attention's, or better",
            holds=abs(ratio - 1) <= MATCH_TOLERANCE or ratio < 1,
            evidence=(f"mamba2 {final['mamba2']:.3f} / attention {final['attention']:.3f} = {ratio:.3f}; parameters "
                      f"{params['mamba2']:,} / {params['attention']:,} = "
                      f"{params['mamba2'] / params['attention']:.2f}")))
    best = min(final, key=final.get)
    summary = (f"Validation bits per byte after {cfg.steps} steps ({cfg.num_layers} layers, d={cfg.d_model}, "
               f"{cfg.batch_size}x{cfg.seq_len} bytes per step): "
               + ", ".join(f"{m} {b:.3f} ({params[m]:,} parameters)" for m, b in final.items())
               + f"; {best} is ahead (uniform bytes would be {math.log2(256):.0f} bits). "
               + "Same width means comparable, not equal, parameter counts: a Mamba-2 block's projections are larger "
                 "than attention's. "
               + f"Packing kept {next(iter(summaries.values()))['packing_efficiency']:.2%} of token slots real."
               + (" Still above " + f"{LEARNS_BPB:g} bits per byte after {cfg.steps} steps: "
                  + ", ".join(m for m, b in final.items() if b >= LEARNS_BPB)
                  + (" (the curves are still falling: the quick run's steps are what 2 CPU cores allow in about a "
                     "minute per mixer)." if ctx.quick else " (the curves are still falling; a longer run is needed).")
                  if any(b >= LEARNS_BPB for b in final.values()) else ""))
    return ExperimentResult(metrics={"curves": curves, "final_bpb": final, "num_params": params,
                                     "summaries": summaries, "config": dataclasses.asdict(cfg)},
                            comparisons=comparisons, summary=summary, claims=tuple(claims))
