"""The base corpus whose worked solutions check their steps (``checks``, the long model's verbosity for Kimi k1.5's
long2short) and a smoke run of the ``k15-long2short`` experiment."""

import dataclasses
import math
import re

import jax
import numpy as np
import pytest

from jaxlab.context import RunContext
from jaxlab.registry import Claim, get_experiment
from jaxlab.rl.llm.base_corpus import CorpusIterator, LongCoTIterator, checked_length, corpus_documents, document
from jaxlab.rl.llm.posttrain import PostTrainConfig
from jaxlab.rl.llm.reasoning_task import ThinkTask, encode_text, worked_solution

_WORKED = re.compile(r"<think>(.*)</think><answer>(\d+)</answer>")
_STEP = re.compile(r"(\d)\+(\d)(\+1)?=(\d+):(\d+)")


def _passes(think: str, num_digits: int) -> list[list[tuple]]:
    """The think span's column steps, cut into passes of ``num_digits`` columns."""
    steps = [m.groups() for m in _STEP.finditer(think)]
    assert ",".join(_STEP.sub("S", think).split(",")) == ",".join(["S"] * len(steps)), think  # nothing else
    assert len(steps) % num_digits == 0, think
    return [steps[i:i + num_digits] for i in range(0, len(steps), num_digits)]


def test_checks_zero_is_the_r1_zero_corpus_exactly():
    key = jax.random.PRNGKey(4)
    assert corpus_documents(key, 3000, 2, checks=0) == corpus_documents(key, 3000, 2)
    a, b = CorpusIterator(ThinkTask(2), 4, 72, key), CorpusIterator(ThinkTask(2), 4, 72, key, checks=0)
    np.testing.assert_array_equal(next(a)["inputs"], next(b)["inputs"])


@pytest.mark.parametrize("num_digits, slips", [(2, 0.0), (2, 0.5), (3, 1.0)])
def test_checked_worked_solutions_recheck_and_correct_their_steps(num_digits, slips):
    rng = np.random.default_rng(0)
    checked = slipped = 0
    for _ in range(3000):
        text, ends = document(rng, num_digits, "worked", checks=0.6, slips=slips)
        assert ends and len(encode_text(text)) <= checked_length(num_digits)  # <think> in place of EOS
        think, answer = _WORKED.fullmatch(text).groups()
        passes = _passes(think, num_digits)
        assert len(passes) in (1, 2)
        last = passes[-1]  # the check (or the only working): right, and the answer is its sum
        a = int("".join(step[0] for step in reversed(last)))  # columns x+y: x of a, y of b (units first)
        b = int("".join(step[1] for step in reversed(last)))
        steps = lambda x, y: worked_solution(x, y, num_digits).split("</think>")[0]  # noqa: E731
        assert ",".join(f"{x}+{y}{c or ''}={s}:{r}" for x, y, c, s, r in last) == steps(a, b)
        assert int(answer) == a + b == int(last[-1][4])
        if len(passes) == 2:
            checked += 1
            first = ",".join(f"{x}+{y}{c or ''}={s}:{r}" for x, y, c, s, r in passes[0])
            assert all((p[0], p[1]) == (q[1], q[0]) for p, q in zip(passes[0], last))  # the operands swapped
            if first != steps(b, a):  # a slip: one column's sum one off, the steps after it carried on from it
                slipped += 1
                wrong = [i for i, (p, q) in enumerate(zip(passes[0], last)) if p[3] != q[3]]
                assert abs(int(passes[0][wrong[0]][3]) - int(last[wrong[0]][3])) == 1
    assert 0.55 < checked / 3000 < 0.65
    assert abs(slipped / checked - slips) < 0.05
    assert checked_length(num_digits) == 2 * ThinkTask(num_digits).answer_len - 3 - len(str(2 * 10**num_digits - 2))


def test_rechecks_work_the_sum_a_third_time():
    num_digits, rng = 2, np.random.default_rng(1)
    counts = {1: 0, 2: 0, 3: 0}
    for _ in range(4000):
        text, _ = document(rng, num_digits, "worked", checks=0.8, slips=0.3, rechecks=0.5)
        assert len(encode_text(text)) <= checked_length(num_digits, 2)  # <think> in place of EOS
        think, answer = _WORKED.fullmatch(text).groups()
        passes = _passes(think, num_digits)
        counts[len(passes)] += 1
        last = passes[-1]
        a = int("".join(step[0] for step in reversed(last)))
        b = int("".join(step[1] for step in reversed(last)))
        assert int(answer) == a + b == int(last[-1][4])
        if len(passes) == 3:  # the first working and the last have one order, the check between them the other
            assert [(p[0], p[1]) for p in passes[0]] == [(q[0], q[1]) for q in last]
            assert [(p[1], p[0]) for p in passes[1]] == [(q[0], q[1]) for q in last]
            assert ",".join(f"{x}+{y}{c or ''}={s}:{r}" for x, y, c, s, r in passes[1]) == \
                worked_solution(b, a, num_digits).split("</think>")[0]  # the check is right, even after a slip
    assert abs(counts[1] / 4000 - 0.2) < 0.03 and abs(counts[3] / 4000 - 0.4) < 0.03  # 0.8 checked, half twice
    assert checked_length(num_digits, 2) == max(len(encode_text(d)) for d in corpus_documents(  # <think> for EOS
        jax.random.PRNGKey(0), 20000, num_digits, checks=1.0, rechecks=1.0) if d.endswith("</answer>"))


