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
   the answer needs. ``corpus_rechecks`` of the checked solutions check a second time (three workings of one sum,
   the repeated verification of "Do NOT Think That Much for 2+3=?", Chen et al. 2024). With one check at most,
   the long model came out at about 1.4 times the length of an unchecked solution (35 against 25 tokens on two
   digits), so even a policy that dropped every check would have been under 30% shorter: the claim could not be
   met by removing redundant length alone, only by skipping needed steps. A second check gives the long model
   room above that floor, as a long-CoT model's responses have.
2. **The long model.** Kimi's long-CoT warm-up (section 2.2): ``sft_steps`` of SFT on the task's problems answered
   with checks at the corpus's rates (``PostTrainConfig.sft_long_cot``), then GRPO from that model (the KL
   reference; R1-Zero's rule-based rewards) on a fixed pool of problems drawn uniformly
   (``problem_sampling="uniform"``). Its KL coefficient ``beta`` is what keeps the warm-up's habit of checking:
   RL alone drops checks that do not pay (every extra sampled token is a chance to go wrong), as Kimi's long
   model keeps the long chains of thought of its warm-up rather than growing them from nothing. (GRPO straight
   from the base model, as in ``r1-zero``, made a long model of 32-36 tokens: it learnt to work the columns
   and kept few checks.)
