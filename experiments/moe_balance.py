"""``moe-balance``: a dense LM against MoE LMs at equal active parameters, and two ways to balance the experts.

Three byte-level LMs on the stdlib corpus with the same width, depth, data order and schedule:
* ``dense``: the SwiGLU feed-forward of width ``d_ff``;
* ``moe-aux``: ``E`` routed experts, top-``k``, ``S`` shared, each expert ``d_ff / (k + S)`` wide, so every
  token passes through as many feed-forward FLOPs as in the dense model (fine-grained experts, DeepSeekMoE),
  balanced by Switch's auxiliary loss ``E sum_e f_e P_e`` (Fedus et al. 2021, eq. 4);
* ``moe-bias``: the same MoE balanced without an auxiliary loss: a per-expert bias on the routing scores,
  moved by ``-gamma sign(load_e - mean load)`` after each step (Wang et al. 2024, "Auxiliary-Loss-Free Load
  Balancing Strategy for Mixture-of-Experts"; DeepSeek-V3, eqs. 16-18).
Reported: validation loss, and the load imbalance of the training batches, ``MaxVio = max_e load_e / mean
load - 1`` (Wang et al. 2024's measure) and the load's coefficient of variation, averaged over the second
half of training (the expert load histogram of each run is in its ``metrics.jsonl``, ``moe/load``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.experiments._stdlib_runs import eval_curve, train_fresh
from jaxlab.models.lm_training import LMTrainConfig
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.validation import check_positive

VARIANTS = {"dense": dict(ffn="swiglu"), "moe-aux": dict(ffn="moe", moe_balance="aux_loss"),
            "moe-bias": dict(ffn="moe", moe_balance="bias")}
"""Both MoEs route by softmax scores (``--moe-gate``). DeepSeek-V3's sigmoid affinities were tried at the quick
size too: every MoE lost to dense there (validation loss 2.590 aux, 2.625 bias, against dense 2.567)."""
LOSS_TOLERANCE = 0.01
"""Bias balancing "costs no quality": its validation loss within this fraction of the auxiliary loss's."""
CITATION = ("Fedus et al. 2021 (Switch Transformers); Dai et al. 2024 (DeepSeekMoE); Wang et al. 2024 "
            "(Auxiliary-Loss-Free Load Balancing); DeepSeek-AI 2024 (DeepSeek-V3)")


