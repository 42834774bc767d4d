"""``r1-zero``: RL straight from a base model, DeepSeek-R1-Zero's setting (DeepSeek-AI 2025, section 2.2) in
miniature: accuracy climbs while the responses grow longer (its Figures 2 and 3).

1. **Base model.** A small LM is pretrained (``pretrain/``) on the ``think-add`` task's base corpus
   (:mod:`jaxlab.rl.llm.base_corpus`): single-digit addition facts, problems followed by the first column
   steps of their worked solution and then cut off, worked solutions without their question, the tag format
   on unrelated content, and problems answered at once without steps by a wrong carry-less guess. No document
   holds a problem in the prompt's format together with its answer. The base model so has the pieces (the
   column steps, the ``<think>``/``<answer>`` format) and a first habit of answering directly.
2. **RL.** GRPO (Shao et al. 2024) from the base model with no SFT (``sft_steps=0``; the base model is also
   the KL reference), on R1-Zero's template ``a+b=<think>`` with rule-based rewards: exact match inside the
   answer tags, plus ``format_weight`` for a well-formed response. Per-token loss aggregation (``token-mean``,
   DAPO's): GRPO's per-sequence mean would weigh a long wrong response's tokens less and so lengthen responses
   by itself (Liu et al. 2025, Dr. GRPO), which is not the effect measured here.

The curves, on a fixed problem set every ``eval_every`` steps: sampled (temperature 1) and greedy accuracy,
the mean response length (tokens, EOS included) and the share of responses that write column steps inside
``<think>``. Every step's first rollouts are kept as text in ``r1-zero-runs/grpo/rollouts.jsonl``.

What grows here is the choice to think: a worked solution has a fixed number of steps for a given number of
digits, so the length rises from the base model's mix of direct answers and worked ones to worked ones, not
to ever longer chains as in R1-Zero's thousands of tokens.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.experiments._posttrain_common import run_config
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.rl.llm.posttrain import posttrain
from jaxlab.validation import check_positive

PAPER = "DeepSeek-AI 2025, DeepSeek-R1 (arXiv:2501.12948), section 2.2, Figures 2-3"


@dataclasses.dataclass(frozen=True)
class R1ZeroConfig:
    """Sizes of the base model's pretraining and of the RL run."""

    num_digits: int = 2
    """Digits per operand of the addition problems."""
    d_model: int = 64
    num_layers: int = 2
    pretrain_steps: int = 1500
    """Steps of the base model's pretraining on the corpus (32 packed rows a step)."""
    steps: int = 200
    """GRPO steps from the base model."""
    batch_size: int = 16
    """Prompts per step."""
    group_size: int = 8
    """Samples per prompt (GRPO's group)."""
    lr: float = 3e-4
    beta: float = 0.04
    """KL coefficient to the base model (the reference)."""
    format_weight: float = 0.1
    """Reward for a well-formed response (tags once, in order, EOS after </answer>), added to the 0/1 accuracy."""
    eval_every: int = 20
    eval_problems: int = 256
    log_rollouts: int = 4
    """Rollouts per step written to rollouts.jsonl."""
    fast_compile: bool = False
    """Compile under ``FAST_COMPILE`` (``PostTrainConfig.fast_compile``): tests and runs of a few steps only."""

    def __post_init__(self):
        check_positive(self, "num_digits", "d_model", "num_layers", "pretrain_steps", "steps", "batch_size",
                       "eval_every", "eval_problems", integer=True)
        check_positive(self, "log_rollouts", minimum=0, integer=True)
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size!r} must be >= 2")
        if self.format_weight < 0:
            raise ValueError(f"format_weight={self.format_weight!r} must be >= 0")


