"""GRPO on a fixed problem pool (Kimi k1.5's curriculum and prioritised sampling) and the JSONL rollout log.

Every run shares one tiny configuration (``BASE``; the sampling mode and the rollout log change no compiled
shape), so the GRPO step, the pool's draw and the evaluation compile once per process.
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlab.rl.llm.losses import kimi_length_reward
from jaxlab.rl.llm.posttrain import PostTrainConfig, ProblemPool, posttrain
from jaxlab.rl.llm.task import Task, TextTask, decode

BASE = PostTrainConfig(method="grpo", task="add", num_digits=2, d_model=32, num_layers=1, num_heads=2, sft_steps=0,
                       steps=4, batch_size=4, group_size=2, eval_problems=8, eval_every=4, log_every=2,
                       checkpoint_every=2, progress=False, mesh="data=1", problem_pool=16, length_penalty=0.5,
                       length_penalty_warmup=1, fast_compile=True)
"""No SFT: the initial model is never right, so Kimi's length reward (on the wrong answers of a group of varied
lengths) is what moves the policy, from the second step on (the first is the warm-up without it)."""
ROWS = BASE.batch_size * BASE.group_size


def _operands(prompt) -> tuple[int, int]:
    a, b = decode(prompt).rstrip("=").split("+")
    return int(a), int(b)


def _checkpoint(out, step):
    """(train state, data state) of the GRPO stage's checkpoint at ``step``."""
    path = (out / "grpo" / "checkpoints" / str(step)).absolute()
    return (ocp.StandardCheckpointer().restore(path / "state"),
            json.loads((path / "data" / "metadata").read_text())["data"])


def _rollouts(out) -> list[dict]:
    return [json.loads(line) for line in (out / "grpo" / "rollouts.jsonl").read_text().splitlines()]


def test_pool_levels_follow_the_larger_operand_and_keep_one_prompt_length():
    task = Task("add", 3)
    prompts, answers, levels = jax.jit(lambda k: task.sample_levels(k, 96))(jax.random.PRNGKey(3))
    assert prompts.shape == (96, task.prompt_len) and answers.shape == (96, task.answer_len)
    for prompt, answer, level in zip(np.asarray(prompts), np.asarray(answers), np.asarray(levels)):
        a, b = _operands(prompt)
        assert len(decode(prompt)) == 2 * 3 + 2  # zero-padded operands
        assert level == len(str(max(a, b))) - 1, (a, b, level)
        assert decode(answer) == str(a + b)
    assert set(np.asarray(levels).tolist()) == {0, 1, 2}
    assert np.bincount(np.asarray(levels)).min() >= 20  # levels drawn equally often (32 expected each)
    with pytest.raises(ValueError, match="kind='sort'"):
        Task("sort", 3).sample_levels(jax.random.PRNGKey(0), 4)


def test_text_task_levels_and_text_follow_the_character_task():
    tokenizers = pytest.importorskip("tokenizers")
    from jaxlab.models.hub import HFTokenizer

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=24, special_tokens=["<pad>", "</s>"],
                                             initial_alphabet=list("0123456789+="))
    tok.train_from_iterator([f"{a:02d}+{b:02d}={a + b}" for a in range(0, 100, 7) for b in range(0, 100, 11)],
                            trainer)
    task = TextTask("add", 2, HFTokenizer(tok, {"eos_token": "</s>", "pad_token": "<pad>"}))
    key = jax.random.PRNGKey(5)
    prompts, answers, levels = task.sample_levels(key, 8)
    chars, char_answers, char_levels = task.base.sample_levels(key, 8)
    np.testing.assert_array_equal(levels, char_levels)
    assert prompts.shape == (8, task.prompt_len) and task.num_levels == 2
    for p, a, cp, ca in zip(*(np.asarray(x) for x in (prompts, answers, chars, char_answers))):
        assert task.text(p, until_eos=False) == decode(cp) and task.text(a) == decode(ca)


def test_curriculum_opens_only_level_zero_at_the_start():
    task = Task("add", 3)
    pool = ProblemPool(task, 64, 16, jax.random.PRNGKey(1), jax.random.PRNGKey(2), "curriculum", steps=30,
                       group_size=2)
    levels = np.asarray(pool.levels)
    assert set(levels.tolist()) == {0, 1, 2}
    for i in range(3):  # progress 0, 1/30, 2/30: only level 0 is open
        batch = next(pool)
        assert (levels[np.asarray(pool.last)] == 0).all()
        assert all(max(_operands(p)) < 10 for p in np.asarray(batch["prompts"]))
        pool.record(np.ones(16 * 2, np.float32) * (i % 2))
    by_level = pool.stats_by_level()  # three steps of level 0, the second one all right
    assert by_level["attempts"] == [96.0, 0.0, 0.0]
    assert by_level["success_rate"] == [pytest.approx(1 / 3), 0.0, 0.0]
    pool.set_state({**pool.get_state(), "index": 20})  # progress 2/3: every level
    drawn = np.concatenate([np.asarray((next(pool), pool.last)[1]) for _ in range(4)])
    assert set(levels[drawn].tolist()) == {0, 1, 2}
    assert float(np.sum(pool.stats.attempts)) == 3 * 16 * 2 and float(np.sum(pool.stats.successes)) == 16 * 2
    pool.record(np.ones(16 * 2, np.float32))  # the last batch (every level open) all right
    counts = np.bincount(levels[np.asarray(pool.last)], minlength=3) * 2.0  # attempts of the batch per level
    expected = (counts + [32, 0, 0]) / np.maximum(counts + [96, 0, 0], 1)
    assert pool.stats_by_level()["success_rate"] == pytest.approx(expected.tolist())


