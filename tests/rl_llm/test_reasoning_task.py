"""The think-tag task (R1-Zero's template and rule-based rewards), its base corpus, and R1-Zero's pipeline:
a pretraining stage, then GRPO straight from the base model (``sft_steps=0``)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.llm.base_corpus import DOCUMENT_KINDS, CorpusIterator, corpus_documents, document
from jaxlab.rl.llm.posttrain import PostTrainConfig, posttrain
from jaxlab.rl.llm.stage_data import ProblemPool
from jaxlab.rl.llm.reasoning_task import (THINK_TOKENS, THINK_VOCAB_SIZE, ThinkTask, column_steps, decode_text,
                                          encode_text, reference_verify, worked_solution)
from jaxlab.rl.llm.task import BOS, CHARS, EOS, PAD, TASK_NAMES, Task, encode, make_task


def _rows(texts, length=40, eos=True):
    """Responses [n, length]: each text's tokens, then EOS (if ``eos``), then PAD."""
    out = np.full((len(texts), length), PAD, np.int32)
    for i, text in enumerate(texts):
        ids = encode_text(text) + ([EOS] if eos else [])
        out[i, :len(ids)] = ids
    return jnp.asarray(out)


def test_vocabulary_extends_the_character_task_additively():
    assert THINK_TOKENS[:len(CHARS)] == tuple(CHARS) and THINK_VOCAB_SIZE == 21 > Task().vocab_size == 15
    assert encode_text("07+35=") == encode("07+35=")  # the character task's ids, unchanged
    ids = encode_text("1,2:<think></think><answer></answer>")
    assert len(ids) == 8 and ids[4:] == list(range(17, 21)) and decode_text(ids + [EOS, 5]) == "1,2:" + "".join(
        THINK_TOKENS[-4:])
    with pytest.raises(ValueError, match=r"text='12x' has characters \['x'\]"):
        encode_text("12x")
    assert TASK_NAMES == ("add", "sort", "think-add") and make_task("think-add", 3) == ThinkTask(3)
    assert make_task("sort", 3) == Task("sort", 3)
    with pytest.raises(ValueError, match="task='mul' must be one of"):
        make_task("mul")
    with pytest.raises(ValueError, match=r"num_digits=1 must be an int in \[2, 6\]"):
        ThinkTask(1)


def test_worked_solution_by_hand():
    assert worked_solution(7, 35, 2) == "7+5=12:2,0+3+1=4:42</think><answer>42</answer>"
    assert column_steps(7, 35, 2) == "7+5=12:2,0+3+1=4:42"
    # a slip writes one column's sum off by delta (the other way where that would leave 0..19) and carries on
    assert column_steps(7, 35, 2, slip=(0, 1)) == "7+5=13:3,0+3+1=4:43"
    assert column_steps(99, 99, 2, slip=(1, 1)) == "9+9=18:8,9+9+1=18:188"
    assert column_steps(0, 0, 1, slip=(0, -1)) == "0+0=1:1"
    assert worked_solution(99, 99, 2) == "9+9=18:8,9+9+1=19:198</think><answer>198</answer>"
    assert worked_solution(5, 3, 3) == "5+3=8:8,0+0=0:08,0+0=0:8</think><answer>8</answer>"  # no leading zeros
    assert worked_solution(250, 750, 3) == "0+0=0:0,5+5=10:00,2+7+1=10:1000</think><answer>1000</answer>"


def test_problems_prompts_and_worked_solutions():
    task = ThinkTask(3)
    assert task.prompt_len == 10 and task.answer_len == len(encode_text(worked_solution(999, 999, 3))) + 1 == 42
    assert task.response_budget == 84 and ThinkTask(2).response_budget == 64
    prompts, answers = jax.jit(lambda k: task.sample(k, 64))(jax.random.PRNGKey(0))
    assert prompts.shape == (64, 10) and answers.shape == (64, 42) and np.all(np.asarray(prompts[:, 0]) == BOS)
    for p, a in zip(np.asarray(prompts), np.asarray(answers)):
        m = re.fullmatch(r"(\d{3})\+(\d{3})=<think>", task.text(p))
        assert m, task.text(p)
        x, y = int(m[1]), int(m[2])
        assert task.text(a) == worked_solution(x, y, 3) and EOS in a.tolist()
        assert reference_verify(a, str(x + y)) == (True, True, True)
    rewards, steps = jax.jit(lambda r: (task.rewards(r, r, format_weight=0.5), task.writes_steps(r)))(answers)
    np.testing.assert_array_equal(rewards, 1.5)  # right (1) and well-formed (0.5)
    np.testing.assert_array_equal(steps, 1.0)


