"""``gui-grounding``: a GUI agent's click grounding after supervised fine-tuning and after GRPO with the
environment as verifier (UI-TARS, Qin et al. 2025, arXiv 2501.12326, section 4: imitation of action traces, then
online reinforcement on verified outcomes; the click-in-box reward of GUI-R1, Xia and Luo 2025, arXiv 2504.10458),
and coordinate-free grounding against coordinates written as text (GUI-Actor, Wu et al. 2025, arXiv 2506.03143).

Both agents are :func:`~jaxlab.experiments.gui_agent_train.train_gui_agent` (``jaxlab train gui-agent``) on the
same screens, tasks, demonstrations and seed; they differ only in how a click's location is produced:

* ``pointer`` (GUI-Actor): the policy writes ``click(<point>)`` and the pointing head picks a ViT patch
  (:mod:`jaxlab.models.grounding`); SFT on demonstrations, then GRPO (``grpo_steps``) whose reward is the step
  verifier (a click inside the target's box, ``finished()`` at the end; the pointing choice is one more action
  token of the policy);
* ``text``: the coordinates written as digits, ``click(x, y)``, SFT alone (the baseline of the comparison).

Tasks are the grounding kinds (``kinds``): click a named button, check a named box, open a named menu and choose
a named item, each ending with ``finished()``. Measured on held-out tasks (another key): click accuracy, the
greedy click inside the target's box over every click step of the held-out demonstrations (UI-TARS's and
ScreenSpot's grounding metric); and task success, greedy rollouts through the environment, every task of two
or three actions (``finished()`` included).

The greedy click is GUI-Actor's readout (``GUIAgentConfig.point_readout="region"``,
:func:`jaxlab.models.grounding.region_point`): the patches with at least 0.3 of the largest probability, joined
into side-adjacent regions, the region of the highest mean probability, its probability-weighted centre. The most
likely patch's centre (the "argmax" readout, which the runs before it used) is reported beside it. Seed 0 at full
size: after SFT the region readout clicks in the box 0.526 of the time and the argmax one 0.550; after GRPO 0.545
(up 0.019, about half a standard error) and 0.531 (down). GRPO moves probability within the box, which the
region's weighted centre gains from and the single most likely patch does not; neither change is larger than the
evaluation's noise.

Claims, fixed before the runs: "raises" means by more than one binomial standard error of the SFT policy's
number on the same held-out steps or tasks (``sqrt(p (1 - p) / n)``), so that a difference of evaluation noise
does not count; "beats" in the grounding comparison means by more than two. The sampled policy's click accuracy
(``eval_samples`` samples a step at GRPO's temperature) is reported beside the greedy one.

GRPO runs at the trainer's settings (learning rate 2e-4, a tenth of SFT's; temperature 1; the verifier's reward
plus 0.1 for an action that parses; KL coefficient 0.04) with 8 prompts x 8 samples a step. Probed on seed 1
(400 SFT steps, then 40 GRPO steps; the reported runs are seed 0), no variant raised the greedy click accuracy
from its 0.477: 0.39 to 0.46 after it with learning rates from 5e-5 to 1e-3, temperature 0.5, no KL term, a
Gaussian reward peaked at the box's centre (GUI-G2's point reward), or the pointing head trained alone. At the
trainer's settings the sampled policy's click accuracy rose (0.36 to 0.41) while the greedy one fell (0.477 to
0.394): a binary in-box reward pays every patch of the box alike, so the policy gradient can move probability from
the most likely patch to the rest of the box; the mass on the box grows while its peak, which the greedy click
reads, falls.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.experiments.gui_agent_train import GUIAgentConfig, train_gui_agent
from jaxlab.models.gui_tasks import TASK_KINDS
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.validation import check, check_positive

PAPER = ("Qin et al. 2025, UI-TARS (arXiv:2501.12326), section 4; Wu et al. 2025, GUI-Actor (arXiv:2506.03143), "
         "section 3; Xia and Luo 2025, GUI-R1 (arXiv:2504.10458)")
GROUNDINGS = ("pointer", "text")


@dataclasses.dataclass(frozen=True)
class GUIGroundingConfig:
    """Sizes of the two agents (every other field is :class:`GUIAgentConfig`'s default)."""

    sft_steps: int = 2000
    """SFT steps of both agents."""
    grpo_steps: int = 200
    """GRPO steps of the pointer agent after its SFT."""
    train_tasks: int = 5000
    """Training tasks (demonstrations for SFT, prompts for GRPO)."""
    eval_tasks: int = 192
    """Held-out tasks: every click step of their demonstrations, and one greedy rollout each."""
    kinds: tuple[str, ...] = ("click", "check", "menu")
    """Task kinds (the grounding ones: every step a click, then finished())."""
    grpo_prompts: int = 8
    """Step prompts per GRPO step."""
    group_size: int = 8
    """Actions sampled per prompt."""
    grpo_lr: float = 2e-4
    temperature: float = 1.0
    """Sampling temperature of GRPO's rollouts (text and pointer)."""
    sft_evals: int = 4
    """Held-out evaluations during SFT, for the curves (GRPO's at the same interval, and at its end)."""
    eval_samples: int = 4
    """Samples per held-out click step for the sampled policy's click accuracy."""
    fast_compile: bool = False

    def __post_init__(self):
        check_positive(self, "sft_steps", "grpo_steps", "train_tasks", "eval_tasks", "grpo_prompts", "sft_evals",
                       integer=True)
        check(self.sft_evals <= min(self.sft_steps, self.grpo_steps),
              f"sft_evals={self.sft_evals} must be <= sft_steps={self.sft_steps} and grpo_steps={self.grpo_steps}")
        check(isinstance(self.kinds, tuple) and set(self.kinds) <= set(TASK_KINDS),
              f"kinds={self.kinds!r} must be a tuple of {TASK_KINDS}")
        for grounding in GROUNDINGS:
            self.agent_config(grounding, 0)  # the trainer's own checks

    def agent_config(self, grounding: str, seed: int) -> GUIAgentConfig:
        grpo = self.grpo_steps if grounding == "pointer" else 0
        every = math.ceil(self.sft_steps / self.sft_evals)
        return GUIAgentConfig(grounding=grounding, kinds=self.kinds, train_tasks=self.train_tasks,
                              eval_tasks=self.eval_tasks, steps=self.sft_steps, grpo_steps=grpo,
                              warmup_steps=min(30, self.sft_steps // 10),
                              grpo_prompts=self.grpo_prompts, group_size=self.group_size, grpo_lr=self.grpo_lr,
                              temperature=self.temperature, eval_every=every, eval_samples=self.eval_samples,
                              checkpoint_every=max(self.sft_steps, self.grpo_steps), seed=seed, resume=False,
                              progress=False, fast_compile=self.fast_compile)


def eval_curve(stage_dir) -> dict[str, list]:
    """The held-out evaluations logged in a stage's metrics.jsonl: steps, click accuracy, task success."""
    lines = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/click_accuracy" in line]
    return {"steps": [e["step"] for e in evals], "click_accuracy": [e["eval/click_accuracy"] for e in evals],
            "task_success": [e["eval/task_success"] for e in evals]}


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def plot(metrics: dict, cfg: GUIGroundingConfig, seed: int, path) -> None:
    """The figure from the experiment's metrics: held-out click accuracy against steps (both agents' SFT, then
    the pointer agent's GRPO), and task success by kind after each stage."""
    curves, by_kind = metrics["curves"], metrics["task_success_by_kind"]
    fig = Figure(figsize=(12, 4.2))
    ax_curve, ax_kind = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1.0]})
    for grounding, style in zip(GROUNDINGS, ("o-", "s-")):
        c = curves[grounding]["sft"]
        ax_curve.plot(c["steps"], c["click_accuracy"], style, label=f"{grounding}: SFT")
    g = curves["pointer"]["grpo"]  # from the SFT policy's accuracy at the end of SFT
    ax_curve.plot([cfg.sft_steps] + [cfg.sft_steps + x for x in g["steps"]],
                  [metrics["click_accuracy"]["sft"]] + g["click_accuracy"], "^-", label="pointer: GRPO")
    ax_curve.axvline(cfg.sft_steps, color="grey", ls=":")
    ax_curve.set(xlabel="step (SFT, then GRPO)", ylabel="held-out click accuracy (greedy)", ylim=(0, 1),
                 title="click grounding")
    ax_curve.legend()
    x = np.arange(len(cfg.kinds))
    for i, (stage, label) in enumerate((("text", "text SFT"), ("sft", "pointer SFT"), ("grpo", "pointer GRPO"))):
        heights = [np.nan if by_kind[stage][k] is None else by_kind[stage][k] for k in cfg.kinds]
        ax_kind.bar(x + (i - 1) * 0.27, heights, 0.27, label=label)
    ax_kind.set(xticks=x, xticklabels=cfg.kinds, ylim=(0, 1), title="held-out task success by kind")
    ax_kind.legend(fontsize=8)
    fig.suptitle(f"GUI grounding: {cfg.sft_steps} SFT steps, {cfg.grpo_steps} GRPO steps, seed {seed}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@register_experiment("gui-grounding", description="GUI agent click grounding: SFT then GRPO with the environment "
                                                 "as verifier; pointer (coordinate-free) vs text coordinates",
                     paper=PAPER, quick_seconds=314,
                     quick=GUIGroundingConfig(sft_steps=400, grpo_steps=40, eval_tasks=96, sft_evals=2))
