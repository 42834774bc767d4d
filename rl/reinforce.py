"""REINFORCE with a learned baseline (Williams 1992, "Simple Statistical Gradient-Following
Algorithms for Connectionist Reinforcement Learning"; Sutton & Barto 2018, Sec. 13.4).

The policy gradient ``E[sum_t (G_t - b(s_t)) grad log pi(a_t|s_t)]`` with Monte-Carlo returns
``G_t`` (discounted rewards to the end of the episode) and a state-value baseline ``b = V`` fitted by
regression on ``G_t``. Episodes are collected ``num_envs`` at a time in rollouts of ``rollout_length``
steps; a return that the rollout cuts short (the episode continues past it, or a time limit ends it)
is completed with the baseline's value of the state where it was cut, the usual finite-batch form.
One gradient step per rollout.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxlab.rl.core import Train
from jaxlab.rl.on_policy import (ActorCritic, OnPolicyConfig, make_on_policy_train, n_step_estimator,
                                 policy_gradient_learn)
from jaxlab.validation import check_positive

__all__ = ["REINFORCEConfig", "make_train"]


@dataclasses.dataclass(frozen=True)
class REINFORCEConfig(OnPolicyConfig):
    """REINFORCE hyperparameters; defaults tuned for CartPole-v1."""

    ALGO: ClassVar[str] = "REINFORCE"

    num_envs: int = 8
    rollout_length: int = 256
    learning_rate: float = 3e-3
    """Adam step size (one update per 2048 steps: 244 updates in 5e5 steps, so larger than A2C's)."""
    max_grad_norm: float = 0.5
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Baseline (value) loss coefficient."""
    normalize_advantages: bool = True
    """Standardise G_t - b(s_t) over the batch."""

    def __post_init__(self):
        check_positive(self, "ent_coef", "vf_coef", minimum=0)
        super().__post_init__()


def make_train(cfg: REINFORCEConfig) -> Train:
    """``train(key) -> {"state", "metrics"}`` for REINFORCE with baseline; jit- and vmap-able."""
    ac = ActorCritic.from_config(cfg, cfg.action_spec)
    optimizer = cfg.optimizer()
    learn = policy_gradient_learn(ac, optimizer, ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef,
                                  normalize=cfg.normalize_advantages)
    return make_on_policy_train(cfg, ac, init_opt=optimizer.init, learn=learn,
                                estimator=n_step_estimator(cfg.gamma, cfg.rollout_length))
