"""`gui-grounding`: the config's errors, the agents' configurations (the same but for the grounding), and a tiny
run of both agents end to end (claims named, metrics in range, the figure written)."""

import dataclasses
import json
import math

import numpy as np
import pytest

from jaxlab import registry
from jaxlab.context import RunContext
from jaxlab.experiments import gui_grounding
from jaxlab.experiments.gui_grounding import GUIGroundingConfig


def test_config_errors():
    with pytest.raises(ValueError, match="sft_steps=0"):
        GUIGroundingConfig(sft_steps=0)
    with pytest.raises(ValueError, match="sft_evals=5 must be <= sft_steps=4"):
        GUIGroundingConfig(sft_steps=4, grpo_steps=8, sft_evals=5)
    with pytest.raises(ValueError, match="kinds="):
        GUIGroundingConfig(kinds=("click", "drag"))


def test_agents_differ_only_in_grounding():
    cfg = GUIGroundingConfig()
    pointer, text = (dataclasses.asdict(cfg.agent_config(g, 3)) for g in ("pointer", "text"))
    assert pointer.pop("grounding") == "pointer" and text.pop("grounding") == "text"
    assert pointer.pop("grpo_steps") == cfg.grpo_steps and text.pop("grpo_steps") == 0
    assert pointer == text and pointer["seed"] == 3 and pointer["steps"] == cfg.sft_steps


def test_binomial_se():
    assert gui_grounding.binomial_se(0.5, 100) == pytest.approx(0.05)
    assert gui_grounding.binomial_se(0.0, 10) == 0.0


def test_tiny_run_end_to_end(tmp_path):
    exp = registry.get_experiment("gui-grounding")
    cfg = dataclasses.replace(exp.quick, sft_steps=2, grpo_steps=2, train_tasks=6, eval_tasks=3, sft_evals=1,
                              grpo_prompts=2, group_size=2, fast_compile=True)
    result = exp.fn(cfg, RunContext(name="gui-grounding", out_dir=tmp_path, quick=True, seed=0))
    assert len(result.claims) == 3 and all(isinstance(c.holds, bool) for c in result.claims)
    m = result.metrics
    for table in (m["click_accuracy"], m["task_success"]):
        assert set(table) == {"text", "sft", "grpo"} and all(0.0 <= v <= 1.0 for v in table.values())
    assert m["click_steps"] > 0 and m["eval_tasks"] == 3
    assert all(0.0 <= v <= 1.0 for v in m["click_accuracy_sampled"].values())  # eval_samples > 0: measured
    assert set(m["click_accuracy_argmax"]) == {"sft", "grpo"}  # the region readout's argmax comparison
    assert all(0.0 <= v <= 1.0 for v in m["click_accuracy_argmax"].values())
    assert m["curves"]["pointer"]["grpo"]["steps"][-1] == 2 and m["curves"]["text"]["sft"]["steps"][-1] == 2
    assert "pointer" in m["num_params"]["pointer"] and "pointer" not in m["num_params"]["text"]
    assert (tmp_path / "gui-grounding.png").stat().st_size > 0
    json.dumps(m)  # serialisable
    assert not any(isinstance(v, float) and math.isnan(v) for v in m["click_accuracy"].values())
    assert np.isfinite(m["seconds"]["pointer_grpo"])
