"""Kimi k1.5's long2short (section 2.4): the shortest correct sample and the preference pairs by hand, and
the posttrain stage (rejection sampling and DPO) end to end on a tiny model, after a GRPO stage on partial
rollouts (section 2.6.2)."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlab.rl.llm.long2short import long2short_indices, long2short_pairs, shortest_correct
from jaxlab.rl.llm.posttrain import PostTrainConfig, posttrain

LENGTHS = np.array([[5, 3, 3, 7],    # correct: 0, 1, 2 -> shortest 1 (tie with 2: the first)
                    [4, 6, 2, 9],    # nothing correct
                    [6, 2, 8, 3],    # correct: 1, 3 (3 < 1.5 * 2: not a negative); wrong 0 (6), 2 (8)
                    [2, 2, 2, 2],    # correct: 0 only; the wrong ones are no longer: no pair
                    [4, 9, 6, 1]])   # correct: 0, 1, 2; 9 and 6 >= 1.5 * 4 -> the longest, 1; wrong 3 shorter
CORRECT = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 0]], bool)


def test_shortest_correct_by_hand():
    index, has_any = shortest_correct(LENGTHS, CORRECT)
    np.testing.assert_array_equal(np.asarray(has_any), [True, False, True, True, True])
    np.testing.assert_array_equal(np.asarray(index), [1, 0, 1, 0, 0])
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        shortest_correct(LENGTHS[0], CORRECT[0])


def test_long2short_pairs_by_hand():
    chosen, rejected, valid = long2short_indices(LENGTHS, CORRECT)
    np.testing.assert_array_equal(np.asarray(valid), [True, False, True, False, True])
    np.testing.assert_array_equal(np.asarray(chosen)[[0, 2, 4]], [1, 1, 0])
    # row 0: wrong 3 (7 > 3) and correct 0 (5 >= 4.5): the longest, 3; row 2: wrong 2 (8) over wrong 0 (6)
    np.testing.assert_array_equal(np.asarray(rejected)[[0, 2, 4]], [3, 2, 1])
    # a looser ratio makes row 2's correct sample 3 (3 >= 1.4 * 2) a negative too; the longest is still 2
    _, rejected, _ = long2short_indices(LENGTHS, CORRECT, long_ratio=1.4)
    assert int(rejected[2]) == 2
    tokens = jnp.arange(5 * 4 * 3).reshape(5, 4, 3)  # [N, k, L]: sample (n, i) is 12 n + 3 i + (0, 1, 2)
    chosen_tokens, rejected_tokens, valid = long2short_pairs(tokens, LENGTHS, CORRECT)
    np.testing.assert_array_equal(np.asarray(chosen_tokens[0]), [3, 4, 5])
    np.testing.assert_array_equal(np.asarray(rejected_tokens[4]), [51, 52, 53])
    with pytest.raises(ValueError, match="long_ratio"):
        long2short_indices(LENGTHS, CORRECT, long_ratio=0.5)


TINY = PostTrainConfig(method="grpo", task="add", num_digits=1, d_model=32, num_layers=1, num_heads=2, sft_steps=60,
                       sft_batch_size=32, steps=6, batch_size=2, group_size=2, eval_problems=16, eval_every=6,
                       log_every=1, checkpoint_every=3, progress=False, mesh="data=1", rollout_budget=2,
                       pair_prompts=64, long2short_samples=4, long2short_steps=2, fast_compile=True)
"""Kimi's pipeline in small: GRPO on partial rollouts (R = 4 response tokens: answers of up to 2 digits, EOS, 2
more; in segments of 2, so a pool spans up to 2 steps), then long2short from its policy."""


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_posttrain_partial_rollouts_then_long2short(tmp_path):
    """GRPO with rollout_budget: unfinished groups carry over in the checkpointed state and a resumed run
    repeats the uninterrupted one; then both long2short modes from its policy in the same folder (the second run
    resumes the finished SFT and GRPO stages and trains its own long2short-dpo/ stage)."""
    summary = posttrain(dataclasses.replace(TINY, long2short="rejection"), tmp_path)
    records = _records(tmp_path / "grpo" / "metrics.jsonl")
    trained = [r["trained_groups"] for r in records if "trained_groups" in r]
    position = [r["rollout_t"] for r in records if "rollout_t" in r]
    assert len(trained) == len(position) == TINY.steps and 0 in trained  # a step whose pool is in flight
    span = -(-TINY.response_len // TINY.rollout_budget)  # steps a pool lasts at most
    starts = [i for i in range(TINY.steps) if position[i] == TINY.rollout_budget] + [TINY.steps]  # new pools
    assert starts[0] == 0 and len(starts) >= 3, position  # a second pool started once the first was spent
    for begin, end in zip(starts[:-2], starts[1:-1]):  # every group of a spent pool is trained on exactly once
        assert end - begin <= span and sum(trained[begin:end]) == TINY.batch_size, (trained, position)
    checkpoints = tmp_path / "grpo" / "checkpoints"
    final = ocp.StandardCheckpointer().restore((checkpoints / "6" / "state").absolute())
    assert np.asarray(final["pool"]["trained"]).shape == (TINY.batch_size,)

    for mode in ("rejection", "dpo"):
        if mode == "dpo":  # resume GRPO from step 3 (rollouts in flight in the checkpoint): the same steps 4-6
            shutil.rmtree(checkpoints / "6")
            summary = posttrain(dataclasses.replace(TINY, long2short=mode), tmp_path)
            assert summary["resumed_from"] == 3
            again = ocp.StandardCheckpointer().restore((checkpoints / "6" / "state").absolute())
            for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(final)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        info = summary["long2short"]
        assert info["mode"] == mode and info["examples"] >= 1 and info["batch_size"] >= 1
        for stage in ("before", "after"):
            assert {"accuracy", "response_length", "greedy_accuracy"} <= set(info[stage])
        assert info["after"] == summary["final"] and len(info["history"]) == 1
        records = _records(tmp_path / f"long2short-{mode}" / "metrics.jsonl")
        assert [r["step"] for r in records if "loss" in r] == [1, 2]
        assert any("eval/response_length" in r for r in records)
        assert (tmp_path / f"long2short-{mode}" / "checkpoints").is_dir()
        assert json.loads((tmp_path / "summary-grpo.json").read_text())["long2short"]["mode"] == mode


def test_long2short_config_is_checked():
    with pytest.raises(ValueError, match="long2short='short'"):
        PostTrainConfig(long2short="short")
    with pytest.raises(ValueError, match="method='dpo'"):
        PostTrainConfig(method="dpo", long2short="rejection")
    with pytest.raises(ValueError, match="long2short_samples=1"):
        PostTrainConfig(long2short="dpo", long2short_samples=1)
