"""``k15-long2short``: Kimi k1.5's length control in miniature: a long model that overthinks, its length penalty,
long2short, and curriculum with prioritised sampling (Kimi Team 2025, "Kimi k1.5: Scaling Reinforcement
Learning with LLMs", arXiv:2501.12599, sections 2.3.3-2.3.4 and 2.4).

1. **Base model.** As in ``r1-zero``, a small LM is pretrained on the ``think-add`` task's base corpus
   (:mod:`jaxlab.rl.llm.base_corpus`: the pieces of the task, never a problem with its answer), here with the
   corpus option ``corpus_checks``: that share of the worked solutions check their column steps by working them
   again with the operands swapped, and answer with the check's sum. The checks repeat steps that are already
   right: length that accuracy does not need, the "overthinking" of long-CoT models that long2short is for
   (section 2.4). Without them a worked solution of ``think-add`` has a fixed number of column steps for a given
   number of digits, so a model that works every column could not be shortened by 30% without skipping work that
   the answer needs.
2. **The long model.** GRPO from the base model (no SFT, the base model the KL reference; R1-Zero's rule-based
   rewards) on a fixed pool of problems drawn uniformly (``problem_sampling="uniform"``). Its KL coefficient
   ``beta`` is what keeps the base model's habit of checking: RL alone drops checks that do not pay (every
   extra sampled token is a chance to go wrong), as Kimi's long model keeps the long chains of thought of its
   warm-up (section 2.2) rather than growing them from nothing.
3. **Length penalty** (section 2.3.3). The same run with Kimi's length reward added to the rewards,
   ``penalty_weight`` times ``lambda = 0.5 - (len - min_len) / (max_len - min_len)`` within each group (a wrong
   response's ``min(0, lambda)``), after ``penalty_warmup`` steps of plain policy optimisation.
4. **long2short** (section 2.4) of the long model: ``long2short_samples`` samples of each of ``pair_prompts``
   fresh problems, then shortest rejection sampling (SFT on each problem's shortest correct sample) and DPO
   (the shortest correct sample chosen, a wrong longer one or a correct one 1.5 times as long rejected).
5. **Sampling strategies** (section 2.3.4). The long model's run again with curriculum and prioritised sampling
   (``problem_sampling="curriculum+prioritized"``) over the same pool: the easy level (one-digit operands) first,
   problems drawn in proportion to their failure rate so far.

Every run shares the base model (its pretraining is run once and copied). Accuracy (exact match, sampled at
temperature 1) and the mean response length (tokens, EOS included) are measured on one fixed evaluation set,
the post-training driver's (:func:`jaxlab.rl.llm.posttrain.evaluate_policy`), every ``eval_every`` steps.
"""

from __future__ import annotations

import dataclasses
import shutil

from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.experiments._posttrain_common import run_config
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.rl.llm.posttrain import posttrain
from jaxlab.validation import check_positive

PAPER = ("Kimi Team 2025, Kimi k1.5: Scaling Reinforcement Learning with LLMs (arXiv:2501.12599), sections "
         "2.3.3-2.3.4 and 2.4")
MODES = ("rejection", "dpo")


@dataclasses.dataclass(frozen=True)
class K15Long2ShortConfig:
    """Sizes of the base model, the GRPO runs and long2short."""

    num_digits: int = 2
    """Digits per operand of the addition problems."""
    d_model: int = 64
    num_layers: int = 2
    pretrain_steps: int = 1500
    """Steps of the base model's pretraining on the corpus (32 packed rows a step), shared by every run."""
    corpus_checks: float = 0.8
    """Share of the base corpus's worked solutions that check their steps (the long model's verbosity)."""
    corpus_slips: float = 0.0
    """Share of the checked worked solutions whose first working slips (a column's sum one off) and is corrected."""
    steps: int = 120
    """GRPO steps of each run."""
    batch_size: int = 16
    """Prompts per step."""
    group_size: int = 8
    """Samples per prompt (GRPO's group)."""
    lr: float = 3e-4
    """Learning rate of GRPO and of long2short's rejection-sampling SFT."""
    beta: float = 0.2
    """KL coefficient to the base model (the reference): what keeps the base model's checks in the long model."""
    format_weight: float = 0.1
    """Reward for a well-formed response, added to the 0/1 accuracy."""
    problem_pool: int = 512
    """Problems of the fixed pool every GRPO run draws from (each difficulty level equally often)."""
    penalty_weight: float = 0.5
    """Weight of Kimi's length reward in the length-penalty run."""
    penalty_warmup: int = 40
    """Steps of the length-penalty run before the length reward joins (section 2.3.3's warm-up)."""
    long2short_samples: int = 8
    """Samples per problem for long2short (the paper's n = 8)."""
    pair_prompts: int = 512
    """Fresh problems sampled for long2short's data."""
    long2short_steps: int = 60
    """Steps of each long2short stage."""
    dpo_lr: float = 1e-4
    """Learning rate of long2short's DPO."""
    modes: tuple[str, ...] = MODES
    """long2short methods run on the long model: rejection (shortest rejection sampling) and/or dpo."""
    eval_every: int = 10
    eval_problems: int = 256
    fast_compile: bool = False
    """Compile under ``FAST_COMPILE`` (``PostTrainConfig.fast_compile``): tests and runs of a few steps only."""

    def __post_init__(self):
        check_positive(self, "num_digits", "d_model", "num_layers", "pretrain_steps", "steps", "batch_size",
                       "problem_pool", "long2short_samples", "pair_prompts", "long2short_steps",
                       "eval_every", "eval_problems", integer=True)
        check_positive(self, "penalty_warmup", minimum=0, integer=True)
        if not (0 <= self.corpus_checks <= 1 and 0 <= self.corpus_slips <= 1):
            raise ValueError(f"corpus_checks={self.corpus_checks!r} and corpus_slips={self.corpus_slips!r} must be "
                             "probabilities")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size!r} must be >= 2")
        if not self.penalty_weight > 0:
            raise ValueError(f"penalty_weight={self.penalty_weight!r} must be > 0")
        if not self.modes or any(m not in MODES for m in self.modes) or len(set(self.modes)) < len(self.modes):
            raise ValueError(f"modes={self.modes!r} must be distinct names of {MODES}")
        if self.steps % self.eval_every:
            raise ValueError(f"steps={self.steps} must be a multiple of eval_every={self.eval_every} (the curves end "
                             "at the final policy)")