@dataclasses.dataclass(frozen=True)
class MoEBalanceConfig:
    """Sizes of the dense / MoE comparison."""

    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    shared_experts: int = 1
    lr: float = 3e-3
    warmup_steps: int = 100
    eval_every: int = 100
    eval_batches: int = 8
    max_documents: int | None = None

    def __post_init__(self):
        check_positive(self, "steps", "eval_every", integer=True)
        if self.eval_every > self.steps:
            raise ValueError(f"eval_every={self.eval_every} must be <= steps={self.steps}")
        for name in VARIANTS:
            self.train_config(name, seed=0)  # LMTrainConfig validates the sizes (top_k <= num_experts, ...)

    def train_config(self, variant: str, seed: int) -> LMTrainConfig:
        return LMTrainConfig(mesh="data=1", steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
                             d_model=self.d_model, num_layers=self.num_layers, num_heads=self.num_heads,
                             num_experts=self.num_experts, top_k=self.top_k, shared_experts=self.shared_experts,
                             lr=self.lr, warmup_steps=self.warmup_steps, eval_every=self.eval_every,
                             eval_batches=self.eval_batches, sample_every=0, log_every=max(self.eval_every // 4, 1),
                             checkpoint_every=self.steps, max_documents=self.max_documents, seed=seed,
                             resume=False, progress=False, **VARIANTS[variant])


def load_imbalance(records: list[dict], steps: int) -> dict[str, float]:
    """Mean over the logged training steps of the second half of ``MaxVio`` (``moe/max_load - 1``) and of
    the load's coefficient of variation."""
    late = [r for r in records if "moe/max_load" in r and r["step"] > steps // 2]
    return {"max_vio": float(np.mean([r["moe/max_load"] - 1 for r in late])),
            "load_cv": float(np.mean([r["moe/load_cv"] for r in late]))}


@register_experiment("moe-balance", description="dense vs MoE at equal active parameters; aux-loss vs bias balancing",
                     paper="Fedus et al. 2021; Wang et al. 2024 (auxiliary-loss-free balancing); DeepSeek-V3",
                     quick_seconds=85,
                     quick=MoEBalanceConfig(steps=300, seq_len=128, d_model=64, num_layers=2, lr=3e-3,
                                            warmup_steps=30, eval_every=50, eval_batches=4))
def moe_balance(cfg: MoEBalanceConfig, ctx: RunContext) -> ExperimentResult:
    curves, final, imbalance, params = {}, {}, {}, {}
    for name in ctx.progress(list(VARIANTS), desc="variants"):
        summary, records = train_fresh(cfg.train_config(name, ctx.seed), ctx.out_dir / "moe-balance-runs" / name)
        curves[name], final[name], params[name] = eval_curve(records), summary["val_loss"], summary["num_params"]
        if name != "dense":
            imbalance[name] = load_imbalance(records, cfg.steps)
        ctx.log(f"{name}: validation loss {final[name]:.4f}"
                + (f", MaxVio {imbalance[name]['max_vio']:.3f}" if name in imbalance else ""))

    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    for name, curve in curves.items():
        axes[0].plot(*zip(*curve), marker="o", label=name)
    axes[0].set(xlabel="step", ylabel="validation loss (nats/byte)", title="loss at equal active FLOPs")
    axes[0].legend()
    names = list(imbalance)
    axes[1].bar(np.arange(len(names)), [imbalance[n]["max_vio"] for n in names], 0.5)
    axes[1].set(xticks=np.arange(len(names)), xticklabels=names, ylabel="MaxVio (second half)",
                title="expert load imbalance")
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    aux, bias = imbalance["moe-aux"], imbalance["moe-bias"]
    claims = (
        Claim("an MoE with as many active feed-forward FLOPs per token as the dense model reaches a lower "
              "validation loss (Fedus et al. 2021, Fig. 1; Dai et al. 2024)",
              holds=final["moe-aux"] < final["dense"],
              evidence=f"moe-aux {final['moe-aux']:.4f} ({params['moe-aux']:,} parameters) vs dense "
                       f"{final['dense']:.4f} ({params['dense']:,})"),
        Claim("auxiliary-loss-free bias balancing leaves the experts more evenly loaded than the auxiliary loss "
              "(lower MaxVio; Wang et al. 2024)",
              holds=bias["max_vio"] < aux["max_vio"],
              evidence=f"MaxVio bias {bias['max_vio']:.3f} vs aux loss {aux['max_vio']:.3f} (load CV "
                       f"{bias['load_cv']:.3f} vs {aux['load_cv']:.3f})"),
        Claim(f"bias balancing costs no quality: validation loss within {LOSS_TOLERANCE:.0%} of the auxiliary "
              "loss's, or lower (Wang et al. 2024)",
              holds=final["moe-bias"] <= final["moe-aux"] * (1 + LOSS_TOLERANCE),
              evidence=f"moe-bias {final['moe-bias']:.4f} vs moe-aux {final['moe-aux']:.4f}"))
    comparisons = tuple(Comparison(f"{n}: validation loss" + (" / MaxVio" if n in imbalance else ""),
                                   f"{final[n]:.4f}" + (f" / {imbalance[n]['max_vio']:.3f}" if n in imbalance else ""),
                                   None, CITATION) for n in VARIANTS)
    summary = (f"{cfg.steps} steps, d={cfg.d_model}, {cfg.num_layers} layers; MoE: {cfg.num_experts} experts, "
               f"top-{cfg.top_k}, {cfg.shared_experts} shared, each a 1/{cfg.top_k + cfg.shared_experts} slice of "
               "the dense feed-forward (equal active FLOPs). Validation loss: "
               + ", ".join(f"{n} {final[n]:.4f}" for n in VARIANTS)
               + f". Load imbalance over the second half (MaxVio, load CV): aux loss {aux['max_vio']:.3f}, "
                 f"{aux['load_cv']:.3f}; bias {bias['max_vio']:.3f}, {bias['load_cv']:.3f}.")
    return ExperimentResult(metrics={"curves": curves, "final_loss": final, "imbalance": imbalance,
                                     "num_params": params},
                            comparisons=comparisons, summary=summary, claims=claims)