3. **Length penalty** (section 2.3.3). The same run with Kimi's length reward added to the rewards,
   ``penalty_weight`` times ``lambda = 0.5 - (len - min_len) / (max_len - min_len)`` within each group (a wrong
   response's ``min(0, lambda)``), after ``penalty_warmup`` steps of plain policy optimisation.
4. **long2short** (section 2.4) of the long model: ``long2short_samples`` samples of each of ``pair_prompts``
   fresh problems, then shortest rejection sampling (SFT on each problem's shortest correct sample) and DPO
   (the shortest correct sample chosen, a wrong longer one or a correct one 1.5 times as long rejected).
5. **Sampling strategies** (section 2.3.4), from the base model (no warm-up, R1-Zero's start): GRPO with uniform
   sampling against curriculum and prioritised sampling (``problem_sampling="curriculum+prioritized"``) over the
   same pool: the easy level (one-digit operands) first, problems drawn in proportion to their failure rate so
   far. Kimi's case for a curriculum is an initial RL model of limited performance, which gets few right samples
   on hard problems; the long-CoT warm-up already solves two-digit addition (0.996 sampled accuracy at the full
   size), leaving RL nothing to learn faster, so the comparison starts where RL has the task to learn.
   The experiment measures the curriculum's premise, the base model's pass@1 on the pool's problems of each level
   (``pool_levels``), and here it fails: the base model answers the one-digit problems no more often than the
   two-digit ones (seed 0: 0.035 against 0.098 at the quick size, 0.164 against 0.172 at the full size), and
   uniform sampling's whole run solves them less often or as often (0.35 against 0.64; 0.82 against 0.80). A
   one-digit problem is zero-padded to two columns whose tens column, 0 + 0 with or without a carry, the base
   corpus's uniformly drawn operands show once in a hundred; so the level that a curriculum by digits calls easy
   is not easier for this model, and the curriculum spends its first half on it.

Every run shares the base model, and the long model and the length-penalty run the warm-up (each stage is run
once and copied). Accuracy (exact match, sampled at temperature 1) and the mean response length (tokens, EOS
included) are measured on one fixed evaluation set, the post-training driver's
(:func:`jaxlab.rl.llm.posttrain.evaluate_policy`), every ``eval_every`` steps.
"""

from __future__ import annotations

import dataclasses
import shutil

from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.experiments._posttrain_common import run_config
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.rl.llm.posttrain import posttrain
from jaxlab.validation import check_positive, check_range

PAPER = ("Kimi Team 2025, Kimi k1.5: Scaling Reinforcement Learning with LLMs (arXiv:2501.12599), sections "
         "2.3.3-2.3.4 and 2.4")
MODES = ("rejection", "dpo")
SAMPLING = ("uniform", "curriculum+prioritized")
"""The problem sampling of the runs from the base model."""


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
    corpus_rechecks: float = 0.5
    """Share of the checked worked solutions that check a second time."""
    sft_steps: int = 200
    """Steps of the long-CoT warm-up: SFT on problems answered with checks at the corpus's rates."""
    steps: int = 120
    """GRPO steps of the long model's and the length-penalty run."""
    sampling_steps: int = 120
    """GRPO steps of the two sampling runs from the base model. The curriculum opens its levels in equal stages of
    the run, so a run of 40 steps spends 20 on one-digit problems, which the evaluation set (two-digit operands
    drawn uniformly) barely holds; the same length at both sizes."""
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
        check_positive(self, "num_digits", "d_model", "num_layers", "pretrain_steps", "sft_steps", "steps",
                       "sampling_steps", "batch_size", "problem_pool", "long2short_samples", "pair_prompts",
                       "long2short_steps", "eval_every", "eval_problems", integer=True)
        check_positive(self, "penalty_warmup", minimum=0, integer=True)
        check_range(self, "corpus_checks", 0.0, 1.0)
        check_range(self, "corpus_slips", 0.0, 1.0)
        check_range(self, "corpus_rechecks", 0.0, 1.0)
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size!r} must be >= 2")
        if not self.penalty_weight > 0:
            raise ValueError(f"penalty_weight={self.penalty_weight!r} must be > 0")
        if not self.modes or any(m not in MODES for m in self.modes) or len(set(self.modes)) < len(self.modes):
            raise ValueError(f"modes={self.modes!r} must be distinct names of {MODES}")
        for name in ("steps", "sampling_steps"):
            if getattr(self, name) % self.eval_every:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of eval_every={self.eval_every} "
                                 "(the curves end at the final policy)")


def _steps_to(points: list[dict], target: float) -> int | None:
    """The first evaluated step whose accuracy reaches ``target`` (None: never)."""
    return next((p["step"] for p in points if p["accuracy"] >= target), None)


@register_experiment("k15-long2short", description="Kimi k1.5's length penalty and long2short shorten an "
                     "overthinking long model; curriculum + prioritised sampling", paper=PAPER,
                     quick_seconds=258,
                     quick=K15Long2ShortConfig(pretrain_steps=800, steps=40, penalty_warmup=10, problem_pool=256,
                                               pair_prompts=256, long2short_steps=30))
def k15_long2short(cfg: K15Long2ShortConfig, ctx: RunContext) -> ExperimentResult:
    root = ctx.out_dir / "k15-long2short-runs"
    shutil.rmtree(root, ignore_errors=True)  # fresh runs, never the checkpoints of older ones
    # a checkpoint at each stage's end only
    every = max(cfg.steps, cfg.sampling_steps, cfg.pretrain_steps, cfg.sft_steps, cfg.long2short_steps)

    def run(name: str, warm_up: bool, **overrides) -> dict:
        out = root / name
        if name != "long":  # the long run's pretraining (the base model) and SFT (the warm-up), resumed at their ends
            for stage in ("pretrain", "sft") if warm_up else ("pretrain",):
                shutil.copytree(root / "long" / stage, out / stage)
        return posttrain(run_config(cfg, "grpo", task="think-add", seed=ctx.seed, checkpoint_every=every,
                                    **(dict(sft_long_cot=True) if warm_up else dict(sft_steps=0)), **overrides), out)

    # The long model and its long2short stages (one output folder: each mode resumes the finished GRPO run).
    runs = {f"long2short-{mode}": run("long", True, long2short=mode) for mode in cfg.modes}
    long_run = runs[f"long2short-{cfg.modes[0]}"]
    runs["length-penalty"] = run("length-penalty", True, length_penalty=cfg.penalty_weight,
                                 length_penalty_warmup=cfg.penalty_warmup)
    for mode in SAMPLING:
        runs[mode] = run(mode, False, problem_sampling=mode, steps=cfg.sampling_steps)

    base, warm = long_run["base"], long_run["sft"]
    curves = {"long (uniform)": [{"step": 0, **warm}] + long_run["history"],  # from the long-CoT warm-up
              "length-penalty": [{"step": 0, **warm}] + runs["length-penalty"]["history"],
              **{mode: [{"step": 0, **base}] + runs[mode]["history"] for mode in SAMPLING}}  # from the base model
    long = long_run["long2short"]["before"]
    points = {"base": base, "long-CoT warm-up": warm, "long (uniform GRPO)": long,
              "length penalty": runs["length-penalty"]["final"],
              **{f"long2short ({mode})": runs[f"long2short-{mode}"]["long2short"]["after"] for mode in cfg.modes}}

    target = curves["uniform"][-1]["accuracy"]  # uniform sampling's final accuracy, from the base model
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for mode in SAMPLING:
        pts = curves[mode]
        axes[0].plot([p["step"] for p in pts], [p["accuracy"] for p in pts], "o-", ms=3, label=mode)
    axes[0].axhline(target, color="gray", lw=0.8, ls=":")
    axes[0].set(xlabel="RL step", ylabel="accuracy (sampled, T = 1)", title="sampling, from the base model",
                ylim=(0, 1))
    axes[0].legend(fontsize=8)
    for name in ("long (uniform)", "length-penalty"):
        pts = curves[name]
        axes[1].plot([p["step"] for p in pts], [p["response_length"] for p in pts], "o-", ms=3, label=name)
    axes[1].axvline(cfg.penalty_warmup, color="gray", lw=0.8, ls=":")
    axes[1].set(xlabel="RL step", ylabel="tokens (incl. EOS)", title="mean response length, from the warm-up")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(fontsize=8)
    for name, p in points.items():
        axes[2].scatter(p["response_length"], p["accuracy"], s=40, label=name)
    axes[2].set(xlabel="mean response length (tokens)", ylabel="accuracy", title="length vs accuracy",
                ylim=(0, 1.02))
    axes[2].set_xlim(left=0)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Kimi k1.5 on {cfg.num_digits}-digit addition: a long-CoT warm-up whose answers check their steps "
                 f"({cfg.corpus_checks:.0%} checked, {cfg.corpus_rechecks:.0%} of those twice), then GRPO")
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    shortened = {}
    for mode in cfg.modes:
        after = points[f"long2short ({mode})"]
        shortened[mode] = {"accuracy": after["accuracy"], "response_length": after["response_length"],
                           "length_cut": 1 - after["response_length"] / long["response_length"],
                           "accuracy_loss": long["accuracy"] - after["accuracy"],
                           "examples": runs[f"long2short-{mode}"]["long2short"]["examples"]}
    reach = {mode: _steps_to(curves[mode], target) for mode in SAMPLING}
    # the curriculum's premise: the start policy (the base model) solves the easy level more often
    by_level = {mode: runs[mode]["problem_pool"]["levels"] for mode in SAMPLING}
    start_by_level = by_level["uniform"]["start_accuracy"]
    levels = " / ".join(f"{d}-digit" for d in range(1, cfg.num_digits + 1))
    start_text = " / ".join("—" if a is None else f"{a:.3f}" for a in start_by_level)
    penalty = runs["length-penalty"]["final"]
    series = {name: {key: [p[key] for p in pts] for key in ("step", "accuracy", "greedy_accuracy",
                                                              "response_length")} for name, pts in curves.items()}
    metrics = {"curves": series, "points": {name: {k: p[k] for k in ("accuracy", "greedy_accuracy", "response_length")}
                                            for name, p in points.items()},
               "long2short": shortened, "steps_to_target_accuracy": reach, "target_accuracy": target,
               "pool_levels": by_level,
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
        claim="from the base model, curriculum + prioritised sampling reaches uniform sampling's final accuracy in "
              "fewer RL steps than uniform sampling (Kimi Team 2025, section 2.3.4)",
        holds=bool(u is not None and c is not None and c < u),
        evidence=f"target accuracy {target:.3f} (uniform's final): uniform first reaches it at step {u}, "
                 f"curriculum+prioritized at step {c if c is not None else 'never'} (evaluated every "
                 f"{cfg.eval_every} of {cfg.sampling_steps} steps)"))
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
                   f"{base['accuracy']:.3f}, {base['response_length']:.1f}; after the long-CoT warm-up "
                   f"{warm['accuracy']:.3f}, {warm['response_length']:.1f})", None, None),
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
        "RL steps from the base model to uniform sampling's final accuracy: uniform vs curriculum+prioritized",
        f"{u} vs {c if c is not None else 'never'} (of {cfg.sampling_steps})",
        "curriculum sampling learns faster than uniform sampling", "Kimi Team 2025, section 2.3.4"))
    comparisons.append(Comparison(
        f"the base model's pass@1 on the pool's problems by level ({levels} larger operand)",
        start_text,
        "the initial RL model gets few right samples on hard problems (the curriculum's premise)",
        "Kimi Team 2025, section 2.3.4"))

    cut = ", ".join(f"{mode} {shortened[mode]['response_length']:.1f} tokens at {shortened[mode]['accuracy']:.3f}"
                    for mode in cfg.modes)
    summary = (f"A long-CoT warm-up ({cfg.sft_steps} SFT steps on answers that check their steps at the corpus's "
               f"rates: {cfg.corpus_checks:.0%} checked, {cfg.corpus_rechecks:.0%} of those twice) and uniform "
               f"GRPO ({cfg.steps} steps) make a long model: accuracy {warm['accuracy']:.3f} -> "
               f"{long['accuracy']:.3f}, mean response {long['response_length']:.1f} tokens. long2short: {cut}. "
               f"The length penalty ends at {penalty['response_length']:.1f} tokens and accuracy "
               f"{penalty['accuracy']:.3f}. From the base model, curriculum + prioritised sampling reaches "
               f"{target:.3f} (uniform sampling's final accuracy) at step {c if c is not None else 'never'}, "
               f"uniform sampling at step {u}. The base model's pass@1 on the pool's problems by level ({levels} "
               f"larger operand): {start_text}.")
    return ExperimentResult(metrics=metrics, comparisons=tuple(comparisons), summary=summary, claims=tuple(claims))
