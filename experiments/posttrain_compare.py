"""``posttrain-compare``: SFT, DPO, PPO-RLHF and GRPO from one SFT start, side by side.

Every method starts from the same supervised warm start (one SFT run, shared; 2-digit addition by default) and
uses its own signal: DPO (Rafailov et al. 2023) preference pairs of the SFT model's samples labelled by
the verifier; PPO-RLHF (Ouyang et al. 2022) a Bradley-Terry reward model, trained on every right/wrong
pair of those sampled groups, checked on pairs of unseen prompts and normalised to mean 0, std 1 on the SFT
policy's samples (Ziegler et al. 2019), with a per-token KL penalty; GRPO (Shao et
al. 2024; DeepSeek-AI 2025) the verifier's reward directly. The table: final accuracy (sampled and greedy)
and the KL of each policy to the SFT reference.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.experiments._posttrain_common import CITATIONS, run_config
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.rl.llm.posttrain import METHODS, posttrain
from jaxlab.rl.llm.task import TASKS, Task
from jaxlab.validation import check_positive


@dataclasses.dataclass(frozen=True)
class PostTrainCompareConfig:
    """Sizes of the comparison (one SFT start, then each method)."""

    methods: tuple[str, ...] = METHODS
    task: str = "add"
    """Verifiable task: add | sort."""
    num_digits: int = 2
    d_model: int = 64
    num_layers: int = 2
    sft_steps: int = 600
    """SFT steps of the shared start (about 40% sampled accuracy on 2-digit addition: room to improve, and
    wrong samples close enough to right ones that the reward model must check the sum)."""
    steps: int = 150
    """Steps of each method (DPO, PPO-RLHF, GRPO)."""
    rm_steps: int = 2400
    """Reward model steps (PPO-RLHF)."""
    rm_batch_size: int = 64
    """Preference pairs per reward-model step (every right/wrong pair of each group)."""
    lr: float = 3e-4
    """Adam learning rate of PPO-RLHF and GRPO."""
    kl_coef: float = 0.2
    """PPO-RLHF's per-token KL penalty, against rewards normalised to mean 0, std 1 on the SFT samples."""
    batch_size: int = 16
    group_size: int = 8
    pair_prompts: int = 4096
    """Prompts sampled for DPO / reward-model preference pairs."""
    eval_problems: int = 512
    """Fixed evaluation problems (also the prompts of the reward model's held-out pairs)."""
    fast_compile: bool = False
    """Compile under ``FAST_COMPILE`` (``PostTrainConfig.fast_compile``): tests and runs of a few steps only."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS}")
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ValueError(f"methods={self.methods!r} must be a non-empty subset of {METHODS}")
        check_positive(self, "num_digits", "d_model", "num_layers", "sft_steps", "steps", "rm_steps",
                             "rm_batch_size", "batch_size", "pair_prompts", "eval_problems", integer=True)
        if not (self.lr > 0 and self.kl_coef >= 0):
            raise ValueError(f"need lr > 0 and kl_coef >= 0, got {self.lr=}, {self.kl_coef=}")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size!r} must be >= 2")


@register_experiment("posttrain-compare", description="SFT vs DPO vs PPO-RLHF vs GRPO: accuracy and KL",
                     paper="Ouyang et al. 2022; Rafailov et al. 2023; Shao et al. 2024; DeepSeek-AI 2025",
                     quick_seconds=130,
                     quick=PostTrainCompareConfig(eval_problems=256))
def posttrain_compare(cfg: PostTrainCompareConfig, ctx: RunContext) -> ExperimentResult:
    out = ctx.out_dir / "posttrain-compare-runs"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the methods share this run's SFT start, never an older one
    results = {}
    for method in ctx.progress(cfg.methods, desc="method"):
        run = posttrain(run_config(cfg, method, seed=ctx.seed, eval_every=cfg.steps, rm_all_pairs=True,
                                   checkpoint_every=max(cfg.steps, cfg.sft_steps, cfg.rm_steps)), out)
        results[method] = {**run["final"], "seconds": run["seconds"], "pairs": run.get("pairs"),
                           "reward_model_heldout_accuracy": run.get("reward_model", {}).get("heldout_accuracy"),
                           "reward_model_heldout_pairs": run.get("reward_model", {}).get("heldout_pairs")}
        sft_start = run["sft"]
        ctx.log(f"{method}: accuracy {run['final']['accuracy']:.3f}, KL {run['final']['kl_to_ref']:.3f}")
    names = list(results)
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [results[m]["accuracy"] for m in names], 0.4, label="sampled (T = 1)")
    axes[0].bar(x + 0.2, [results[m]["greedy_accuracy"] for m in names], 0.4, label="greedy")
    axes[0].set(xticks=x, xticklabels=names, ylabel="exact-match accuracy", title="final accuracy")
    axes[0].legend()
    axes[1].bar(x, [results[m]["kl_to_ref"] for m in names], 0.5, color="tab:gray")
    axes[1].set(xticks=x, xticklabels=names, ylabel="nats per response", title="KL(pi || pi_SFT)")
    fig.suptitle(f"post-training a {cfg.d_model}-wide LM on {Task(cfg.task, cfg.num_digits).description}")
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)
    comparisons = tuple(
        Comparison(f"{m}: accuracy (greedy) / KL to SFT",
                   f"{r['accuracy']:.3f} ({r['greedy_accuracy']:.3f}) / {r['kl_to_ref']:.3f}", None, CITATIONS)
        for m, r in results.items())
    table = "; ".join(f"{m} {r['accuracy']:.3f} at KL {r['kl_to_ref']:.2f}" for m, r in results.items())
    summary = (f"From one SFT start (sampled accuracy {sft_start['accuracy']:.3f}), sampled exact-match accuracy "
               f"on {cfg.eval_problems} fixed problems and KL to the reference after {cfg.steps} steps of each "
               f"method: {table}. The papers report no numbers on this task (published = none).")
    claims = []
    rl_methods = [m for m in names if m != "sft"]
    if rl_methods:
        worst = min(rl_methods, key=lambda m: results[m]["accuracy"])
        claims.append(Claim(
            claim=f"every post-training method ({', '.join(rl_methods)}) beats the SFT start's sampled accuracy "
                  "(Ouyang et al. 2022; Rafailov et al. 2023; Shao et al. 2024)",
            holds=all(results[m]["accuracy"] > sft_start["accuracy"] for m in rl_methods),
            evidence=f"SFT {sft_start['accuracy']:.3f}; worst {worst} {results[worst]['accuracy']:.3f} "
                     f"({cfg.eval_problems} eval problems)"))
    rm_accuracy = results.get("ppo-rlhf", {}).get("reward_model_heldout_accuracy")
    if "ppo-rlhf" in results:
        rm_pairs = results["ppo-rlhf"]["reward_model_heldout_pairs"]
        claims.append(Claim(
            claim="the reward model ranks >= 80% of held-out preference pairs right (Ouyang et al. 2022)",
            holds=rm_accuracy is not None and rm_accuracy >= 0.8,
            evidence=f"{rm_accuracy:.3f} on {rm_pairs} pairs of unseen prompts" if rm_accuracy is not None
            else "no held-out pair (no group held both a right and a wrong sample)"))
    if rm_accuracy is not None:
        summary += (f" The Bradley-Terry reward model, trained on {results['ppo-rlhf']['pairs']} pairs (every "
                    f"right/wrong pair of the SFT model's groups of {cfg.group_size}), ranks {rm_accuracy:.0%} of "
                    f"held-out pairs right: PPO-RLHF climbs that learned reward, not the verifier, and gains on the "
                    "verifier only as far as the reward model tracks it (reward over-optimisation, Gao et al. 2023); "
                    "DPO and GRPO read the verifier's labels directly.")
    return ExperimentResult(metrics={"methods": results, "sft_accuracy": sft_start["accuracy"],
                                     "eval_problems": cfg.eval_problems},
                            comparisons=comparisons, summary=summary, claims=tuple(claims))
