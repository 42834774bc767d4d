"""A base model's pretraining corpus for ``"think-add"``, generated from a key: the pieces of the task, never
the task (the setting of DeepSeek-R1-Zero, whose RL starts from a base model pretrained on text that teaches
arithmetic and formats, not from one fine-tuned on the RL problems; DeepSeek-AI 2025, section 2.2).

Documents (each ``<bos> text``, most then ``<eos>``; the notation is :mod:`jaxlab.rl.llm.reasoning_task`'s):

* ``"facts"`` - one to six single-digit addition facts, with and without a carry in:
  ``<bos>7+5=12,3+4+1=8<eos>``;
* ``"partial"`` - a problem in the prompt's format followed by the *first* column steps of its worked
  solution, cut off before it is finished: ``<bos>07+35=<think>7+5=12:2,`` or, at most, every column with the
  last one's result left out, ``<bos>07+35=<think>7+5=12:2,0+3+1=4`` (no EOS: the document is cut, and
  never closes the think span or gives an answer);
* ``"guess"`` - a problem in the prompt's format answered at once, with no steps, by a wrong guess (a
  possible sum drawn at random, never the right one): ``<bos>07+35=<think></think><answer>61</answer><eos>``.
  A base language model's first habit on an arithmetic prompt is to answer it directly (DeepSeek-R1-Zero's
  responses start short, its Figure 3); these documents give the base model that habit beside the unfinished
  steps, so RL has a choice to make: answer at once or think first. (A guess by a rule, e.g. the column sums
  without their carries, would be right on the problems without a carry, a second strategy that RL can settle
  on instead of thinking: it did at one seed of two.);
* ``"worked"`` - worked column steps in the tag format with no question:
  ``<bos><think>7+5=12:2,0+3+1=4:42</think><answer>42</answer><eos>``; with the corpus option ``checks`` (a
  probability, 0 by default) a worked solution checks its steps: it works them again with the operands swapped,
  ``<bos><think>7+5=12:2,0+3+1=4:42,5+7=12:2,3+0+1=4:42</think><answer>42</answer><eos>``, and with the option
  ``slips`` (a probability) a checked solution's first working has a slip, one column's sum one off, which the
  check corrects: ``<bos><think>7+5=13:3,0+3+1=5:53,5+7=12:2,3+0+1=4:42</think><answer>42</answer><eos>``.
  The answer is the check's. With the option ``rechecks`` (a probability) a checked solution checks once more,
  the operands back in their first order: three workings of the same sum, as long-CoT models verify an easy answer
  round after round (Chen et al. 2024, "Do NOT Think That Much for 2+3=? On the Overthinking of o1-Like LLMs",
  arXiv:2412.21187). Checks are length that a policy whose first working is right does not need: the
  "overthinking" of long-CoT models that Kimi k1.5's length penalty and long2short remove (Kimi Team 2025,
  arXiv:2501.12599, sections 2.3.3 and 2.4);
* ``"reverse"`` - the tag format on unrelated content, numbers copied: digits reversed by the same
  result-so-far notation, the answer a copy of the last result:
  ``<bos><think>4:4,1:14,3:314</think><answer>314</answer><eos>``.

So no document holds a problem of the RL task in the prompt's format together with its answer: a prompt
(``07+35=<think>``) is only ever followed by unfinished steps (never ``</think>``, ``<answer>``, or the last
column's result, the sum) or by a wrong guess with no steps, and the complete worked solutions come without
their question. A base model
trained on this has to compose the pieces to solve the task.

:class:`CorpusIterator` packs documents into rows ``[B, L]`` of the LM batch schema (``inputs``, ``targets``,
``mask``, ``segment_ids``, ``positions``; :mod:`jaxlab.models.packing`): each row holds whole documents one
after another (a document that does not fit in the row's remaining room is cut there), each its own segment
with positions from 0, as the prompt of an RL problem sits alone at position 0. Batch ``i`` is a pure function
of ``fold_in(key, i)``, so the position is the iterator's whole state. :func:`make_pretrain_step` is the
spine's ``make_train_step`` on :func:`pretrain_loss`, the LM's ``next_token_loss`` on the packed rows.

:class:`LongCoTIterator` is not part of the corpus: it poses the task's problems in the prompt's format and answers
them as the checked worked documents do (:func:`checked_solution`, at the same rates), the SFT data of Kimi k1.5's
long-CoT warm-up (``PostTrainConfig.sft_long_cot``) for a run that is not R1-Zero's.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from jaxlab.loop import KeyedBatches
from jaxlab.models.lm import LM, next_token_loss
from jaxlab.models.packing import target_mask_from_segments
from jaxlab.models.vision_data import host_rng
from jaxlab.rl.llm.reasoning_task import ThinkTask, column_steps, encode_text, worked_solution
from jaxlab.rl.llm.task import BOS, EOS, PAD
from jaxlab.train_state import make_train_step

__all__ = ["DOCUMENT_KINDS", "CorpusIterator", "LongCoTIterator", "checked_length", "checked_solution",
           "corpus_documents", "document", "make_pretrain_step", "max_checks", "pretrain_loss"]

DOCUMENT_KINDS = ("facts", "partial", "guess", "worked", "reverse")
_WEIGHTS = (0.1, 0.25, 0.35, 0.2, 0.1)  # how often each kind is drawn: of the prompts, 58% answered at once


def _check_rates(checks: float, slips: float, rechecks: float = 0.0) -> None:
    for name, rate in (("checks", checks), ("slips", slips), ("rechecks", rechecks)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name}={rate!r} must be a probability in [0, 1]")


def _slip(rng: np.random.Generator, a: int, b: int, num_digits: int) -> str:
    """The column steps of ``a + b`` with a slip: one column's sum written one off (up or down, at random;
    never below 0 or above 19), and the steps after it carrying on from the wrong sum."""
    column, delta = int(rng.integers(num_digits)), int(rng.choice([-1, 1]))
    return column_steps(a, b, num_digits, slip=(column, delta))


def checked_length(num_digits: int, checks: int = 1) -> int:
    """Tokens of the longest worked response with ``checks`` checks (every column carrying), EOS included."""
    top = 10**num_digits - 1
    return len(encode_text((column_steps(top, top, num_digits) + ",") * checks
                           + worked_solution(top, top, num_digits))) + 1


def max_checks(checks: float, rechecks: float) -> int:
    """The most checks a worked document of the corpus options ``checks`` and ``rechecks`` has: 0, 1 or 2."""
    return (checks > 0) * (1 + (rechecks > 0))


def checked_solution(rng: np.random.Generator, a: int, b: int, num_digits: int, checks: float = 0.0,
                     slips: float = 0.0, rechecks: float = 0.0) -> str:
    """The response to ``a + b`` of a worked document (after ``<think>``): :func:`worked_solution`, and with
    probability ``checks`` checked (worked again with the operands swapped, the answer the check's), a checked
    one's first working slipped with probability ``slips`` and checked a second time with probability
    ``rechecks``; ``rng`` is drawn from only for the options that are not 0."""
    if not (checks and rng.random() < checks):
        return worked_solution(a, b, num_digits)
    first = _slip(rng, a, b, num_digits) if slips and rng.random() < slips else column_steps(a, b, num_digits)
    if rechecks and rng.random() < rechecks:  # and again, the operands back in their first order
        return first + "," + column_steps(b, a, num_digits) + "," + worked_solution(a, b, num_digits)
    return first + "," + worked_solution(b, a, num_digits)


def document(rng: np.random.Generator, num_digits: int, kind: str | None = None, checks: float = 0.0,
             slips: float = 0.0, rechecks: float = 0.0) -> tuple[str, bool]:
    """One document's text (after BOS) drawn with ``rng`` and whether it ends with EOS; ``kind`` one of
    ``DOCUMENT_KINDS`` (None: drawn, ``guess`` 35%, ``partial`` 25%, ``worked`` 20%, ``facts`` and ``reverse``
    10% each); ``checks``: the probability that a worked document checks its steps, ``slips``: that a checked
    one's first working has a slip, ``rechecks``: that a checked one checks a second time (all 0: ``rng`` is
    drawn from exactly as without the options, and with ``rechecks`` 0 exactly as before it existed)."""
    _check_rates(checks, slips, rechecks)
    if kind is None:
        kind = DOCUMENT_KINDS[int(rng.choice(len(DOCUMENT_KINDS), p=_WEIGHTS))]
    if kind == "facts":
        facts = []
        for _ in range(int(rng.integers(1, 7))):
            x, y, c = int(rng.integers(10)), int(rng.integers(10)), int(rng.integers(2))
            facts.append(f"{x}+{y}{'+1' if c else ''}={x + y + c}")
        return ",".join(facts), True
    if kind == "partial":
        w = num_digits
        a, b = (int(v) for v in rng.integers(0, 10**w, size=2))
        steps = column_steps(a, b, w).split(",")
        k = int(rng.integers(1, w + 1))  # columns shown
        shown = steps[:k - 1] + [steps[k - 1] if k < w else steps[k - 1].split(":")[0]]
        return f"{a:0{w}d}+{b:0{w}d}=<think>" + ",".join(shown) + ("," if k < w else ""), False
    if kind == "guess":
        w = num_digits
        a, b = (int(v) for v in rng.integers(0, 10**w, size=2))
        guess = int(rng.integers(0, 2 * 10**w - 2))  # any possible sum but the right one
        guess += guess >= a + b
        return f"{a:0{w}d}+{b:0{w}d}=<think></think><answer>{guess}</answer>", True
    if kind == "worked":
        a, b = (int(v) for v in rng.integers(0, 10**num_digits, size=2))
        return "<think>" + checked_solution(rng, a, b, num_digits, checks, slips, rechecks), True
    if kind == "reverse":
        digits = [str(int(v)) for v in rng.integers(0, 10, size=int(rng.integers(1, num_digits + 3)))]
        results = ["".join(reversed(digits[:i + 1])) for i in range(len(digits))]
        think = ",".join(f"{d}:{r}" for d, r in zip(digits, results))
        return f"<think>{think}</think><answer>{results[-1]}</answer>", True
    raise ValueError(f"kind={kind!r} must be one of {DOCUMENT_KINDS}")


def corpus_documents(key: jax.Array, n: int, num_digits: int, checks: float = 0.0, slips: float = 0.0,
                     rechecks: float = 0.0) -> list[str]:
    """``n`` documents' texts drawn from ``key`` (what :class:`CorpusIterator` packs; for inspection)."""
    rng = host_rng(key)
    return [document(rng, num_digits, checks=checks, slips=slips, rechecks=rechecks)[0] for _ in range(n)]