def test_prioritized_pool_counts_every_attempt_resumes_exactly_and_logs_rollouts(tmp_path):
    cfg = dataclasses.replace(BASE, problem_sampling="prioritized", log_rollouts=ROWS)
    summary = posttrain(cfg, tmp_path)
    assert summary["problem_pool"]["attempts"] == cfg.steps * ROWS
    assert abs(summary["final"]["kl_to_ref"]) > 1e-4  # the policy moved: resuming has something to reproduce
    state, data = _checkpoint(tmp_path, cfg.steps)
    assert data["index"] == cfg.steps and sum(data["attempts"]) == cfg.steps * ROWS
    assert sum(data["successes"]) <= sum(data["attempts"]) and all(a % cfg.group_size == 0 for a in data["attempts"])

    records = _rollouts(tmp_path)
    assert [r["step"] for r in records] == [s for s in range(1, cfg.steps + 1) for _ in range(ROWS)]
    for r in records:
        assert set(r) >= {"prompt", "response", "reward", "correct", "length", "problem", "level"}
        a, b = (int(x) for x in r["prompt"].rstrip("=").split("+"))
        assert len(r["prompt"]) == 2 * cfg.num_digits + 2 and r["level"] == len(str(max(a, b))) - 1
        # the verifier on the decoded text: the answer's digits, then EOS (length counts it)
        assert r["correct"] == (r["response"] == str(a + b) and r["length"] == len(r["response"]) + 1)
        assert 1 <= r["length"] <= cfg.response_len and 0 <= r["problem"] < cfg.problem_pool
    lengths, correct = (np.array([r[k] for r in records], np.float32) for k in ("length", "correct"))
    penalised = np.array([r["step"] > cfg.length_penalty_warmup for r in records])  # the warm-up step has none
    length_reward = np.asarray(kimi_length_reward(lengths, correct, cfg.group_size))
    assert np.any(length_reward[~penalised] != 0)  # the warm-up's rewards would differ with the penalty
    expected = correct + cfg.length_penalty * penalised * length_reward
    np.testing.assert_allclose([r["reward"] for r in records], expected, rtol=1e-6)
    assert len({r["response"] for r in records}) > 1

    shutil.rmtree(tmp_path / "grpo" / "checkpoints" / str(cfg.steps))  # killed after step 2's checkpoint
    resumed = posttrain(cfg, tmp_path)
    assert resumed["resumed_from"] == 2
    state2, data2 = _checkpoint(tmp_path, cfg.steps)
    assert data2 == data
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
        np.testing.assert_array_equal(x, y)
    assert [r["step"] for r in _rollouts(tmp_path)] == [r["step"] for r in records]  # steps 3, 4 logged once


def test_curriculum_run_draws_level_zero_first(tmp_path, monkeypatch):
    import jaxlab.rl.llm.posttrain as posttrain_module

    evaluated = []  # the prompts of every evaluation

    def recording(model, params, ref_params, prompts, *args, **kwargs):
        evaluated.append(np.asarray(prompts))
        return evaluate_policy(model, params, ref_params, prompts, *args, **kwargs)

    evaluate_policy = posttrain_module.evaluate_policy
    monkeypatch.setattr(posttrain_module, "evaluate_policy", recording)
    cfg = dataclasses.replace(BASE, problem_sampling="curriculum+prioritized", log_rollouts=100)
    summary = posttrain(cfg, tmp_path)
    # after the start policy's evaluation, its accuracy by level: on the pool's problems of one level at a time
    largest = [[max(_operands(p)) for p in prompts] for prompts in evaluated[1:3]]
    assert len(largest[0]) == len(largest[1]) == cfg.eval_problems
    assert max(largest[0]) < 10 <= min(largest[1])
    assert summary["problem_pool"]["attempts"] == cfg.steps * ROWS
    records = _rollouts(tmp_path)
    assert len(records) == cfg.steps * ROWS  # up to 100 a step: every response
    # two levels over four steps: level 1 opens at progress 1/2, i.e. the third step
    assert all(r["level"] == 0 for r in records if r["step"] <= 2)
    # the summary's per-level outcomes are the logged rollouts' (every response is logged)
    levels = summary["problem_pool"]["levels"]
    for level in (0, 1):
        correct = [r["correct"] for r in records if r["level"] == level]
        assert levels["attempts"][level] == len(correct) > 0
        assert levels["success_rate"][level] == pytest.approx(np.mean(correct))
    assert len(levels["start_accuracy"]) == 2 and all(0 <= a <= 1 for a in levels["start_accuracy"])


@pytest.mark.parametrize("kwargs, match", [
    ({"problem_sampling": "hardest"}, "problem_sampling='hardest'"),
    ({"problem_sampling": "prioritized", "problem_pool": 0}, "problem_pool > 0"),
    ({"problem_pool": -1}, "problem_pool=-1"), ({"log_rollouts": -2}, "log_rollouts=-2"),
    ({"method": "dpo", "problem_sampling": "prioritized"}, "problem_sampling='prioritized' is for method='grpo'"),
    ({"method": "ppo-rlhf", "problem_pool": 0, "log_rollouts": 4}, "log_rollouts=4 is for method='grpo'"),
    ({"task": "sort", "num_digits": 3, "problem_sampling": "curriculum"}, "task='sort'")])
def test_invalid_sampling_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(BASE, **kwargs)
