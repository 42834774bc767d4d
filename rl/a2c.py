"""Advantage Actor-Critic, the synchronous form of A3C (Mnih et al. 2016, "Asynchronous Methods for
Deep Reinforcement Learning", Algorithm S3).

``num_envs`` actors step in lockstep for ``rollout_length`` steps; every step's advantage is
``G_t - V(s_t)`` with the ``n``-step return ``G_t`` (by default the longest the rollout holds:
bootstrapped from ``V`` at the rollout's end, at time limits from the pre-reset observation, and not
past terminal states); then one gradient step on ``-E[log pi(a|s) A] + vf_coef L^V - ent_coef H``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxlab.rl.core import Train
from jaxlab.rl.on_policy import (ActorCritic, OnPolicyConfig, make_on_policy_train, n_step_estimator,
                                 policy_gradient_learn)
from jaxlab.validation import check, check_positive

__all__ = ["A2CConfig", "make_train"]


@dataclasses.dataclass(frozen=True)
class A2CConfig(OnPolicyConfig):
    """A2C hyperparameters; defaults tuned for CartPole-v1."""

    ALGO: ClassVar[str] = "A2C"

    num_envs: int = 16
    rollout_length: int = 8
    learning_rate: float = 1e-3
    max_grad_norm: float = 0.5
    n_step: int = 0
    """Return horizon n; 0 means rollout_length (each step bootstraps at the rollout's end, as in A3C)."""
    ent_coef: float = 0.01
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    normalize_advantages: bool = False
    """Standardise advantages over the batch."""

    def __post_init__(self):
        check(self.n_step >= 0, f"n_step={self.n_step} must be >= 0 (0: rollout_length)")
        check_positive(self, "ent_coef", "vf_coef", minimum=0)
        super().__post_init__()


def make_train(cfg: A2CConfig) -> Train:
    """``train(key) -> {"state", "metrics"}`` for A2C; jit- and vmap-able."""
    ac = ActorCritic.from_config(cfg, cfg.action_spec)
    optimizer = cfg.optimizer()
    learn = policy_gradient_learn(ac, optimizer, ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef,
                                  normalize=cfg.normalize_advantages)
    return make_on_policy_train(cfg, ac, init_opt=optimizer.init, learn=learn,
                                estimator=n_step_estimator(cfg.gamma, cfg.n_step or cfg.rollout_length))