def gui_grounding(cfg: GUIGroundingConfig, ctx: RunContext) -> ExperimentResult:
    runs = ctx.out_dir / "gui-grounding-runs"
    shutil.rmtree(runs, ignore_errors=True)  # fresh runs, never an older run's checkpoints
    summaries, curves = {}, {}
    for grounding in GROUNDINGS:
        ctx.log(f"training the {grounding} agent")
        summaries[grounding] = train_gui_agent(cfg.agent_config(grounding, ctx.seed), runs / grounding)
        curves[grounding] = {"sft": eval_curve(runs / grounding / "sft")}
    curves["pointer"]["grpo"] = eval_curve(runs / "pointer" / "grpo")
    s, t = summaries["pointer"], summaries["text"]
    n_clicks, n_tasks = s["sft/eval/click_steps"], cfg.eval_tasks
    acc = {"text": t["sft/eval/click_accuracy"], "sft": s["sft/eval/click_accuracy"],
           "grpo": s["grpo/eval/click_accuracy"]}
    success = {"text": t["sft/eval/task_success"], "sft": s["sft/eval/task_success"],
               "grpo": s["grpo/eval/task_success"]}
    by_kind = {stage: {k: s.get(f"{stage}/eval/task_success/{k}") for k in cfg.kinds} for stage in ("sft", "grpo")}
    by_kind["text"] = {k: t.get(f"sft/eval/task_success/{k}") for k in cfg.kinds}  # None: no held-out task
    se_acc, se_success = binomial_se(acc["sft"], n_clicks), binomial_se(success["sft"], n_tasks)
    se_text = binomial_se(acc["text"], n_clicks)
    sampled = {"text": t.get("sft/eval/click_accuracy_sampled"), "sft": s.get("sft/eval/click_accuracy_sampled"),
               "grpo": s.get("grpo/eval/click_accuracy_sampled")}
    argmax = {"sft": s.get("sft/eval/click_accuracy_argmax"), "grpo": s.get("grpo/eval/click_accuracy_argmax")}

    metrics = {"click_accuracy": acc, "click_accuracy_sampled": sampled, "click_accuracy_argmax": argmax,
               "task_success": success,
               "task_success_by_kind": by_kind, "curves": curves,
               "click_steps": n_clicks, "eval_tasks": n_tasks,
               "step_accuracy": {"text": t["sft/eval/step_accuracy"], "sft": s["sft/eval/step_accuracy"],
                                 "grpo": s["grpo/eval/step_accuracy"]},
               "seconds": {"text_sft": t["sft/seconds"], "pointer_sft": s["sft/seconds"],
                           "pointer_grpo": s["grpo/seconds"]},
               "num_params": {g: summaries[g]["num_params"] for g in GROUNDINGS}}
    plot(metrics, cfg, ctx.seed, ctx.figure_path)
    claims = (
        Claim(claim="GRPO with the environment's verifier raises held-out click accuracy over the SFT policy "
                    "(UI-TARS section 4; GUI-R1), by more than one standard error",
              holds=bool(acc["grpo"] - acc["sft"] > se_acc),
              evidence=f"{acc['sft']:.3f} -> {acc['grpo']:.3f} (1 s.e. = {se_acc:.3f}, {n_clicks} click steps)"),
        Claim(claim="GRPO raises held-out multi-step task success over the SFT policy (UI-TARS section 4), by more "
                    "than one standard error",
              holds=bool(success["grpo"] - success["sft"] > se_success),
              evidence=f"{success['sft']:.3f} -> {success['grpo']:.3f} (1 s.e. = {se_success:.3f}, {n_tasks} "
                       f"tasks)"),
        Claim(claim="coordinate-free grounding (a pointing head over patches) beats coordinates written as text at "
                    "equal SFT steps (GUI-Actor section 4), by more than two standard errors",
              holds=bool(acc["sft"] - acc["text"] > 2 * se_text),
              evidence=f"pointer {acc['sft']:.3f} vs text {acc['text']:.3f} (2 s.e. = {2 * se_text:.3f})"),
    )
    comparisons = (
        Comparison("held-out click accuracy: text SFT / pointer SFT / pointer GRPO",
                   f"{acc['text']:.3f} / {acc['sft']:.3f} / {acc['grpo']:.3f}", None, None),
        Comparison(f"held-out click accuracy of the sampled policy (T = {cfg.temperature:g}, {cfg.eval_samples} "
                   "samples a step; what GRPO optimises): text SFT / pointer SFT / pointer GRPO",
                   " / ".join("n/a" if sampled[k] is None else f"{sampled[k]:.3f}" for k in ("text", "sft", "grpo")),
                   None, None),
        Comparison("held-out click accuracy of the pointer's most likely patch (the argmax readout, beside GUI-Actor's "
                   "region readout above): pointer SFT / pointer GRPO",
                   " / ".join("n/a" if argmax[k] is None else f"{argmax[k]:.3f}" for k in ("sft", "grpo")), None, None),
        Comparison("held-out task success: text SFT / pointer SFT / pointer GRPO",
                   f"{success['text']:.3f} / {success['sft']:.3f} / {success['grpo']:.3f}", None, None),
        Comparison("pointer vs text-coordinate grounding (ScreenSpot-Pro: GUI-Actor-7B on Qwen2-VL vs UI-TARS-72B)",
                   f"{acc['sft']:.3f} vs {acc['text']:.3f} (synthetic screens)", "40.7 vs 38.1",
                   "Wu et al. 2025, abstract"),
        Comparison("seconds: text SFT / pointer SFT / pointer GRPO",
                   f"{t['sft/seconds']:.0f} / {s['sft/seconds']:.0f} / {s['grpo/seconds']:.0f}", None, None),
    )
    summary = (f"On {n_tasks} held-out tasks of kinds {', '.join(cfg.kinds)} ({n_clicks} click steps; seed "
               f"{ctx.seed}), the pointer agent clicks inside the target's box {acc['sft']:.3f} of the time after "
               f"{cfg.sft_steps} SFT steps and {acc['grpo']:.3f} after {cfg.grpo_steps} GRPO steps; the agent writing "
               f"coordinates as text {acc['text']:.3f} after the same SFT. Task success: {success['sft']:.3f} after "
               f"SFT, {success['grpo']:.3f} after GRPO (text: {success['text']:.3f}).")
    return ExperimentResult(metrics=metrics, comparisons=comparisons, summary=summary, claims=claims)