# (response text, ends with EOS) -> (correct, well_formed, writes_steps), the answer being 42
CASES = [
    ("7+5=12:2,0+3+1=4:42</think><answer>42</answer>", True, (1, 1, 1)),  # the worked solution
    ("</think><answer>42</answer>", True, (1, 1, 0)),  # no reasoning: right and well-formed, no steps
    ("7+5=12</think><answer>43</answer>", True, (0, 1, 1)),  # wrong answer
    ("7+5=12</think><answer>042</answer>", True, (0, 1, 1)),  # leading zero: not the answer
    ("7+5=12</think>42", True, (0, 0, 1)),  # answer outside the tags
    ("7+5=12<answer>42</answer>", True, (1, 0, 1)),  # no </think>: malformed, the answer still read
    ("7+5=12</think><answer>42</answer><answer>42</answer>", True, (0, 0, 1)),  # answer tags twice
    ("7+5=12</think></think><answer>42</answer>", True, (1, 0, 1)),  # </think> twice
    ("<think>7+5=12</think><answer>42</answer>", True, (1, 0, 1)),  # <think> again (the prompt opened it)
    ("7+5=12</think><answer>42</answer>", False, (1, 0, 1)),  # unterminated: no EOS
    ("7+5=12</think><answer>42</answer>3", True, (1, 0, 1)),  # something after </answer>
    ("7+5=12</think>1<answer>42</answer>", True, (1, 0, 1)),  # something between </think> and <answer>
    ("</think><answer></answer>", True, (0, 0, 0)),  # empty answer
    ("</answer>42<answer></think>", True, (0, 0, 0)),  # answer tags in the wrong order
    ("<answer>42</answer></think>", True, (1, 0, 0)),  # answer inside the think span
    ("7+5=13</think><answer>42</answer>", True, (1, 1, 0)),  # a wrong step is no step
    ("17+5=12,7+5=120,0+0=00</think><answer>42</answer>", True, (1, 1, 0)),  # digits around: not steps
    ("4+8+1=13:3</think><answer>42</answer>", True, (1, 1, 1)),  # a carry step
    ("1,9+9+1=19</think><answer>42</answer>", True, (1, 1, 1)),
    ("</think>7+5=12<answer>42</answer>", True, (1, 0, 0)),  # a step after </think> is not thinking
]


def test_verifier_by_hand():
    task = ThinkTask(2)
    answers = jnp.asarray(task._solutions(np.full(len(CASES), 7), np.full(len(CASES), 35)))
    want = np.array([case[2] for case in CASES], np.float32)
    responses = jnp.concatenate([_rows([text], eos=eos) for text, eos, _ in CASES])
    outcomes = jax.jit(lambda r, a: (*task.verify(r, a), task.writes_steps(r), task.is_correct(r, a),
                                     task.format_ok(r)))(responses, answers)
    got = np.stack(outcomes[:3], axis=1)
    for (text, eos, expected), row, tokens in zip(CASES, got, np.asarray(responses)):
        assert tuple(row) == expected, (text, eos)
        assert tuple(map(int, reference_verify(tokens, "42"))) == expected, (text, eos)
    np.testing.assert_array_equal(outcomes[3], want[:, 0])
    np.testing.assert_array_equal(outcomes[4], want[:, 1])


