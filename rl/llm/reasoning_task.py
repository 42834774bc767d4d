"""A task with room to think: multi-digit addition posed in DeepSeek-R1-Zero's template, with rule-based
accuracy and format rewards (DeepSeek-AI 2025, arXiv:2501.12948, section 2.2.1-2.2.2, Table 1).

R1-Zero's template ends the prompt where the model is to reason, ``... Assistant: <think>``, and asks for
``reasoning </think> <answer> answer </answer>``. Here, in a character vocabulary, task ``"think-add"``::

    prompt    <bos>07+35=<think>
    response  7+5=12:2,0+3+1=4:42</think><answer>42</answer><eos>

Operands have ``num_digits`` digits, zero-padded in the prompt (every prompt has ``prompt_len`` tokens); the
answer is their sum without leading zeros. The response is free: the verifier reads only the tags.

**Step notation** (the corpus's, :mod:`jaxlab.rl.llm.base_corpus`, and of :func:`worked_solution`): columns
from the least significant, ``x+y=s`` or, with a carry in, ``x+y+1=s`` (``s`` the column's sum, one or two
digits), then ``:`` and the result so far (the units digits written so far, most significant first; after the
last column the whole sum without leading zeros), columns separated by ``,``. The worked solution is what
:meth:`ThinkTask.sample` returns as the "answers" row (SFT's targets, a cold start); the verifiers read only
its answer span. Responses get a generous budget (:attr:`ThinkTask.response_budget`, at least 64 tokens), so
a policy can write more, or less, than the worked solution.

**Rewards** (:meth:`ThinkTask.verify`, jittable, on tokens up to and including the first EOS):

* accuracy: the response holds exactly one ``<answer>`` and one ``</answer>``, in this order, and the tokens
  between them are exactly the answer's digits (``042`` for 42 is wrong; an answer outside the tags is wrong);
* format: EOS present; no ``<think>`` (the prompt opened it); exactly one ``</think>``, ``<answer>`` and
  ``</answer>``, in this order, ``<answer>`` right after ``</think>``, ``</answer>`` right before EOS, and
  one or more digits between the answer tags;
* :meth:`ThinkTask.writes_steps`: the think span (the tokens before ``</think>``, all of them if there is
  none) holds at least one arithmetically right column step of the notation, ``x+y=s`` or ``x+y+1=s`` not
  preceded by a digit and with ``s`` not followed by one: an experiment reports the share of responses that
  reason in steps.

:func:`reference_verify` is the same verifier in plain Python on one response's pieces (the tests check that
the two agree). Token ids extend :mod:`jaxlab.rl.llm.task`'s vocabulary additively: ids 0-14 are the same tokens,
then ``,`` ``:`` and the four tags (``THINK_VOCAB_SIZE = 21``).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.rl.llm.task import (BOS, CHARS, DIGIT0, EOS, PAD, digit_tokens, level_operands, response_lengths,
                                response_mask, rule_reward)

__all__ = ["ANSWER_CLOSE", "ANSWER_OPEN", "TAGS", "THINK_CLOSE", "THINK_OPEN", "THINK_TOKENS", "THINK_VOCAB_SIZE",
           "ThinkTask", "column_steps", "decode_text", "encode_text", "reference_verify", "worked_solution"]

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
THINK_TOKENS = (*CHARS, ",", ":", *TAGS)
"""The token strings of ids 3, 4, ...: the character task's (``CHARS``, same ids), then the new ones."""
THINK_VOCAB_SIZE = 3 + len(THINK_TOKENS)
_ID = {s: 3 + i for i, s in enumerate(THINK_TOKENS)}
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = (_ID[t] for t in TAGS)
_PLUS, _EQUALS = _ID["+"], _ID["="]
_PIECES = re.compile("|".join(re.escape(t) for t in TAGS) + "|.", re.S)


def encode_text(text: str) -> list[int]:
    """Text of ``THINK_TOKENS`` to token ids (tags are one token each; no BOS/EOS added)."""
    pieces = _PIECES.findall(text)
    bad = sorted({p for p in pieces if p not in _ID})
    if bad:
        raise ValueError(f"text={text!r} has characters {bad} outside the vocabulary {''.join(THINK_TOKENS[:14])!r} "
                         f"and the tags {TAGS}")
    return [_ID[p] for p in pieces]


