"""The GUI-agent trainer (experiments.gui_agent_train): SFT targets of a demonstration by hand (the prompt holds
the previous actions, the loss covers exactly the action text and its <eos>), the step verifier used by the
evaluation and GRPO, a tiny SFT + GRPO run that writes metrics and resumes, config errors."""

import json

import jax
import numpy as np
import pytest

from jaxlab.experiments import gui_agent_train as g
from jaxlab.models.gui_tasks import make_tasks
from jaxlab.models.vlm import pack_examples
from jaxlab.rl.gui import click_in_box, render

TINY = dict(screen_sizes=((96, 128), (128, 160)), patch_size=16, prompt_len=144, max_action_len=18, vit_d_model=16,
            vit_layers=1, vit_heads=2, abs_pos_grid=4, lm_d_model=32, lm_layers=1, lm_heads=2, train_tasks=4,
            eval_tasks=2, rows=2, warmup_steps=0, grpo_prompts=2, group_size=2, step_limit=2, eval_batch=4,
            log_every=1, checkpoint_every=1, eval_every=100, progress=False, fast_compile=True)


def text_of(tokens) -> str:
    return bytes(np.asarray(tokens, np.uint8).tolist()).decode()


def form_task(grounding="pointer"):
    cfg = g.GUIAgentConfig(**TINY, grounding=grounding)
    return cfg, make_tasks(jax.random.PRNGKey(3), 1, cfg.screen_config(), ("form",))[0]


def written(action: str, cfg) -> list[int]:
    """The tokens the policy writes for an action: a click is ``click(<point>)`` under grounding "pointer"."""
    if cfg.grounding == "pointer" and action.startswith("click("):
        return [*b"click(", g.POINT_ID, *b")"]
    return list(action.encode())