def _rollout_examples(path, count: int = 3) -> dict[str, list[str]]:
    """The first and the last logged step's rollouts (prompt + response text, and whether right)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if not rows:
        return {}
    show = lambda step: [f"{r['prompt']}{r['response']}  [{'right' if r['correct'] else 'wrong'}]"  # noqa: E731
                         for r in rows if r["step"] == step][:count]
    return {"first_step": show(rows[0]["step"]), "last_step": show(rows[-1]["step"])}


@register_experiment("r1-zero", description="RL from a base model: accuracy and response length grow together",
                     paper=PAPER,
                     quick_seconds=56,
                     quick=R1ZeroConfig(pretrain_steps=800, steps=60, eval_every=10, eval_problems=256))
def r1_zero(cfg: R1ZeroConfig, ctx: RunContext) -> ExperimentResult:
    out = ctx.out_dir / "r1-zero-runs"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never the checkpoints of an older one
    run = posttrain(run_config(cfg, "grpo", task="think-add", sft_steps=0, seed=ctx.seed,
                               checkpoint_every=max(cfg.steps, cfg.pretrain_steps)), out)
    points = [{"step": 0, **run["base"]}] + run["history"]
    steps = [p["step"] for p in points]
    series = {name: [p[name] for p in points] for name in
              ("accuracy", "greedy_accuracy", "response_length", "think_steps", "format", "kl_to_ref")}
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].plot(steps, series["accuracy"], "o-", label="sampled (T = 1)")
    axes[0].plot(steps, series["greedy_accuracy"], "s--", label="greedy")
    axes[0].set(xlabel="RL step", ylabel="exact-match accuracy", title="accuracy", ylim=(0, 1))
    axes[0].legend()
    axes[1].plot(steps, series["response_length"], "o-")
    axes[1].set(xlabel="RL step", ylabel="tokens (incl. EOS)", title="mean response length")
    axes[1].set_ylim(bottom=0)
    axes[2].plot(steps, series["think_steps"], "o-", label="writes column steps in <think>")
    axes[2].plot(steps, series["format"], "s--", label="well-formed")
    axes[2].set(xlabel="RL step", ylabel="share of responses", title="thinking", ylim=(0, 1.05))
    axes[2].legend()
    fig.suptitle(f"GRPO from a base model (no SFT) on {cfg.num_digits}-digit addition, R1-Zero's template")
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    base, end = points[0], points[-1]
    gain = end["accuracy"] - base["accuracy"]
    growth = end["response_length"] / base["response_length"]
    examples = _rollout_examples(out / "grpo" / "rollouts.jsonl")
    metrics = {"steps": steps, **series, "base_accuracy": base["accuracy"], "final_accuracy": end["accuracy"],
               "length_growth": growth, "rollout_examples": examples, "eval_problems": cfg.eval_problems,
               "seconds": run["seconds"], "num_params": run["num_params"]}
    comparisons = (
        Comparison("sampled accuracy: base model -> after RL", f"{base['accuracy']:.3f} -> {end['accuracy']:.3f}",
                   "AIME 2024 pass@1 15.6% -> 71.0%", "DeepSeek-AI 2025, section 2.2.4 (another task and scale)"),
        Comparison("mean response length: base -> after RL (tokens)",
                   f"{base['response_length']:.1f} -> {end['response_length']:.1f} ({growth:.2f}x)",
                   "grows steadily over training, to thousands of tokens", "DeepSeek-AI 2025, Figure 3"),
        Comparison("responses writing column steps in <think>",
                   f"{base['think_steps']:.3f} -> {end['think_steps']:.3f}", None, None),
    )
    summary = (f"GRPO from a base model pretrained only on the pieces of {cfg.num_digits}-digit addition (no SFT) "
               f"moves the sampled accuracy from {base['accuracy']:.3f} to {end['accuracy']:.3f} (greedy "
               f"{base['greedy_accuracy']:.3f} -> {end['greedy_accuracy']:.3f}) in {cfg.steps} steps, while the "
               f"mean response grows from {base['response_length']:.1f} to {end['response_length']:.1f} tokens "
               f"({growth:.2f}x) and the share of responses that work the columns inside <think> from "
               f"{base['think_steps']:.2f} to {end['think_steps']:.2f}: the policy learns that thinking first pays.")
    claims = (
        Claim(claim="RL from the base model raises sampled accuracy by >= 0.3 absolute over the base model's pass@1 "
                    "(DeepSeek-AI 2025, section 2.2.4, Figure 2)",
              holds=bool(gain >= 0.3),
              evidence=f"{base['accuracy']:.3f} -> {end['accuracy']:.3f} ({gain:+.3f}) on {cfg.eval_problems} "
                       f"eval problems"),
        Claim(claim="the mean response length grows by >= 1.5x over training (DeepSeek-AI 2025, Figure 3)",
              holds=bool(growth >= 1.5),
              evidence=f"{base['response_length']:.2f} -> {end['response_length']:.2f} tokens ({growth:.2f}x)"),
        Claim(claim="the share of responses writing intermediate steps inside <think> rises (DeepSeek-AI 2025, "
                    "section 2.2.4: thinking emerges from RL)",
              holds=bool(end["think_steps"] > base["think_steps"]),
              evidence=f"{base['think_steps']:.3f} -> {end['think_steps']:.3f}"),
    )
    return ExperimentResult(metrics=metrics, comparisons=comparisons, summary=summary, claims=claims)