class CorpusIterator(KeyedBatches):
    """Packed pretraining batches ``[batch_size, seq_len]`` of the corpus of ``task`` (see the module docstring);
    batch ``i`` from ``fold_in(key, i)``; ``checks``, ``slips`` and ``rechecks``: :func:`document`'s, how often
    worked documents check their steps, how often a checked one's first working slips and how often it checks twice."""

    def __init__(self, task: ThinkTask, batch_size: int, seq_len: int, key: jax.Array, checks: float = 0.0,
                 slips: float = 0.0, rechecks: float = 0.0):
        if not isinstance(task, ThinkTask):
            raise ValueError(f"the base corpus is the 'think-add' task's; got task {getattr(task, 'kind', task)!r}")
        if seq_len < task.answer_len + 1:
            raise ValueError(f"seq_len={seq_len} must hold a whole worked document ({task.answer_len + 1} tokens)")
        _check_rates(checks, slips, rechecks)
        longest = checked_length(task.num_digits, max_checks(checks, rechecks)) + 1
        if checks and seq_len < longest:
            raise ValueError(f"seq_len={seq_len} must hold a whole checked worked document ({longest} tokens)")
        super().__init__(key)
        self.task, self.batch_size, self.seq_len = task, batch_size, seq_len
        self.checks, self.slips, self.rechecks = checks, slips, rechecks

    def __next__(self) -> dict:
        rng = host_rng(self.next_key())
        B, L = self.batch_size, self.seq_len
        inputs = np.full((B, L), PAD, np.int32)
        segment_ids, positions = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
        for r in range(B):
            t, segment = 0, 0
            while t < L - 1:  # a document of one token would teach nothing
                text, ends = document(rng, self.task.num_digits, checks=self.checks, slips=self.slips,
                                      rechecks=self.rechecks)
                ids = ([BOS] + encode_text(text) + ([EOS] if ends else []))[:L - t]
                segment += 1
                inputs[r, t:t + len(ids)] = ids
                segment_ids[r, t:t + len(ids)] = segment
                positions[r, t:t + len(ids)] = np.arange(len(ids))
                t += len(ids)
        targets = np.concatenate([inputs[:, 1:], np.full((B, 1), PAD, np.int32)], axis=1)  # [B, L]
        return {"inputs": inputs, "targets": targets, "mask": target_mask_from_segments(segment_ids),
                "segment_ids": segment_ids, "positions": positions}


