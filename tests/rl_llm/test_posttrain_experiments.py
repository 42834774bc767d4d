"""Smoke runs of the post-training experiments at a tiny size: they finish, write a figure, start at the SFT
reference and move off it."""

from jaxlab.context import RunContext
from jaxlab.registry import Claim, get_experiment


def _run(name, tmp_path, **overrides):
    import dataclasses

    exp = get_experiment(name)
    cfg = dataclasses.replace(exp.quick, fast_compile=True, **overrides)
    ctx = RunContext(name, tmp_path, quick=True, show_progress=False)
    result = exp.fn(cfg, ctx)
    assert ctx.figure_path.exists()
    assert result.claims and all(isinstance(c, Claim) for c in result.claims)
    return result


def test_grpo_reasoning_smoke(tmp_path):
    result = _run("grpo-reasoning", tmp_path, num_digits=1, d_model=32, num_layers=1, sft_steps=30, steps=4,
                  batch_size=4, group_size=4, eval_every=2, eval_problems=32)
    m = result.metrics
    assert m["steps"] == [0, 2, 4] and all(1 <= n <= 6 for n in m["response_length"])
    # The run starts at the SFT reference and its GRPO updates move the policy away from it.
    assert abs(m["kl_to_ref"][0]) < 1e-4 and m["kl_to_ref"][-1] > 1e-3
    assert result.summary and result.comparisons


def test_posttrain_compare_smoke(tmp_path):
    result = _run("posttrain-compare", tmp_path, methods=("sft", "dpo", "ppo-rlhf"), num_digits=1, d_model=32,
                  num_layers=1, sft_steps=30, steps=3, rm_steps=3, batch_size=4, group_size=4, pair_prompts=64,
                  eval_problems=32)
    methods = result.metrics["methods"]
    assert list(methods) == ["sft", "dpo", "ppo-rlhf"] and abs(methods["sft"]["kl_to_ref"]) < 1e-4
    # The SFT model is every method's reference: SFT alone stays on it, DPO and PPO move off it.
    assert methods["dpo"]["kl_to_ref"] > 1e-3 and methods["ppo-rlhf"]["kl_to_ref"] > 1e-3


def test_r1_zero_smoke(tmp_path):
    result = _run("r1-zero", tmp_path, d_model=32, num_layers=1, pretrain_steps=20, steps=4, batch_size=4,
                  group_size=4, eval_every=2, eval_problems=32, log_rollouts=2)
    m = result.metrics
    # The curves start at the base model (step 0, no SFT: it is its own reference) and RL moves off it.
    assert m["steps"] == [0, 2, 4] and abs(m["kl_to_ref"][0]) < 1e-4 and abs(m["kl_to_ref"][-1]) > 1e-3
    assert all(1 <= n <= 64 for n in m["response_length"]) and all(0 <= s <= 1 for s in m["think_steps"])
    assert m["length_growth"] == m["response_length"][-1] / m["response_length"][0]
    examples = m["rollout_examples"]
    assert len(examples["first_step"]) == 2 and all("=<think>" in r for r in examples["last_step"])
    assert [c.claim[:12] for c in result.claims] == ["RL from the ", "the mean res", "the share of"]
