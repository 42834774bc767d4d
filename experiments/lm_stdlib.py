"""``lm-stdlib``: validation bits per byte against training steps for two token mixers on the default
corpus (the Python standard library's ``.py`` files), trained by the same driver as ``jaxlab train lm``.

Each mixer gets the same data order, schedule and width; the curves compare how fast attention and
a recurrent mixer compress source code, a small-scale version of the language-modelling comparisons of
the Mamba and Mamba-2 papers (which train far larger models on natural language).
"""

from __future__ import annotations

import dataclasses
import math
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxlab.context import RunContext  # noqa: E402
from jaxlab.metrics import MetricsWriter  # noqa: E402
from jaxlab.models.lm import MIXERS  # noqa: E402
from jaxlab.models.lm_training import LMTrainConfig, train_lm  # noqa: E402
from jaxlab.registry import Comparison, ExperimentResult, register_experiment  # noqa: E402


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

    def train_config(self, mixer: str, seed: int) -> LMTrainConfig:
        return LMTrainConfig(mixer=mixer, steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
                             d_model=self.d_model, num_layers=self.num_layers, num_heads=self.num_heads, lr=self.lr,
                             warmup_steps=self.warmup_steps, eval_every=self.eval_every,
                             eval_batches=self.eval_batches, sample_every=0, log_every=self.eval_every,
                             checkpoint_every=self.steps, max_documents=self.max_documents, seed=seed,
                             resume=False, progress=False)


@register_experiment("lm-stdlib", description="validation bits/byte vs steps, attention vs Mamba-2, Python stdlib",
                     paper="Gu & Dao 2023 (Mamba) / Dao & Gu 2024 (Mamba-2): LM quality of SSMs vs attention, "
                           "small-scale byte-level analogue",
                     quick=LMStdlibConfig(steps=40, batch_size=8, seq_len=128, d_model=64, num_layers=2,
                                          lr=3e-3, warmup_steps=10, eval_every=20, eval_batches=2,
                                          max_documents=300))
def lm_stdlib(cfg: LMStdlibConfig, ctx: RunContext) -> ExperimentResult:
    curves, summaries = {}, {}
    for mixer in ctx.progress(cfg.mixers, desc="mixers"):
        run_dir = ctx.out_dir / "lm-stdlib-runs" / mixer
        shutil.rmtree(run_dir, ignore_errors=True)
        summaries[mixer] = train_lm(cfg.train_config(mixer, ctx.seed), run_dir)
        records = MetricsWriter.read(run_dir / "metrics.jsonl")
        curves[mixer] = [(r["step"], r["eval/bpb"]) for r in records if "eval/bpb" in r]
        ctx.log(f"{mixer}: final validation {summaries[mixer]['val_bpb']:.3f} bits/byte")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mixer, curve in curves.items():
        ax.plot(*zip(*curve), marker="o", label=mixer)
    ax.set(xlabel="step", ylabel="validation bits per byte", title="byte-level LM on the Python stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)
    plt.close(fig)

    final = {m: s["val_bpb"] for m, s in summaries.items()}
    comparisons = tuple(Comparison(quantity=f"{m} validation bits/byte after {cfg.steps} steps", ours=round(b, 4),
                                   published=None, source="no published number for this corpus")
                        for m, b in final.items())
    best = min(final, key=final.get)
    summary = (f"Validation bits per byte after {cfg.steps} steps ({cfg.num_layers} layers, d={cfg.d_model}, "
               f"{cfg.batch_size}x{cfg.seq_len} bytes per step): " + ", ".join(f"{m} {b:.3f}" for m, b in final.items())
               + f"; {best} is ahead (uniform bytes would be {math.log2(256):.0f} bits). "
               + f"Packing kept {next(iter(summaries.values()))['packing_efficiency']:.2%} of token slots real."
               + (" A quick run is far too short to separate the mixers." if ctx.quick else ""))
    return ExperimentResult(metrics={"curves": curves, "final_bpb": final, "summaries": summaries,
                                     "config": dataclasses.asdict(cfg)}, comparisons=comparisons, summary=summary)
