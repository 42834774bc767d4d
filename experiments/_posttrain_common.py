"""Shared pieces of the post-training experiments: the base configuration they sweep from."""

from __future__ import annotations

import dataclasses

from jaxlab.rl.llm.posttrain import PostTrainConfig

CITATIONS = ("DeepSeek-AI 2025, DeepSeek-R1 (arXiv:2501.12948); Shao et al. 2024, DeepSeekMath (GRPO); "
             "Rafailov et al. 2023, DPO; Ouyang et al. 2022, InstructGPT; Liu et al. 2025, Understanding "
             "R1-Zero-Like Training (Dr. GRPO); Kimi Team 2025, Kimi k1.5")


def run_config(cfg, method: str, **overrides) -> PostTrainConfig:
    """A :class:`PostTrainConfig` for ``method`` from an experiment config's shared fields, on one device
    whatever the machine has (the figures compare methods on the same program)."""
    fields = {f.name for f in dataclasses.fields(PostTrainConfig)}
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in fields}
    return PostTrainConfig(**{"mesh": "data=1", **shared, "method": method, "progress": False, **overrides})