def _steps_to(points: list[dict], target: float) -> int | None:
    """The first evaluated step whose accuracy reaches ``target`` (None: never)."""
    return next((p["step"] for p in points if p["accuracy"] >= target), None)


@register_experiment("k15-long2short", description="Kimi k1.5's length penalty and long2short shorten an "
                     "overthinking long model; curriculum + prioritised sampling", paper=PAPER,
                     quick_seconds=144,
                     quick=K15Long2ShortConfig(pretrain_steps=800, steps=40, penalty_warmup=10, problem_pool=256,
                                               pair_prompts=256, long2short_steps=30))
def k15_long2short(cfg: K15Long2ShortConfig, ctx: RunContext) -> ExperimentResult:
    root = ctx.out_dir / "k15-long2short-runs"
    shutil.rmtree(root, ignore_errors=True)  # fresh runs, never the checkpoints of older ones
    every = max(cfg.steps, cfg.pretrain_steps, cfg.long2short_steps)  # a checkpoint at each stage's end only

    def run(name: str, **overrides) -> dict:
        out = root / name
        if name != "uniform":  # the shared base model: the uniform run's pretraining, resumed at its end
            shutil.copytree(root / "uniform" / "pretrain", out / "pretrain")
        return posttrain(run_config(cfg, "grpo", task="think-add", sft_steps=0, seed=ctx.seed,
                                    checkpoint_every=every, **overrides), out)

    # The long model and its long2short stages (one output folder: each mode resumes the finished GRPO run).
    runs = {f"long2short-{mode}": run("uniform", long2short=mode) for mode in cfg.modes}
    long_run = runs[f"long2short-{cfg.modes[0]}"]
    runs["curriculum+prioritized"] = run("curriculum", problem_sampling="curriculum+prioritized")
    runs["length-penalty"] = run("length-penalty", length_penalty=cfg.penalty_weight,
                                 length_penalty_warmup=cfg.penalty_warmup)

    base = long_run["base"]
    curves = {"uniform": [{"step": 0, **base}] + long_run["history"]}
    for name in ("curriculum+prioritized", "length-penalty"):
        curves[name] = [{"step": 0, **runs[name]["base"]}] + runs[name]["history"]
    long = long_run["long2short"]["before"]
    points = {"base": base, "long (uniform GRPO)": long, "length penalty": runs["length-penalty"]["final"],
              **{f"long2short ({mode})": runs[f"long2short-{mode}"]["long2short"]["after"] for mode in cfg.modes}}

    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for name, pts in curves.items():
        axes[0].plot([p["step"] for p in pts], [p["accuracy"] for p in pts], "o-", ms=3, label=name)
        axes[1].plot([p["step"] for p in pts], [p["response_length"] for p in pts], "o-", ms=3, label=name)
    axes[0].axhline(long["accuracy"], color="gray", lw=0.8, ls=":")
    axes[0].set(xlabel="RL step", ylabel="accuracy (sampled, T = 1)", title="accuracy", ylim=(0, 1))
    axes[1].set(xlabel="RL step", ylabel="tokens (incl. EOS)", title="mean response length")
    axes[1].set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    for name, p in points.items():
        axes[2].scatter(p["response_length"], p["accuracy"], s=40, label=name)
    axes[2].set(xlabel="mean response length (tokens)", ylabel="accuracy", title="length vs accuracy",
                ylim=(0, 1.02))
    axes[2].set_xlim(left=0)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Kimi k1.5 length control on {cfg.num_digits}-digit addition; {cfg.corpus_checks:.0%} of the base "
                 "corpus's worked solutions check their steps")
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    shortened = {}
    for mode in cfg.modes:
        after = points[f"long2short ({mode})"]
        shortened[mode] = {"accuracy": after["accuracy"], "response_length": after["response_length"],
                           "length_cut": 1 - after["response_length"] / long["response_length"],
                           "accuracy_loss": long["accuracy"] - after["accuracy"],
                           "examples": runs[f"long2short-{mode}"]["long2short"]["examples"]}
    target = long["accuracy"]
    reach = {name: _steps_to(curves[name], target) for name in ("uniform", "curriculum+prioritized")}
    penalty = runs["length-penalty"]["final"]
    series = {name: {key: [p[key] for p in pts] for key in ("step", "accuracy", "greedy_accuracy",
                                                              "response_length")} for name, pts in curves.items()}
    metrics = {"curves": series, "points": {name: {k: p[k] for k in ("accuracy", "greedy_accuracy", "response_length")}
                                            for name, p in points.items()},
               "long2short": shortened, "steps_to_long_accuracy": reach, "target_accuracy": target,
               "seconds": {name: r["seconds"] for name, r in runs.items()}, "num_params": long_run["num_params"],
               "eval_problems": cfg.eval_problems}

    claims = []
    for mode in cfg.modes:
        s = shortened[mode]
        claims.append(Claim(
            claim=f"long2short ({mode}) cuts the long model's mean response length by >= 30% at <= 0.05 accuracy "
                  f"loss (Kimi Team 2025, section 2.4)",
            holds=bool(s["length_cut"] >= 0.3 and s["accuracy_loss"] <= 0.05),
            evidence=f"length {long['response_length']:.2f} -> {s['response_length']:.2f} tokens "
                     f"({s['length_cut']:+.1%} cut), accuracy {long['accuracy']:.3f} -> {s['accuracy']:.3f} "
                     f"(loss {s['accuracy_loss']:+.3f}) on {cfg.eval_problems} eval problems"))
    u, c = reach["uniform"], reach["curriculum+prioritized"]
    claims.append(Claim(
        claim="curriculum + prioritised sampling reaches the long model's final accuracy in fewer RL steps than "
              "uniform sampling (Kimi Team 2025, section 2.3.4)",
        holds=bool(u is not None and c is not None and c < u),
        evidence=f"target accuracy {target:.3f} (uniform's final): uniform first reaches it at step {u}, "
                 f"curriculum+prioritized at step {c if c is not None else 'never'} (evaluated every "
                 f"{cfg.eval_every} of {cfg.steps} steps)"))
    claims.append(Claim(
        claim="Kimi's length penalty shortens the responses: the length-penalty run ends with a shorter mean "
              "response than the long model (Kimi Team 2025, section 2.3.3)",
        holds=bool(penalty["response_length"] < long["response_length"]),
        evidence=f"{long['response_length']:.2f} -> {penalty['response_length']:.2f} tokens, accuracy "
                 f"{long['accuracy']:.3f} -> {penalty['accuracy']:.3f} (weight {cfg.penalty_weight}, warm-up "
                 f"{cfg.penalty_warmup} steps)"))

    comparisons = [
        Comparison("long model (uniform GRPO): accuracy, mean length",
                   f"{long['accuracy']:.3f}, {long['response_length']:.1f} tokens (base model "
                   f"{base['accuracy']:.3f}, {base['response_length']:.1f})", None, None),
        Comparison("with the length penalty: accuracy, mean length",
                   f"{penalty['accuracy']:.3f}, {penalty['response_length']:.1f} tokens",
                   "shorter responses; the warm-up keeps accuracy", "Kimi Team 2025, section 2.3.3"),
    ]
    for mode in cfg.modes:
        s = shortened[mode]
        comparisons.append(Comparison(
            f"long2short ({mode}): accuracy, mean length",
            f"{s['accuracy']:.3f}, {s['response_length']:.1f} tokens ({s['length_cut']:.1%} shorter)",
            "shorter responses at about the long model's accuracy (k1.5-short w/ rl: 60.8 AIME 2024 pass@1 with "
            "3,272 tokens on average)", "Kimi Team 2025, sections 2.4 and 3.4"))
    comparisons.append(Comparison(
        "RL steps to the long model's final accuracy: uniform vs curriculum+prioritized",
        f"{u} vs {c if c is not None else 'never'} (of {cfg.steps})",
        "curriculum sampling learns faster than uniform sampling", "Kimi Team 2025, section 2.3.4"))

    cut = ", ".join(f"{mode} {shortened[mode]['response_length']:.1f} tokens at {shortened[mode]['accuracy']:.3f}"
                    for mode in cfg.modes)
    summary = (f"From a base model whose corpus checks {cfg.corpus_checks:.0%} of its worked solutions, uniform "
               f"GRPO ({cfg.steps} steps) makes a long model: accuracy {base['accuracy']:.3f} -> "
               f"{long['accuracy']:.3f}, mean response {long['response_length']:.1f} tokens. long2short: {cut}. "
               f"The length penalty ends at {penalty['response_length']:.1f} tokens and accuracy "
               f"{penalty['accuracy']:.3f}. Curriculum + prioritised sampling reaches {target:.3f} at step "
               f"{c if c is not None else 'never'}, uniform sampling at step {u}.")
    return ExperimentResult(metrics=metrics, comparisons=tuple(comparisons), summary=summary, claims=tuple(claims))
