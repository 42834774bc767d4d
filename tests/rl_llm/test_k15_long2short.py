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
from jaxlab.rl.llm.base_corpus import CorpusIterator, checked_length, corpus_documents, document
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


def test_k15_long2short_smoke(tmp_path):
    exp = get_experiment("k15-long2short")
    # the quick size's model (a smaller one answers nothing right, leaving long2short no data), briefly trained
    cfg = dataclasses.replace(exp.quick, fast_compile=True, pretrain_steps=400, steps=2, batch_size=4, group_size=4,
                              eval_every=1, eval_problems=32, problem_pool=16, penalty_warmup=1, pair_prompts=64,
                              long2short_samples=4, long2short_steps=2)
    ctx = RunContext("k15-long2short", tmp_path, quick=True, show_progress=False)
    result = exp.fn(cfg, ctx)
    assert ctx.figure_path.exists()
    m = result.metrics
    assert list(m["curves"]) == ["uniform", "curriculum+prioritized", "length-penalty"]
    for curve in m["curves"].values():
        assert curve["step"] == [0, 1, 2] and all(1 <= n <= 64 for n in curve["response_length"])
        assert all(0 <= a <= 1 for a in curve["accuracy"])
    # every run starts at the same base model, and the long model is the uniform run's final policy
    assert len({(c["accuracy"][0], c["response_length"][0]) for c in m["curves"].values()}) == 1
    assert m["points"]["long (uniform GRPO)"]["accuracy"] == m["curves"]["uniform"]["accuracy"][-1]
    assert set(m["long2short"]) == {"rejection", "dpo"}
    for s in m["long2short"].values():
        assert all(math.isfinite(s[k]) for k in ("accuracy", "response_length", "length_cut", "accuracy_loss"))
    assert [c.claim[:26] for c in result.claims] == ["long2short (rejection) cut", "long2short (dpo) cuts the ",
                                                    "curriculum + prioritised s", "Kimi's length penalty shor"]
    assert all(isinstance(c, Claim) and isinstance(c.holds, bool) and c.evidence for c in result.claims)
    assert len(result.comparisons) == 5 and result.summary
    with pytest.raises(ValueError, match="modes"):
        dataclasses.replace(cfg, modes=("rejection", "rejection"))