def test_jitted_verifier_matches_the_reference_on_perturbed_responses():
    task, n, rng = ThinkTask(2), 400, np.random.default_rng(0)
    a, b = rng.integers(0, 100, n), rng.integers(0, 100, n)
    answers = task._solutions(a, b)
    responses = np.full((n, task.response_budget), PAD, np.int32)
    for i in range(n):  # each worked solution with one to three random edits (any token, EOS and PAD included)
        ids = list(answers[i][:list(answers[i]).index(EOS) + 1])
        for _ in range(rng.integers(1, 4)):
            j, op = int(rng.integers(len(ids))), rng.integers(3)
            if op == 0:
                ids[j] = int(rng.integers(THINK_VOCAB_SIZE))
            elif op == 1:
                del ids[j]
            else:
                ids[j:j] = ids[max(0, j - 6):j]  # repeat a span (tags twice, steps twice)
        responses[i, :min(len(ids), task.response_budget)] = ids[:task.response_budget]
    correct, well_formed = jax.jit(task.verify)(jnp.asarray(responses), jnp.asarray(answers))
    steps = jax.jit(task.writes_steps)(jnp.asarray(responses))
    want = np.array([reference_verify(r, str(x + y)) for r, x, y in zip(responses, a, b)], np.float32)
    np.testing.assert_array_equal(np.stack([correct, well_formed, steps], axis=1), want)
    assert 0.1 < want[:, 0].mean() < 0.9 and 0.1 < want[:, 1].mean() < 0.9 and 0.1 < want[:, 2].mean()


def test_base_corpus_never_holds_a_problem_with_its_answer():
    task = ThinkTask(2)
    docs = corpus_documents(jax.random.PRNGKey(0), 20000, 2)
    corpus = "\n".join(docs)
    assert corpus_documents(jax.random.PRNGKey(0), 50, 2) == docs[:50] != corpus_documents(jax.random.PRNGKey(1), 50, 2)
    rng = np.random.default_rng(1)
    kinds = {kind: document(rng, 2, kind)[0] for kind in DOCUMENT_KINDS}
    for kind, text in kinds.items():  # every kind is in the corpus: the search below is not vacuous
        pattern = {"facts": r"^\d\+\d(\+1)?=\d+(,|$)", "partial": r"^\d\d\+\d\d=<think>\d", "worked": r"^<think>\d\+",
                   "reverse": r"^<think>\d:\d(,|<)", "guess": r"^\d\d\+\d\d=<think></think><answer>\d+</answer>$"}[kind]
        assert re.search(pattern, text) and sum(bool(re.search(pattern, d)) for d in docs) > 1000, kind
    # every problem of a sample of the RL task: its prompt is often there, never followed by the answer
    prompts, answers = task.sample(jax.random.PRNGKey(7), 500)
    seen = 0
    for p, a in zip(np.asarray(prompts), np.asarray(answers)):
        prompt, response = task.text(p), task.text(a)
        final = response.split("</think>")[0]  # every step, the last column's result (the sum) included
        answer = re.search("<answer>.*</answer>", response)[0]
        assert prompt + response not in corpus and prompt + final not in corpus
        with_prompt = [d for d in docs if prompt in d]
        seen += bool(with_prompt)
        assert not any(answer in d.split(prompt, 1)[1] for d in with_prompt), prompt
    assert seen > 100
    # a prompt of the task's format is followed by unfinished steps (never closing the think span or giving an
    # answer) or at once by a wrong guess with no steps
    guesses = 0
    for d in docs:
        prompt = re.search(r"(\d\d)\+(\d\d)=<think>", d)
        if prompt:
            rest = d[prompt.end():]
            guess = re.fullmatch(r"</think><answer>(\d+)</answer>", rest)
            if guess:
                guesses += 1
                assert int(guess[1]) != int(prompt[1]) + int(prompt[2]), d
            else:
                assert "</think>" not in rest and "<answer>" not in rest and "</answer>" not in rest, d
    assert guesses > 1000