class LongCoTIterator(KeyedBatches):
    """Batches ``{"prompts" [B, prompt_len], "answers" [B, W]}`` of ``task``'s problems (operands uniform below
    ``10**num_digits``) answered by :func:`checked_solution` at the corpus rates ``checks``, ``slips`` and
    ``rechecks``, then EOS, then PAD; ``W`` is the longest such answer. The SFT data of Kimi k1.5's long-CoT
    warm-up (Kimi Team 2025, section 2.2: the long model learns to check its work from SFT before RL). Batch
    ``i`` from ``fold_in(key, i)``: the position is the whole state."""

    def __init__(self, task: ThinkTask, batch_size: int, key: jax.Array, checks: float, slips: float = 0.0,
                 rechecks: float = 0.0):
        if not isinstance(task, ThinkTask):
            raise ValueError(f"long-CoT answers are the 'think-add' task's; got task {getattr(task, 'kind', task)!r}")
        _check_rates(checks, slips, rechecks)
        super().__init__(key)
        self.task, self.batch_size = task, batch_size
        self.rates = (checks, slips, rechecks)
        self.width = max(task.answer_len, checked_length(task.num_digits, max_checks(checks, rechecks)))

    def __next__(self) -> dict:
        rng = host_rng(self.next_key())
        d, (B, W) = self.task.num_digits, (self.batch_size, self.width)
        prompts = np.zeros((B, self.task.prompt_len), np.int32)
        answers = np.full((B, W), PAD, np.int32)
        for r in range(B):
            a, b = (int(v) for v in rng.integers(0, 10**d, size=2))
            prompts[r] = [BOS] + encode_text(self.task.prompt_text(a, b))
            ids = encode_text(checked_solution(rng, a, b, d, *self.rates)) + [EOS]
            answers[r, :len(ids)] = ids
        return {"prompts": prompts, "answers": answers}


def pretrain_loss(model: LM, params, batch: dict) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy of packed rows (``models.lm.next_token_loss``; documents attend only within
    themselves): ``(loss, {"accuracy", "loss_weight"})``."""
    logits, _ = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    return next_token_loss(logits, batch["targets"], batch["mask"])


def make_pretrain_step(model: LM, optimizer: optax.GradientTransformation, grad_accum: int = 1):
    """``train_step(state, batch, key) -> (state, metrics)`` minimising :func:`pretrain_loss` (the spine's
    ``make_train_step``; ``grad_accum`` microbatches weighted by their targets)."""
    return make_train_step(lambda params, batch, key: pretrain_loss(model, params, batch), optimizer,
                           grad_accum=grad_accum)
