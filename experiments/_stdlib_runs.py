"""Shared piece of the experiments that train byte-level LMs on the stdlib corpus with ``jaxlab train lm``'s
driver: one fresh run per configuration, its validation curve read back from ``metrics.jsonl``."""

from __future__ import annotations

import pathlib
import shutil

from jaxlab.metrics import MetricsWriter
from jaxlab.models.lm_training import LMTrainConfig, train_lm


def train_fresh(cfg: LMTrainConfig, run_dir: pathlib.Path) -> tuple[dict, list[dict]]:
    """Train ``cfg`` from scratch in ``run_dir`` (removed first) -> (summary, every metrics record)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = train_lm(cfg, run_dir)
    return summary, MetricsWriter.read(run_dir / "metrics.jsonl")


def eval_curve(records: list[dict], key: str = "eval/loss") -> list[tuple[int, float]]:
    """``(step, value)`` of every evaluation in a run's records."""
    return [(r["step"], r[key]) for r in records if key in r]


def train_flops(num_params: int, tokens: int) -> float:
    """Training FLOPs by the usual ``6 N D`` count (Kaplan et al. 2020): forward and backward matmuls."""
    return 6.0 * num_params * tokens