@pytest.mark.parametrize("grounding", ["pointer", "text"])
def test_sft_targets_of_a_demonstration_by_hand(grounding):
    cfg, task = form_task(grounding)
    cases = g.step_cases(task)
    actions = [c.action for c in cases]
    assert [a.split("(")[0] for a in actions] == ["click", "type", "click", "finished"]
    for k, case in enumerate(cases):
        ex = g.sft_example(case.state, case.history, case.action, cfg)
        tokens, loss = np.asarray(ex.tokens), np.asarray(ex.loss_mask)
        image = ex.images[0]
        n_image = (image.shape[0] // 32) * (image.shape[1] // 32)
        start = int(np.flatnonzero(tokens == g.IMAGE_ID)[0])
        end = int(np.flatnonzero(tokens == g.ACTION_ID)[0])
        assert (tokens[:start] == 0).all()
        assert start + n_image + (end - start - 1) + 1 == cfg.prompt_len  # PADs, image slots, text, <action>
        assert text_of(tokens[start + 1:end]) == task.instruction + "\n" + "; ".join(actions[:k])
        assert tokens[end + 1:-1].tolist() == written(actions[k], cfg) and tokens[-1] == g.EOS_ID
        np.testing.assert_array_equal(loss, np.arange(len(tokens)) > end)  # the action and <eos> only
        np.testing.assert_array_equal(image, render(case.state).astype(np.float32) / 255.0)
    # packed: the counted targets are exactly the action's bytes and <eos> of each example
    examples = [g.sft_example(c.state, c.history, c.action, cfg) for c in cases]
    batch = pack_examples(examples, seq_len=cfg.seq_len, patch_size=cfg.patch_size, image_len=cfg.image_len,
                          image_token=g.IMAGE_ID, num_rows=4, image_rows=4)
    for e, action in enumerate(actions):
        counted = batch["targets"][batch["mask"] & (batch["example_ids"] == e)]
        assert counted[:-1].tolist() == written(action, cfg) and counted[-1] == g.EOS_ID
    assert int(batch["mask"].sum()) == sum(len(written(a, cfg)) + 1 for a in actions)


def test_sft_batches_carry_the_pointing_targets():
    cfg = g.GUIAgentConfig(**{**TINY, "rows": 4})
    tasks = make_tasks(jax.random.PRNGKey(0), 4, cfg.screen_config(), ("form", "click", "menu"))
    data = g.SFTBatches(tasks, cfg)
    seen = 0
    for _ in range(3):
        start = data.next
        batch = next(data)
        cases = [data.case(k) for k in range(start, start + cfg.rows)]
        for b in range(cfg.rows):
            e = batch["example_ids"][b][batch["example_ids"][b] >= 0][0]
            click = cases[e].target.kind == "click"
            assert bool(batch["has_point"][b]) == click
            if click:
                seen += 1
                assert batch["inputs"][b, batch["point_query"][b]] == g.POINT_ID
                assert batch["example_ids"][b, batch["point_query"][b]] == e
                assert tuple(batch["point_box"][b]) == cases[e].target.box
    assert seen > 0


def test_step_targets_and_reward():
    cfg, task = form_task()
    click, typed, press, done = (c.target for c in g.step_cases(task))
    field = task.screen.widgets[task.steps[0].widget].box
    assert click.kind == "click" and click.box == field  # scroll 0: viewport = page coordinates
    assert typed == g.StepTarget("type", text=task.steps[0].text) and done.kind == "finished"
    x0, y0, x1, y1 = press.box
    assert g.step_reward(f"click({x0}, {y0})", press) == (True, True)
    assert g.step_reward(f"click({x1}, {y0})", press) == (False, True)  # exclusive end
    assert g.step_reward(f'type("{task.steps[0].text}")', typed) == (True, True)
    assert g.step_reward('type("nope")', typed) == (False, True)
    assert g.step_reward("finished()", done) == (True, True)
    assert g.step_reward("finished()", press) == (False, True)
    assert g.step_reward("click(3,", press) == (False, False)
    # a scroll task: the click's box is in the viewport's coordinates after scrolling
    tall = make_tasks(jax.random.PRNGKey(0), 1, cfg.screen_config(), ("scroll",))[0]
    cases = g.step_cases(tall, jitter=1.0, seed=5)
    scrolls = [c for c in cases if c.target.kind == "scroll"]
    last_click = [c for c in cases if c.target.kind == "click"][-1]
    assert scrolls and last_click.state.screen.scroll > 0
    page = tall.screen.widgets[tall.steps[0].widget].box
    assert last_click.target.box == (page[0], page[1] - last_click.state.screen.scroll, page[2],
                                     page[3] - last_click.state.screen.scroll)
    assert click_in_box(last_click.action, last_click.target.box)


def test_action_text():
    assert g.action_text(np.array([*b"finished()", g.EOS_ID, 0, 0])) == "finished()"
    pointed = np.array([*b"click(", g.POINT_ID, *b")", g.EOS_ID, g.POINT_ID])
    assert g.point_slot(pointed) == 6 and g.point_slot(np.array([*b"x", g.EOS_ID, g.POINT_ID])) == -1
    assert g.action_text(pointed, (12, 40)) == "click(12, 40)"
    assert g.action_text(pointed, (11.5, 40.49)) == "click(12, 40)"  # a region's centre: to the nearest pixel
    assert g.action_text(pointed) == "<special token>"  # a <point> nobody resolved does not parse
    assert g.action_text(np.array([*b"click(1, 2)"])) == "click(1, 2)"  # no <eos>: every token
    assert g.step_reward(g.action_text(np.array([g.IMAGE_ID, *b"x", g.EOS_ID])), g.StepTarget("finished")) \
        == (False, False)


def test_smoke_run_writes_metrics_and_resumes(tmp_path):
    first = g.train_gui_agent(g.GUIAgentConfig(steps=2, **TINY), tmp_path)  # SFT only
    assert first["sft/step"] == 2 and first["sft/resumed_from"] is None and "grpo/step" not in first
    for key in ("click_accuracy", "task_success", "step_accuracy", "parse_rate"):
        assert 0.0 <= first[f"sft/eval/{key}"] <= 1.0
    sft = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft if "loss" in r] == [1, 2] and any("eval/task_success" in r for r in sft)
    assert (tmp_path / "sft" / "checkpoints").is_dir()

    # the same folder with GRPO added: SFT resumes at its end, then one GRPO step from the restored policy
    cfg = g.GUIAgentConfig(steps=2, grpo_steps=1, **TINY)
    more = g.train_gui_agent(cfg, tmp_path)
    assert more["sft/resumed_from"] == 2 and more["grpo/resumed_from"] is None and more["grpo/step"] == 1
    assert more["sft/eval/task_success"] == first["sft/eval/task_success"]  # the restored policy, evaluated again
    sft = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft if "loss" in r] == [1, 2]  # nothing retrained
    grpo = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "correct", "kl", "clip_fraction", "loss"} <= set(grpo[0]) and grpo[0]["step"] == 1
    assert grpo[0]["reward"] == pytest.approx(grpo[0]["correct"] + cfg.format_weight * grpo[0]["parse_rate"])
    assert 0.0 <= more["grpo/eval/click_accuracy"] <= 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["grpo/step"] == 1