def test_corpus_batches_are_packed_documents_drawn_from_the_key():
    task = ThinkTask(2)
    data = CorpusIterator(task, 4, 72, jax.random.PRNGKey(3))
    first, second = next(data), next(data)
    assert {k: v.shape for k, v in first.items()} == {k: (4, 72) for k in
                                                       ("inputs", "targets", "mask", "segment_ids", "positions")}
    inputs, seg, pos = first["inputs"], first["segment_ids"], first["positions"]
    starts = pos == 0
    assert np.all(inputs[starts & (seg > 0)] == BOS) and np.all(seg[:, 0] == 1)
    np.testing.assert_array_equal(first["targets"][:, :-1], inputs[:, 1:])
    mask = first["mask"]  # no target across documents, none at a row's end
    assert not np.any(mask[:, :-1] & (seg[:, 1:] != seg[:, :-1])) and not np.any(mask[:, -1])
    assert np.mean(seg > 0) > 0.95  # rows are (nearly) full
    assert not np.array_equal(first["inputs"], second["inputs"])
    again = CorpusIterator(task, 4, 72, jax.random.PRNGKey(3))
    again.set_state({"index": 1})  # resumed at batch 1: the same batch as an uninterrupted run's
    np.testing.assert_array_equal(next(again)["inputs"], second["inputs"])
    assert again.get_state() == {"index": 2}
    with pytest.raises(ValueError, match="base corpus is the 'think-add' task's"):
        CorpusIterator(Task(), 4, 72, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="seq_len=20 must hold a whole worked document"):
        CorpusIterator(task, 4, 20, jax.random.PRNGKey(0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="add", pretrain_steps=5), "pretrain_steps=5 needs a task with a base corpus"),
    (dict(task="think-add", init_from="ckpt/"), "task='think-add' is posed in its own character vocabulary"),
    (dict(task="think-add", num_digits=1), r"num_digits=1 must be an int in \[2, 6\]"),
    (dict(task="think-add", pretrain_steps=-1), "pretrain_steps"),
    (dict(task="think-add", pretrain_lr=0.0), "pretrain_lr"),
])
def test_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostTrainConfig(**kwargs)


def test_r1_zero_grpo_from_the_pretrained_base_model(tmp_path):
    cfg = PostTrainConfig(task="think-add", num_digits=2, d_model=32, num_layers=1, num_heads=2, pretrain_steps=150,
                          pretrain_batch_size=8, pretrain_lr=1e-2, sft_steps=0, method="grpo", steps=2, batch_size=2,
                          group_size=4, format_weight=0.5, clip_eps_high=0.28, dynamic_sampling=True,
                          eval_problems=16, eval_every=2, log_every=1, checkpoint_every=100, progress=False,
                          mesh="data=1", fast_compile=True)
    assert cfg.model_config().vocab_size == THINK_VOCAB_SIZE and cfg.response_len == 64
    run = posttrain(cfg, tmp_path)
    assert (tmp_path / "pretrain").is_dir() and not (tmp_path / "sft").exists()
    pre = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in pre if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]  # the base model learns the corpus
    assert run["base"] == run["sft"]  # GRPO starts from the base model itself (also its reference)
    assert run["base"]["greedy_format"] > 0.5  # it has learnt the tag format from the corpus (a random model: 0)
    assert {"accuracy", "format", "think_steps", "greedy_think_steps"} <= set(run["base"])
    grpo = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in grpo if "kept_groups" in r]
    assert [r["step"] for r in logged] == [1, 2] and np.isfinite(run["final"]["kl_to_ref"])
    for r in logged:  # a batch without a group of mixed rewards has nothing in the loss
        assert 0 <= r["kept_groups"] <= 1 and (r["kept_groups"] > 0 or r["loss"] == 0.0)


def test_think_task_levels_follow_the_larger_operand_and_open_a_curriculum():
    task = ThinkTask(3)
    prompts, answers, levels = jax.jit(lambda k: task.sample_levels(k, 96))(jax.random.PRNGKey(3))
    assert prompts.shape == (96, task.prompt_len) and answers.shape == (96, task.answer_len) and task.num_levels == 3
    for prompt, answer, level in zip(np.asarray(prompts), np.asarray(answers), np.asarray(levels)):
        a, b = (int(x) for x in task.text(prompt, until_eos=False).split("=")[0].split("+"))
        assert task.text(prompt, until_eos=False) == task.prompt_text(a, b)  # zero-padded operands
        assert level == len(str(max(a, b))) - 1, (a, b, level)
        assert task.text(answer) == worked_solution(a, b, 3)
    assert np.bincount(np.asarray(levels), minlength=3).min() >= 20  # each level about a third of the time
    pool = ProblemPool(task, 64, 16, jax.random.PRNGKey(1), jax.random.PRNGKey(2), "curriculum", steps=30)
    next(pool)  # progress 0: only level 0 (single-digit operands) is open
    assert (np.asarray(pool.levels)[np.asarray(pool.last)] == 0).all()
    cfg = PostTrainConfig(task="think-add", problem_sampling="curriculum+prioritized", problem_pool=64)
    assert cfg.problem_sampling == "curriculum+prioritized"
    with pytest.raises(ValueError, match="task='sort'"):
        PostTrainConfig(task="sort", problem_sampling="curriculum", problem_pool=64)