def decode_text(tokens, until_eos: bool = True) -> str:
    """Token ids to text: stops at the first EOS (``until_eos``), drops PAD, BOS (and EOS)."""
    out = []
    for t in np.asarray(tokens).tolist():
        if t == EOS and until_eos:
            break
        if t >= 3:
            out.append(THINK_TOKENS[t - 3])
    return "".join(out)


def column_steps(a: int, b: int, num_digits: int, slip: tuple[int, int] | None = None) -> str:
    """The column steps of ``a + b`` over ``num_digits`` columns, in the step notation (the think span of
    :func:`worked_solution`): ``column_steps(7, 35, 2) == "7+5=12:2,0+3+1=4:42"``. ``slip = (column, delta)``
    writes that column's sum ``delta`` off (``-delta`` where that would leave 0..19) and carries on from the
    wrong sum: ``column_steps(7, 35, 2, slip=(0, 1)) == "7+5=13:3,0+3+1=4:43"``."""
    steps, running, carry = [], "", 0
    for i in range(num_digits):
        x, y = a // 10**i % 10, b // 10**i % 10
        s = x + y + carry
        if slip is not None and i == slip[0]:
            s = s + slip[1] if 0 <= s + slip[1] <= 19 else s - slip[1]
        running = str(int(str(s) + running)) if i == num_digits - 1 else str(s % 10) + running
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}:{running}")
        carry = s // 10
    return ",".join(steps)


def worked_solution(a: int, b: int, num_digits: int) -> str:
    """The response of the worked solution of ``a + b`` over ``num_digits`` columns, in the step notation:
    ``worked_solution(7, 35, 2) == "7+5=12:2,0+3+1=4:42</think><answer>42</answer>"``."""
    return column_steps(a, b, num_digits) + f"</think><answer>{a + b}</answer>"


_STEP = re.compile(r"(?=(?<![0-9])([0-9])\+([0-9])(\+1)?=([0-9]+))")  # every start, overlapping ones too


def reference_verify(response, answer: str) -> tuple[bool, bool, bool]:
    """The verifier in plain Python: ``(correct, well_formed, writes_steps)`` of one response's token ids [R]
    against the answer text (``"42"``); see the module docstring. The tokens before the first EOS count (PAD
    and BOS there are pieces that are neither digits nor tags)."""
    tokens = np.asarray(response).tolist()
    terminated = EOS in tokens
    pieces = [THINK_TOKENS[t - 3] if t >= 3 else "?" for t in tokens[:tokens.index(EOS) if terminated else None]]
    count = {t: pieces.count(t) for t in TAGS}
    correct = False
    if count["<answer>"] == 1 and count["</answer>"] == 1:
        i, j = pieces.index("<answer>"), pieces.index("</answer>")
        correct = i < j and "".join(pieces[i + 1:j]) == answer
    well_formed = False
    if terminated and count == {"<think>": 0, "</think>": 1, "<answer>": 1, "</answer>": 1}:
        t = pieces.index("</think>")
        inside = "".join(pieces[t + 2:-1])
        well_formed = (pieces[t + 1:t + 2] == ["<answer>"] and pieces[-1] == "</answer>" and inside.isascii()
                       and inside.isdigit())
    think = "".join(pieces[:pieces.index("</think>")] if "</think>" in pieces else pieces)
    writes_steps = any(int(m[0]) + int(m[1]) + (1 if m[2] else 0) == int(m[3]) and m[3] == str(int(m[3]))
                       for m in _STEP.findall(think))
    return correct, well_formed, writes_steps