def test_rechecks_zero_keeps_the_checked_corpus_and_room_grows_with_them():
    key = jax.random.PRNGKey(5)
    assert corpus_documents(key, 2000, 2, checks=0.8, slips=0.5, rechecks=0) == \
        corpus_documents(key, 2000, 2, checks=0.8, slips=0.5)
    task = ThinkTask(2)
    with pytest.raises(ValueError, match="must hold a whole checked worked document"):
        CorpusIterator(task, 4, checked_length(2, 2), jax.random.PRNGKey(0), checks=0.5, rechecks=0.5)
    CorpusIterator(task, 4, checked_length(2, 2) + 1, jax.random.PRNGKey(0), checks=0.5, rechecks=0.5)
    with pytest.raises(ValueError, match="rechecks=2"):
        document(np.random.default_rng(0), 2, checks=0.5, rechecks=2)
    with pytest.raises(ValueError, match="corpus_rechecks=0.5 shapes the checked worked solutions"):
        PostTrainConfig(task="think-add", pretrain_steps=5, sft_steps=0, corpus_rechecks=0.5)
    cfg = PostTrainConfig(task="think-add", pretrain_steps=5, sft_steps=0, corpus_checks=0.8, corpus_rechecks=0.5)
    assert cfg.response_len == 80 >= checked_length(2, 2) + 8  # the default budget has room above the longest
    with pytest.raises(ValueError, match="shorter than the longest checked worked answer"):
        PostTrainConfig(task="think-add", pretrain_steps=5, sft_steps=0, corpus_checks=0.8, corpus_rechecks=0.5,
                        max_new_tokens=64)


def test_checked_corpus_never_holds_a_problem_with_its_answer():
    task = ThinkTask(2)
    docs = corpus_documents(jax.random.PRNGKey(0), 20000, 2, checks=0.8, slips=0.5)
    corpus = "\n".join(docs)
    checked = [d for d in docs if re.fullmatch(r"<think>(\d\+.*,){3}.*</answer>", d)]
    assert len(checked) > 1000  # the checked documents are there: the search below is not vacuous
    prompts, answers = task.sample(jax.random.PRNGKey(7), 500)
    seen = 0
    for p, a in zip(np.asarray(prompts), np.asarray(answers)):
        prompt, response = task.text(p), task.text(a)
        steps, answer = response.split("</think>")[0], re.search("<answer>.*</answer>", response)[0]
        x, y = (int(v) for v in re.findall(r"\d+", prompt)[:2])
        check = worked_solution(y, x, 2)
        for think in (steps, steps + "," + check.split("</think>")[0]):  # the response, and with a check
            assert prompt + think not in corpus and prompt + think + response[len(steps):] not in corpus
        with_prompt = [d for d in docs if prompt in d]
        seen += bool(with_prompt)
        for d in with_prompt:  # unfinished steps (no </think>) or a wrong guess at once (no steps)
            rest = d.split(prompt, 1)[1]
            assert answer not in rest and ("</think>" not in rest or rest.startswith("</think>")), d
    assert seen > 100


def test_checks_need_room_and_a_base_corpus():
    task = ThinkTask(2)
    with pytest.raises(ValueError, match="must hold a whole checked worked document"):
        CorpusIterator(task, 4, checked_length(2), jax.random.PRNGKey(0), checks=0.5)
    CorpusIterator(task, 4, checked_length(2) + 1, jax.random.PRNGKey(0), checks=0.5)
    with pytest.raises(ValueError, match="checks=1.5"):
        document(np.random.default_rng(0), 2, checks=1.5)
    with pytest.raises(ValueError, match="slips=-0.1"):
        CorpusIterator(task, 4, 72, jax.random.PRNGKey(0), slips=-0.1)
    with pytest.raises(ValueError, match="shorter than the longest checked worked answer"):
        PostTrainConfig(task="think-add", pretrain_steps=5, sft_steps=0, corpus_checks=0.5, max_new_tokens=40)
    with pytest.raises(ValueError, match="needs pretrain_steps > 0"):
        PostTrainConfig(task="think-add", corpus_checks=0.5)
    with pytest.raises(ValueError, match="corpus_slips=2"):
        PostTrainConfig(task="think-add", pretrain_steps=5, corpus_slips=2)
    cfg = PostTrainConfig(task="think-add", pretrain_steps=5, sft_steps=0, corpus_checks=0.5, corpus_slips=0.5)
    assert cfg.response_len == 64 >= checked_length(2)


