"""``grpo-reasoning``: accuracy and response length against GRPO steps from an SFT start, the shape of
DeepSeek-R1-Zero's training curves (DeepSeek-AI 2025, Figures 2 and 3) in miniature.

A small LM is fine-tuned on 2-digit addition to a low accuracy, then trained with GRPO (Shao et al. 2024)
on the exact-match verifier's 0/1 reward. The curves: sampled (temperature 1) and greedy accuracy on a
fixed problem set, the mean response length, and the KL to the SFT reference. The task's answers have a
fixed length, so unlike R1-Zero's the length does not grow: there is no room for longer reasoning here.
"""

from __future__ import annotations

import dataclasses
import shutil

from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.experiments._posttrain_common import CITATIONS, run_config
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.rl.llm.losses import AGGREGATIONS
from jaxlab.rl.llm.posttrain import posttrain
from jaxlab.validation import check_positive


@dataclasses.dataclass(frozen=True)
class GRPOReasoningConfig:
    """Sizes of the GRPO run."""

    num_digits: int = 2
    """Digits per operand of the addition problems."""
    d_model: int = 64
    num_layers: int = 2
    sft_steps: int = 400
    """SFT steps of the warm start (a low accuracy leaves room for RL)."""
    steps: int = 300
    """GRPO steps."""
    batch_size: int = 32
    """Prompts per step."""
    group_size: int = 8
    """Samples per prompt (GRPO's group)."""
    lr: float = 5e-4
    beta: float = 0.04
    aggregation: str = "token-mean"
    eval_every: int = 30
    eval_problems: int = 256
    fast_compile: bool = False
    """Compile under ``FAST_COMPILE`` (``PostTrainConfig.fast_compile``): tests and runs of a few steps only."""

    def __post_init__(self):
        check_positive(self, "num_digits", "d_model", "num_layers", "sft_steps", "steps", "batch_size", "eval_every",
                             "eval_problems", integer=True)
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size!r} must be >= 2")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} must be one of {AGGREGATIONS}")


@register_experiment("grpo-reasoning", description="GRPO from an SFT start: accuracy and length vs RL steps",
                     paper="DeepSeek-AI 2025, DeepSeek-R1 (arXiv:2501.12948), Figures 2-3; Shao et al. 2024 (GRPO)",
                     quick_seconds=35,
                     quick=GRPOReasoningConfig())
def grpo_reasoning(cfg: GRPOReasoningConfig, ctx: RunContext) -> ExperimentResult:
    out = ctx.out_dir / "grpo-reasoning-runs"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never the checkpoints of an older one
    run = posttrain(run_config(cfg, "grpo", seed=ctx.seed, checkpoint_every=max(cfg.steps, cfg.sft_steps)), out)
    points = [{"step": 0, **run["sft"]}] + run["history"]
    steps = [p["step"] for p in points]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].plot(steps, [p["accuracy"] for p in points], "o-", label="sampled (T = 1)")
    axes[0].plot(steps, [p["greedy_accuracy"] for p in points], "s--", label="greedy")
    axes[0].set(xlabel="GRPO step", ylabel="exact-match accuracy", title="accuracy")
    axes[0].legend()
    axes[1].plot(steps, [p["response_length"] for p in points], "o-")
    axes[1].set(xlabel="GRPO step", ylabel="tokens (incl. EOS)", title="mean response length")
    axes[2].plot(steps, [p["kl_to_ref"] for p in points], "o-")
    axes[2].set(xlabel="GRPO step", ylabel="nats per response", title="KL(pi || pi_SFT)")
    fig.suptitle(f"GRPO on {cfg.num_digits}-digit addition, group of {cfg.group_size}")
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)
    start, end = points[0], points[-1]
    metrics = {"steps": steps, "accuracy": [p["accuracy"] for p in points],
               "greedy_accuracy": [p["greedy_accuracy"] for p in points],
               "response_length": [p["response_length"] for p in points],
               "kl_to_ref": [p["kl_to_ref"] for p in points], "sft_accuracy": start["accuracy"],
               "final_accuracy": end["accuracy"], "seconds": run["seconds"], "num_params": run["num_params"]}
    comparisons = (
        Comparison("sampled accuracy: SFT start -> after GRPO", f"{start['accuracy']:.3f} -> {end['accuracy']:.3f}",
                   None, "DeepSeek-R1-Zero's AIME pass@1 rose from 15.6% to 71.0% (DeepSeek-AI 2025, section 2.2.4); "
                   "a different task and scale, not comparable"),
        Comparison("mean response length (tokens)", round(end["response_length"], 3), None, CITATIONS),
    )
    summary = (f"GRPO from an SFT start on {cfg.num_digits}-digit addition moves the verifier's sampled accuracy "
               f"from {start['accuracy']:.3f} to {end['accuracy']:.3f} (greedy {start['greedy_accuracy']:.3f} -> "
               f"{end['greedy_accuracy']:.3f}) in {cfg.steps} steps, at a KL of {end['kl_to_ref']:.2f} nats to the "
               f"reference. Answers have a fixed length here, so the response length stays flat instead of "
               f"growing as in DeepSeek-R1-Zero's Figure 3.")
    gain = end["accuracy"] - start["accuracy"]
    claims = (Claim(claim="GRPO raises sampled accuracy by >= 0.2 absolute over the RL steps (final minus the SFT "
                          "start at RL step 0; Shao et al. 2024; DeepSeek-AI 2025)",
                    holds=bool(gain >= 0.2),
                    evidence=f"{start['accuracy']:.3f} -> {end['accuracy']:.3f} ({gain:+.3f}) on "
                             f"{cfg.eval_problems} eval problems"),)
    metrics["eval_problems"] = cfg.eval_problems
    return ExperimentResult(metrics=metrics, comparisons=comparisons, summary=summary, claims=claims)