@pytest.mark.parametrize("field, value, message", [
    ("prompt_len", 40, "prompt_len=40 must leave at least 32 text slots"),
    ("group_size", 1, "group_size"),
    ("kinds", ("bogus",), r"kinds=\('bogus',\)"),
    ("screen_sizes", ((96, 136),), "not multiples of 2 \\* patch_size = 32"),
    ("screen_sizes", ((64, 128),), "sizes="),
    ("warmup_steps", 300, "warmup_steps=300"),
    ("temperature", 0.0, "temperature"),
    ("jitter", 1.5, "jitter"),
    ("grounding", "pixels", "grounding='pixels'"),
    ("pointer_coef", 0.0, "pointer_coef"),
    ("eval_samples", -1, "eval_samples"),
    ("point_readout", "mean", "point_readout='mean'"),
    ("point_threshold", 0.0, "point_threshold=0.0"),
])
def test_bad_config_names_the_field(field, value, message):
    kwargs = {**TINY, field: value}
    with pytest.raises(ValueError, match=message):
        g.GUIAgentConfig(**kwargs)


def test_prompt_too_long_is_an_error():
    cfg, task = form_task()
    case = g.step_cases(task)[-1]
    with pytest.raises(ValueError, match="more than prompt_len=144"):
        g.policy_prompt(case.state, case.history * 8, cfg)
    with pytest.raises(ValueError, match="max_action_len=18"):
        g.sft_example(case.state, (), 'type("abcdefghijk")', cfg)


def _pointing_rollout(cfg, rows: list[list[int]]):
    """An untrained pointer agent's model and parameters, ``len(rows)`` click tasks' first-step prompts and a
    stand-in rollout whose responses are ``rows`` (the fields of a ``Sample`` that ``point_actions`` reads)."""
    tasks = make_tasks(jax.random.PRNGKey(0), len(rows), cfg.screen_config(), ("click",))
    model = g.VLM(cfg.model_config())
    params = g.init_vlm_params(model, jax.random.PRNGKey(1), next(g.SFTBatches(tasks, cfg)))
    cases = [g.step_cases(t)[0] for t in tasks]
    prompts = g.prepare_prompts([g.policy_prompt(c.state, c.history, cfg) for c in cases], image_token=g.IMAGE_ID,
                                patch_size=cfg.patch_size, image_len=cfg.image_len, image_rows=len(rows))
    R = cfg.max_action_len + 1
    response = np.array([r + [g.PAD_ID] * (R - len(r)) for r in rows], np.int32)

    class Roll:
        tokens = np.concatenate([prompts.tokens, response], axis=1)

    Roll.response = response
    return model, params, cases, prompts, Roll


CLICK = [*b"click(", g.POINT_ID, *b")", g.EOS_ID]