def test_long_cot_warm_up_answers_the_prompts_problems_with_checks():
    task = ThinkTask(2)
    data = LongCoTIterator(task, 256, jax.random.PRNGKey(3), checks=0.8, rechecks=0.5)
    batch = next(data)
    assert batch["prompts"].shape == (256, task.prompt_len) and batch["answers"].shape == (256, checked_length(2, 2))
    passes = []
    for prompt, answer in zip(batch["prompts"], batch["answers"]):
        a, b = (int(v) for v in re.findall(r"\d+", task.text(prompt))[:2])
        ref_prompt, _ = task._problems(jax.numpy.array([a]), jax.numpy.array([b]))
        np.testing.assert_array_equal(prompt, ref_prompt[0])  # the RL task's own prompt tokens
        think, given = _WORKED.fullmatch("<think>" + task.text(answer)).groups()
        assert int(given) == a + b and task.verify(answer[None], jax.numpy.asarray(
            task._solutions(np.array([a]), np.array([b]))))[0][0]  # the verifier accepts it
        worked = _passes(think, 2)
        assert "".join(s[0] for s in reversed(worked[0])) == f"{a:02d}"[-2:]  # the first working is a + b
        passes.append(len(worked))
    counts = np.bincount(passes, minlength=4)[1:] / 256  # unchecked, checked once, checked twice
    assert abs(counts[0] - 0.2) < 0.08 and abs(counts[2] - 0.4) < 0.1
    again = LongCoTIterator(task, 256, jax.random.PRNGKey(3), checks=0.8, rechecks=0.5)
    again.set_state(data.get_state())
    np.testing.assert_array_equal(next(again)["answers"], next(data)["answers"])  # batch i from fold_in(key, i)
    with pytest.raises(ValueError, match="sft_long_cot=True fine-tunes on checked answers"):
        PostTrainConfig(task="think-add", pretrain_steps=5, sft_long_cot=True)
    with pytest.raises(ValueError, match="sft_long_cot=True fine-tunes on checked answers"):
        PostTrainConfig(task="think-add", pretrain_steps=5, sft_steps=0, corpus_checks=0.5, sft_long_cot=True)


def test_k15_long2short_smoke(tmp_path):
    exp = get_experiment("k15-long2short")
    # the quick size's model (a smaller one answers nothing right, leaving long2short no data), briefly trained
    cfg = dataclasses.replace(exp.quick, fast_compile=True, pretrain_steps=100, sft_steps=60, steps=2,
                              sampling_steps=2, batch_size=4, group_size=4, eval_every=1, eval_problems=32,
                              problem_pool=16, penalty_warmup=1, pair_prompts=64, long2short_samples=4,
                              long2short_steps=2)
    ctx = RunContext("k15-long2short", tmp_path, quick=True, show_progress=False)
    result = exp.fn(cfg, ctx)
    assert ctx.figure_path.exists()
    m = result.metrics
    curves = m["curves"]
    assert list(curves) == ["long (uniform)", "length-penalty", "uniform", "curriculum+prioritized"]
    for curve in curves.values():
        assert curve["step"] == [0, 1, 2] and all(1 <= n <= 80 for n in curve["response_length"])
        assert all(0 <= a <= 1 for a in curve["accuracy"])
    # the long model and the length penalty start at the long-CoT warm-up, the sampling runs at the base model
    # (each resumed from the first run's stage, not retrained), and the long model is its run's final policy
    start = {name: (c["accuracy"][0], c["response_length"][0]) for name, c in curves.items()}
    points = m["points"]
    assert start["long (uniform)"] == start["length-penalty"] == tuple(points["long-CoT warm-up"].values())[::2]
    assert start["uniform"] == start["curriculum+prioritized"] == tuple(points["base"].values())[::2]
    assert points["long-CoT warm-up"] != points["base"]
    assert points["long (uniform GRPO)"]["accuracy"] == curves["long (uniform)"]["accuracy"][-1]
    assert m["target_accuracy"] == curves["uniform"]["accuracy"][-1]
    assert set(m["long2short"]) == {"rejection", "dpo"}
    for s in m["long2short"].values():
        assert all(math.isfinite(s[k]) for k in ("accuracy", "response_length", "length_cut", "accuracy_loss"))
    assert [c.claim[:26] for c in result.claims] == ["long2short (rejection) cut", "long2short (dpo) cuts the ",
                                                    "from the base model, curri", "Kimi's length penalty shor"]
    assert all(isinstance(c, Claim) and isinstance(c.holds, bool) and c.evidence for c in result.claims)
    # the pool's levels: both sampling runs draw one pool and start from the base model; the curriculum's first
    # step draws level 0 only (its attempts at least a step's batch x group), uniform sampling both levels
    levels = m["pool_levels"]
    assert levels["uniform"]["start_accuracy"] == levels["curriculum+prioritized"]["start_accuracy"]
    assert len(levels["uniform"]["start_accuracy"]) == cfg.num_digits
    for by_level in levels.values():
        assert sum(by_level["attempts"]) == cfg.sampling_steps * cfg.batch_size * cfg.group_size
        assert all(0 <= a <= 1 for a in by_level["start_accuracy"] + by_level["success_rate"])
    assert levels["curriculum+prioritized"]["attempts"][0] >= cfg.batch_size * cfg.group_size
    assert len(result.comparisons) == 6 and result.summary
    with pytest.raises(ValueError, match="modes"):
        dataclasses.replace(cfg, modes=("rejection", "rejection"))
