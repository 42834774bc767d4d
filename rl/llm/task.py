"""A verifiable task family generated on the fly, its character tokenizer and its exact-match verifier.

Two families, both with a single correct answer a program can check (the setting of DeepSeek-R1-Zero's
rule-based rewards, DeepSeek-AI 2025, section 2.2.2):

* ``"add"``: ``<bos>07+35=`` -> ``42<eos>`` (``num_digits``-digit operands, zero-padded in the prompt so
  every prompt has the same length; the answer without leading zeros);
* ``"sort"``: ``<bos>3142=`` -> ``1234<eos>`` (``num_digits`` random digits, answer sorted ascending).

Problems are a pure function of a PRNG key (``Task.sample``), so a run's data never touches disk and
step ``t`` of a resumed run sees exactly the problems of an uninterrupted one. Prompts have a fixed
length ``Task.prompt_len``; answers are ``[n, Task.answer_len]`` rows of digits, EOS, then PAD.
A response is the sampled continuation ``[n, R]``; it counts up to and including its first EOS.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BOS", "EOS", "PAD", "TASKS", "VOCAB_SIZE", "Task", "decode", "encode", "format_ok", "is_correct",
           "response_lengths", "response_mask"]

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+="
VOCAB_SIZE = 3 + len(CHARS)
DIGIT0 = 3  # token of "0"; digits are DIGIT0 .. DIGIT0 + 9
TASKS = ("add", "sort")
_CHAR_TO_ID = {c: 3 + i for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    """Characters of ``CHARS`` to token ids (no BOS/EOS added)."""
    bad = sorted(set(text) - set(CHARS))
    if bad:
        raise ValueError(f"text={text!r} has characters {bad} outside the vocabulary {CHARS!r}")
    return [_CHAR_TO_ID[c] for c in text]


def decode(tokens) -> str:
    """Token ids to text: stops at the first EOS, drops PAD and BOS."""
    out = []
    for t in np.asarray(tokens).tolist():
        if t == EOS:
            break
        if t >= 3:
            out.append(CHARS[t - 3])
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class Task:
    """A family of verifiable problems."""

    kind: str = "add"
    """"add" (sum of two numbers) or "sort" (sort a list of digits)."""
    num_digits: int = 2
    """Digits per operand ("add") or list length ("sort")."""

    def __post_init__(self):
        if self.kind not in TASKS:
            raise ValueError(f"kind={self.kind!r} must be one of {TASKS}")
        if not isinstance(self.num_digits, int) or not 1 <= self.num_digits <= 8:
            raise ValueError(f"num_digits={self.num_digits!r} must be an int in [1, 8]")

    @property
    def prompt_len(self) -> int:
        """BOS, the problem, "="."""
        return 2 * self.num_digits + 3 if self.kind == "add" else self.num_digits + 2

    @property
    def answer_len(self) -> int:
        """The longest answer's digits plus EOS."""
        return self.num_digits + 2 if self.kind == "add" else self.num_digits + 1

    @property
    def description(self) -> str:
        """E.g. "2-digit addition" or "sorting 5 digits" (figure titles, reports)."""
        return f"{self.num_digits}-digit addition" if self.kind == "add" else f"sorting {self.num_digits} digits"

    def sample(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """``n`` problems: prompts int32 [n, prompt_len] and answers int32 [n, answer_len] (jittable)."""
        d = self.num_digits
        if self.kind == "add":
            ka, kb = jax.random.split(key)
            a = jax.random.randint(ka, (n,), 0, 10**d)
            b = jax.random.randint(kb, (n,), 0, 10**d)
            plus, equals = _CHAR_TO_ID["+"], _CHAR_TO_ID["="]
            prompts = jnp.concatenate([jnp.full((n, 1), BOS), _digits(a, d), jnp.full((n, 1), plus), _digits(b, d),
                                       jnp.full((n, 1), equals)], axis=1)
            s = _digits(a + b, d + 1)  # [n, d + 1] with leading zeros
            lead = jnp.minimum(jnp.sum(jnp.cumprod(s == DIGIT0, axis=1), axis=1), d)  # leading zeros (keep one digit)
            num = d + 1 - lead  # digits of the answer, [n]
            idx = jnp.arange(self.answer_len)[None, :]  # [1, Ra]
            shifted = jnp.take_along_axis(s, jnp.minimum(idx + lead[:, None], d), axis=1)  # [n, Ra]
            answers = jnp.where(idx < num[:, None], shifted, jnp.where(idx == num[:, None], EOS, PAD))
        else:
            digits = jax.random.randint(key, (n, d), 0, 10) + DIGIT0
            prompts = jnp.concatenate([jnp.full((n, 1), BOS), digits, jnp.full((n, 1), _CHAR_TO_ID["="])], axis=1)
            answers = jnp.concatenate([jnp.sort(digits, axis=1), jnp.full((n, 1), EOS)], axis=1)
        return prompts.astype(jnp.int32), answers.astype(jnp.int32)

    def rewards(self, response: jax.Array, answers: jax.Array, format_weight: float = 0.0) -> jax.Array:
        """Rule-based reward [n]: 1 for an exact match, plus ``format_weight`` for a well-formed response
        (digits then EOS) whether right or wrong."""
        return is_correct(response, answers) + format_weight * format_ok(response)


def _digits(x: jax.Array, width: int) -> jax.Array:
    """Decimal digit tokens of non-negative ints x [n], most significant first, zero-padded: [n, width]."""
    powers = 10 ** jnp.arange(width - 1, -1, -1)  # [width]
    return (x[:, None] // powers[None, :]) % 10 + DIGIT0


def response_mask(response: jax.Array) -> jax.Array:
    """1.0 on the tokens of each response up to and including its first EOS (all, if none): [n, R]."""
    is_eos = (response == EOS).astype(jnp.int32)
    before = jnp.cumsum(is_eos, axis=1) - is_eos  # EOS tokens strictly before t
    return (before == 0).astype(jnp.float32)


def response_lengths(response: jax.Array) -> jax.Array:
    """Tokens of each response including EOS: [n]."""
    return jnp.sum(response_mask(response), axis=1)


def is_correct(response: jax.Array, answers: jax.Array) -> jax.Array:
    """Exact match (1.0 / 0.0) of each response with its answer through the answer's EOS: [n]."""
    R, Ra = response.shape[1], answers.shape[1]
    if Ra > R:
        response = jnp.pad(response, ((0, 0), (0, Ra - R)), constant_values=PAD)
    elif R > Ra:
        answers = jnp.pad(answers, ((0, 0), (0, R - Ra)), constant_values=PAD)
    relevant = response_mask(answers) > 0  # the answer's digits and its EOS
    return jnp.all(jnp.where(relevant, response == answers, True), axis=1).astype(jnp.float32)


def format_ok(response: jax.Array) -> jax.Array:
    """1.0 where the response is one or more digits followed by EOS: [n]."""
    mask = response_mask(response) > 0
    is_eos = response == EOS
    digit = (response >= DIGIT0) & (response < DIGIT0 + 10)
    has_eos = jnp.any(is_eos, axis=1)
    body_ok = jnp.all(jnp.where(mask & ~is_eos, digit, True), axis=1)
    return (has_eos & body_ok & (jnp.sum(mask, axis=1) >= 2)).astype(jnp.float32)