def test_pointing_logp_of_the_sampler_equals_the_loss_side():
    """GRPO's pointing column: the log-probability ``point_actions`` records when it samples a patch equals the
    one the update's ``logprobs`` recomputes for that patch (so the first epoch's ratio is 1), and a response
    without ``<point>`` is not counted there."""
    cfg = g.GUIAgentConfig(**TINY, temperature=0.7)
    model, params, cases, prompts, roll = _pointing_rollout(cfg, [CLICK, [*b"finished()", g.EOS_ID]])
    step = g.GRPOStep(model, params, g._optimizer(1e-3, 0, 1, cfg), cfg)
    pointed = g.point_actions(model, params, prompts, roll, jax.random.PRNGKey(2), cfg.temperature)
    assert pointed["has_point"].tolist() == [True, False]
    assert pointed["query"][0] == cfg.prompt_len + 6
    logp = step.ref_logprobs(params, prompts, roll.response, pointed["query"], pointed["index"].astype(np.int32))
    assert logp.shape == (2, cfg.max_action_len + 2)
    np.testing.assert_allclose(float(logp[0, -1]), pointed["logp"][0], rtol=1e-5, atol=1e-5)
    x, y = pointed["point"][0]
    assert 0 <= x < cases[0].state.screen.width and 0 <= y < cases[0].state.screen.height
    assert (x - cfg.patch_size // 2) % cfg.patch_size == 0 and (y - cfg.patch_size // 2) % cfg.patch_size == 0


def test_greedy_region_readout():
    """At temperature 0 the "region" readout clicks the region's weighted centre; at threshold 1 that is the
    most likely patch's centre, the "argmax" readout; sampling is untouched by it."""
    cfg = g.GUIAgentConfig(**TINY)
    model, params, cases, prompts, roll = _pointing_rollout(cfg, [CLICK] * 3)
    point = lambda readout, t=0.0: g.point_actions(model, params, prompts, roll, jax.random.PRNGKey(2), t,  # noqa: E731
                                                   readout)["point"]
    argmax = point(None)
    np.testing.assert_array_equal(point((cfg.patch_size, 1.0)), argmax)
    region = point((cfg.patch_size, 0.3))
    assert region.dtype == np.float64 and not np.array_equal(region, argmax)  # an untrained head spreads its mass
    for (x, y), c in zip(region, cases, strict=True):
        assert 0 <= x < c.state.screen.width and 0 <= y < c.state.screen.height
    np.testing.assert_array_equal(point((cfg.patch_size, 0.3), 1.0), point(None, 1.0))
    pointed = g.point_actions(model, params, prompts, roll, jax.random.PRNGKey(2), 0.0, (cfg.patch_size, 0.3))
    np.testing.assert_array_equal(pointed["patch_point"], argmax)  # the chosen patch's centre, kept beside


def test_eval_reports_the_argmax_readout_beside_the_region_one(monkeypatch):
    """One decoding serves both readouts: with every greedy action ``click(<point>)``, ``click_accuracy_argmax``
    under "region" is the "argmax" run's ``click_accuracy``, and the region readout clicks elsewhere."""
    cfg = g.GUIAgentConfig(**{**TINY, "eval_tasks": 8})
    tasks = make_tasks(jax.random.PRNGKey(3), 8, cfg.screen_config(), ("click",))
    model = g.VLM(cfg.model_config())
    params = g.init_vlm_params(model, jax.random.PRNGKey(1), next(g.SFTBatches(tasks, cfg)))
    R = cfg.max_action_len + 1

    class Roll:  # what sample_vlm returns, as far as the evaluation reads it
        def __init__(self, prompts):
            self.response = np.array([CLICK + [g.PAD_ID] * (R - len(CLICK))] * len(prompts.tokens), np.int32)
            self.tokens = np.concatenate([prompts.tokens, self.response], axis=1)

    monkeypatch.setattr(g, "sample_vlm", lambda model, params, prompts, *args, **kwargs: Roll(prompts))
    region = g.make_eval_fn(model, tasks, cfg)(params)
    argmax = g.make_eval_fn(model, tasks, g.GUIAgentConfig(**{**TINY, "eval_tasks": 8},
                                                           point_readout="argmax"))(params)
    assert region["click_steps"] > 0 and "click_accuracy_argmax" not in argmax
    assert region["click_accuracy_argmax"] == argmax["click_accuracy"]
    assert region["click_accuracy"] != argmax["click_accuracy"]


def test_text_grounding_trains_sft_and_grpo(tmp_path):
    out = g.train_gui_agent(g.GUIAgentConfig(steps=1, grpo_steps=1, grounding="text", **TINY), tmp_path)
    assert out["grpo/step"] == 1 and 0.0 <= out["grpo/eval/click_accuracy"] <= 1.0
    assert "pointer" not in out["num_params"]