@dataclasses.dataclass(frozen=True)
class ThinkTask:
    """Addition with a think span, R1-Zero's template and rewards (see the module docstring)."""

    num_digits: int = 2
    """Digits per operand (2-6: at one digit the base corpus's addition facts would be the problems)."""

    kind = "think-add"

    def __post_init__(self):
        if not isinstance(self.num_digits, int) or not 2 <= self.num_digits <= 6:
            raise ValueError(f"num_digits={self.num_digits!r} must be an int in [2, 6] for task 'think-add'")

    # ---- sizes --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return THINK_VOCAB_SIZE

    @property
    def prompt_len(self) -> int:
        """BOS, the two operands and "+", "=", "<think>"."""
        return 2 * self.num_digits + 4

    @property
    def answer_len(self) -> int:
        """Tokens of the longest worked solution (every column carrying, a ``num_digits + 1``-digit sum) plus EOS."""
        top = 10**self.num_digits - 1
        return len(encode_text(worked_solution(top, top, self.num_digits))) + 1

    @property
    def response_budget(self) -> int:
        """The default response budget: twice the longest worked solution, at least 64 tokens."""
        return max(64, 2 * self.answer_len)

    @property
    def description(self) -> str:
        return f"{self.num_digits}-digit addition with a think span"

    # ---- problems -----------------------------------------------------------------------------------
    def sample(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """``n`` problems: prompts int32 [n, prompt_len] and their worked solutions int32 [n, answer_len]
        (:func:`worked_solution`, then EOS, then PAD; jittable: the solutions are written on the host)."""
        ka, kb = jax.random.split(key)
        return self._problems(jax.random.randint(ka, (n,), 0, 10**self.num_digits),
                              jax.random.randint(kb, (n,), 0, 10**self.num_digits))

    @property
    def num_levels(self) -> int:
        """Difficulty levels of :meth:`sample_levels`: ``num_digits``."""
        return self.num_digits

    def sample_levels(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``n`` problems spread evenly over the difficulty levels, for a curriculum (Kimi k1.5, section 2.3.4):
        prompts, worked solutions and levels int32 [n], a problem's level the number of digits of its larger
        operand minus 1 (:func:`jaxlab.rl.llm.task.level_operands`, as for "add"); operands stay zero-padded."""
        a, b, levels = level_operands(key, n, self.num_digits)
        return (*self._problems(a, b), levels)

    def _problems(self, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The problems ``a + b`` of operands int [n] below ``10**num_digits``: (prompts, worked solutions)."""
        d, n = self.num_digits, a.shape[0]
        prompts = jnp.concatenate([jnp.full((n, 1), BOS), digit_tokens(a, d), jnp.full((n, 1), _PLUS),
                                   digit_tokens(b, d), jnp.full((n, 1), _EQUALS), jnp.full((n, 1), THINK_OPEN)], axis=1)
        answers = jax.pure_callback(self._solutions, jax.ShapeDtypeStruct((n, self.answer_len), jnp.int32), a, b,
                                    vmap_method="sequential")
        return prompts.astype(jnp.int32), answers

    def _solutions(self, a, b) -> np.ndarray:
        a, b = np.asarray(a), np.asarray(b)
        out = np.full((*a.shape, self.answer_len), PAD, np.int32)
        for idx in np.ndindex(a.shape):
            ids = encode_text(worked_solution(int(a[idx]), int(b[idx]), self.num_digits)) + [EOS]
            out[idx][:len(ids)] = ids
        return out

    def prompt_text(self, a: int, b: int) -> str:
        """The prompt's text after BOS, ``"07+35=<think>"``."""
        d = self.num_digits
        return f"{a:0{d}d}+{b:0{d}d}=<think>"

    def text(self, tokens, until_eos: bool = True) -> str:
        """The text of one prompt or response [L] (:func:`decode_text`; ``until_eos=False``: EOS dropped, not
        stopped at)."""
        return decode_text(tokens, until_eos)

    # ---- the verifier (the token interface the post-training methods read) -------------------------------
    eos_id, pad_id = EOS, PAD

    def verify(self, response: jax.Array, answers: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(is_correct, format_ok)`` [n] each: ``response`` [n, R], ``answers`` [n, Ra] the worked solutions
        of :meth:`sample` (only their answer spans are read)."""
        got, got_len, _, well_formed = _parse(response, self.num_digits + 1)
        want, want_len, _, _ = _parse(answers, self.num_digits + 1)
        correct = (got_len >= 1) & (got_len == want_len) & jnp.all(got == want, axis=1)
        return correct.astype(jnp.float32), well_formed.astype(jnp.float32)

    def is_correct(self, response: jax.Array, answers: jax.Array) -> jax.Array:
        return self.verify(response, answers)[0]

    def format_ok(self, response: jax.Array) -> jax.Array:
        return _parse(response, self.num_digits + 1)[3].astype(jnp.float32)

    def writes_steps(self, response: jax.Array) -> jax.Array:
        """1.0 where the think span holds a right column step ``x+y=s`` / ``x+y+1=s``: [n]."""
        return _writes_steps(response).astype(jnp.float32)

    def response_lengths(self, response: jax.Array) -> jax.Array:
        return response_lengths(response)

    def response_mask(self, response: jax.Array) -> jax.Array:
        return response_mask(response)

    def rewards(self, response: jax.Array, answers: jax.Array, format_weight: float = 0.0) -> jax.Array:
        """R1-Zero's rule-based reward [n]: 1 for the right answer in the tags, plus ``format_weight`` for a
        well-formed response (:func:`~jaxlab.rl.llm.task.rule_reward`)."""
        return rule_reward(*self.verify(response, answers), format_weight)


def _is_digit(t: jax.Array) -> jax.Array:
    return (t >= DIGIT0) & (t < DIGIT0 + 10)


def _parse(response: jax.Array, width: int):
    """The answer span and the format of responses [n, R]: ``(content [n, width]`` (the span's tokens, PAD
    past its end), ``length [n]`` (-1 without exactly one ``<answer>`` before exactly one ``</answer>``, or
    with a non-digit inside; ``width + 1`` when longer than ``width``), ``think_end [n]`` (position of the
    first ``</think>``, R if none), ``well_formed [n]`` bool)."""
    n, R = response.shape
    body = (response_mask(response) > 0) & (response != EOS)  # [n, R]: tokens before the first EOS
    pos = jnp.arange(R)[None, :]  # [1, R]
    count = lambda tok: jnp.sum(body & (response == tok), axis=1)  # noqa: E731
    first = lambda tok: jnp.min(jnp.where(body & (response == tok), pos, R), axis=1)  # noqa: E731
    has_eos = jnp.any(response == EOS, axis=1)
    end = jnp.sum(body, axis=1)  # [n]: position of the first EOS (R if none)
    open_, close, think_end = first(ANSWER_OPEN), first(ANSWER_CLOSE), first(THINK_CLOSE)
    inside = (pos > open_[:, None]) & (pos < close[:, None])  # [n, R]
    span_ok = (count(ANSWER_OPEN) == 1) & (count(ANSWER_CLOSE) == 1) & (open_ < close)
    span_ok &= jnp.all(jnp.where(inside, _is_digit(response), True), axis=1)
    length = jnp.where(span_ok, jnp.minimum(close - open_ - 1, width + 1), -1)  # [n]
    idx = open_[:, None] + 1 + jnp.arange(width)[None, :]  # [n, width]
    content = jnp.take_along_axis(response, jnp.minimum(idx, R - 1), axis=1)
    content = jnp.where(jnp.arange(width)[None, :] < length[:, None], content, PAD)
    well_formed = (has_eos & span_ok & (count(THINK_OPEN) == 0) & (count(THINK_CLOSE) == 1)
                   & (open_ == think_end + 1) & (close == end - 1) & (close - open_ >= 2))
    return content, length, think_end, well_formed


def _writes_steps(response: jax.Array) -> jax.Array:
    """bool [n]: a right column step ``x+y=s`` / ``x+y+1=s`` lies wholly before the first ``</think>`` (and the
    first EOS), not preceded by a digit, ``s`` not followed by one (no leading zero in ``s``)."""
    n, R = response.shape
    body = (response_mask(response) > 0) & (response != EOS)
    think_end = jnp.min(jnp.where(body & (response == THINK_CLOSE), jnp.arange(R)[None, :], R), axis=1)
    end = jnp.minimum(think_end, jnp.sum(body, axis=1))  # [n]: the think span is [0, end)
    padded = jnp.pad(response, ((0, 0), (1, 9)), constant_values=PAD)  # one before, room for the longest step
    at = lambda j: padded[:, 1 + j:1 + j + R]  # [n, R]: token t + j at position t  # noqa: E731
    digit = lambda j: at(j) - DIGIT0  # noqa: E731
    start = ~_is_digit(at(-1)) & _is_digit(at(0)) & (at(1) == _PLUS) & _is_digit(at(2))
    found = jnp.zeros((n, R), bool)
    for carry, k in ((0, 4), (1, 6)):  # "x+y=" or "x+y+1=", the sum from t + k
        opened = (at(3) == _EQUALS) if not carry else ((at(3) == _PLUS) & (at(4) == DIGIT0 + 1) & (at(5) == _EQUALS))
        s = digit(0) + digit(2) + carry  # [n, R]
        one = (s < 10) & (at(k) == DIGIT0 + s) & ~_is_digit(at(k + 1))
        two = (s >= 10) & (at(k) == DIGIT0 + 1) & (at(k + 1) == DIGIT0 + s - 10) & ~_is_digit(at(k + 2))
        last = jnp.arange(R)[None, :] + k + jnp.where(s >= 10, 1, 0)  # [n, R]: position of the sum's last digit
        found |= start & opened & (one | two) & (last < end[:, None])
    return jnp.any(found, axis=1)
