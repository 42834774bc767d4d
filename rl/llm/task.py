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

:class:`TextTask` poses the same problems to a pretrained checkpoint: as text through its tokenizer, with
the response decoded and verified on the text. Both give the token interface the post-training methods
read (``eos_id``, ``pad_id``, ``prompt_len``, ``answer_len``, ``sample``, ``is_correct``, ``format_ok``,
``response_mask``, ``response_lengths``, ``rewards``, and ``text`` for logs).

Difficulty levels (a curriculum's, Kimi Team 2025, section 2.3.4): ``Task.sample_levels`` draws "add" problems
with every level equally often, a problem's level being the number of digits of its larger operand minus 1
(``07+35=``: level 1; operands still zero-padded; :func:`level_operands`, shared with "think-add"). "sort" has no
levels: a curriculum over it is an error.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BOS", "EOS", "LEVELLED_TASKS", "PAD", "PROMPT_FORMATS", "TASKS", "TASK_NAMES", "VOCAB_SIZE", "Task",
           "TextTask", "decode", "digit_tokens", "encode", "format_ok", "is_correct", "level_operands", "make_task",
           "response_lengths", "response_mask", "rule_reward"]

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+="
VOCAB_SIZE = 3 + len(CHARS)
DIGIT0 = 3  # token of "0"; digits are DIGIT0 .. DIGIT0 + 9
TASKS = ("add", "sort")
LEVELLED_TASKS = ("add", "think-add")
"""The tasks with difficulty levels (``sample_levels``, ``num_levels``): a curriculum needs one."""
TASK_NAMES = (*TASKS, "think-add")
"""Every task post-training reaches by name: :class:`Task`'s kinds and "think-add"
(:class:`jaxlab.rl.llm.reasoning_task.ThinkTask`, whose vocabulary extends this one's additively)."""
_CHAR_TO_ID = {c: 3 + i for i, c in enumerate(CHARS)}


def make_task(name: str, num_digits: int = 2):
    """The task called ``name`` (one of ``TASK_NAMES``) with ``num_digits``."""
    if name == "think-add":
        from jaxlab.rl.llm.reasoning_task import ThinkTask

        return ThinkTask(num_digits)
    if name not in TASKS:
        raise ValueError(f"task={name!r} must be one of {TASK_NAMES}")
    return Task(name, num_digits)


def level_operands(key: jax.Array, n: int, num_digits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Operands ``a, b`` int32 [n] of ``n`` addition problems spread evenly over ``num_digits`` difficulty
    levels, and the levels int32 [n] (jittable). A problem's level is the number of digits of its larger
    operand minus 1: it draws its level uniformly, then one operand uniformly among the numbers of exactly
    ``level + 1`` digits and the other uniformly below ``10**(level + 1)``, in a random order."""
    kl, kh, ko, ks = jax.random.split(key, 4)
    levels = jax.random.randint(kl, (n,), 0, num_digits)  # [n]
    top = 10 ** (levels + 1)  # [n], operands below it
    low = jnp.where(levels > 0, 10**levels, 0)  # [n], the larger operand at least this
    high = jax.random.randint(kh, (n,), low, top)  # exactly level + 1 digits
    other = jax.random.randint(ko, (n,), 0, top)
    swap = jax.random.bernoulli(ks, 0.5, (n,))
    return jnp.where(swap, other, high), jnp.where(swap, high, other), levels.astype(jnp.int32)


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
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def response_budget(self) -> int:
        """The default response budget: the longest answer (with its EOS) plus 2 tokens."""
        return self.answer_len + 2

    @property
    def description(self) -> str:
        """E.g. "2-digit addition" or "sorting 5 digits" (figure titles, reports)."""
        return f"{self.num_digits}-digit addition" if self.kind == "add" else f"sorting {self.num_digits} digits"

    def sample(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """``n`` problems: prompts int32 [n, prompt_len] and answers int32 [n, answer_len] (jittable)."""
        d = self.num_digits
        if self.kind == "add":
            ka, kb = jax.random.split(key)
            return self._add(jax.random.randint(ka, (n,), 0, 10**d), jax.random.randint(kb, (n,), 0, 10**d))
        digits = jax.random.randint(key, (n, d), 0, 10) + DIGIT0
        prompts = jnp.concatenate([jnp.full((n, 1), BOS), digits, jnp.full((n, 1), _CHAR_TO_ID["="])], axis=1)
        answers = jnp.concatenate([jnp.sort(digits, axis=1), jnp.full((n, 1), EOS)], axis=1)
        return prompts.astype(jnp.int32), answers.astype(jnp.int32)

    @property
    def num_levels(self) -> int:
        """Difficulty levels of :meth:`sample_levels` ("add": ``num_digits``)."""
        return self.num_digits

    def sample_levels(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``n`` "add" problems spread evenly over the difficulty levels, for a curriculum (jittable): prompts
        [n, prompt_len], answers [n, answer_len] and levels int32 [n].

        A problem's level is the number of digits of its larger operand minus 1, in ``[0, num_digits)``. Each
        problem draws its level uniformly, then one operand uniformly among the numbers of exactly ``level + 1``
        digits and the other uniformly below ``10**(level + 1)``, in a random order. Operands stay zero-padded
        to ``num_digits`` (every prompt has one length). "sort" has no levels here (``ValueError``)."""
        if self.kind != "add":
            raise ValueError(f"kind={self.kind!r} has no difficulty levels (sample_levels is for 'add')")
        a, b, levels = level_operands(key, n, self.num_digits)
        return (*self._add(a, b), levels)

    def _add(self, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The "add" problems ``a + b`` of operands int [n] below ``10**num_digits``: (prompts, answers)."""
        d, n = self.num_digits, a.shape[0]
        plus, equals = _CHAR_TO_ID["+"], _CHAR_TO_ID["="]
        prompts = jnp.concatenate([jnp.full((n, 1), BOS), digit_tokens(a, d), jnp.full((n, 1), plus),
                                   digit_tokens(b, d), jnp.full((n, 1), equals)], axis=1)
        s = digit_tokens(a + b, d + 1)  # [n, d + 1] with leading zeros
        lead = jnp.minimum(jnp.sum(jnp.cumprod(s == DIGIT0, axis=1), axis=1), d)  # leading zeros (keep one digit)
        num = d + 1 - lead  # digits of the answer, [n]
        idx = jnp.arange(self.answer_len)[None, :]  # [1, Ra]
        shifted = jnp.take_along_axis(s, jnp.minimum(idx + lead[:, None], d), axis=1)  # [n, Ra]
        answers = jnp.where(idx < num[:, None], shifted, jnp.where(idx == num[:, None], EOS, PAD))
        return prompts.astype(jnp.int32), answers.astype(jnp.int32)

    def text(self, tokens, until_eos: bool = True) -> str:
        """The text of one prompt or response [L] (``"07+35="``, ``"42"``): :func:`decode` (up to the first EOS);
        ``until_eos=False``: every character token, EOS, BOS and PAD dropped."""
        if until_eos:
            return decode(tokens)
        return "".join(CHARS[t - 3] for t in np.asarray(tokens).tolist() if t >= 3)

    # The token interface the post-training methods read (:class:`TextTask` has the same, in a checkpoint's
    # vocabulary).
    eos_id, pad_id = EOS, PAD

    def is_correct(self, response: jax.Array, answers: jax.Array) -> jax.Array:
        return is_correct(response, answers)

    def format_ok(self, response: jax.Array) -> jax.Array:
        return format_ok(response)

    def response_lengths(self, response: jax.Array) -> jax.Array:
        return response_lengths(response)

    def response_mask(self, response: jax.Array) -> jax.Array:
        return response_mask(response)

    def verify(self, response: jax.Array, answers: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(is_correct, format_ok)`` [n] each, from one pass (:class:`TextTask` decodes once for both)."""
        return is_correct(response, answers), format_ok(response)

    def rewards(self, response: jax.Array, answers: jax.Array, format_weight: float = 0.0) -> jax.Array:
        """Rule-based reward [n]: 1 for an exact match, plus ``format_weight`` for a well-formed response
        (digits then EOS) whether right or wrong (:func:`rule_reward`)."""
        return rule_reward(*self.verify(response, answers), format_weight)


def rule_reward(correct: jax.Array, well_formed: jax.Array, format_weight: float = 0.0) -> jax.Array:
    """R1-Zero's rule-based reward [n] from a verifier's outcomes: accuracy (1 for the right answer) plus
    ``format_weight`` for a well-formed response, right or wrong."""
    return correct + format_weight * well_formed


def digit_tokens(x: jax.Array, width: int) -> jax.Array:
    """Decimal digit tokens of non-negative ints x [n], most significant first, zero-padded: [n, width]."""
    powers = 10 ** jnp.arange(width - 1, -1, -1)  # [width]
    return (x[:, None] // powers[None, :]) % 10 + DIGIT0


def response_mask(response: jax.Array, eos_id: int = EOS) -> jax.Array:
    """1.0 on the tokens of each response up to and including its first ``eos_id`` (all, if none): [n, R]."""
    is_eos = (response == eos_id).astype(jnp.int32)
    before = jnp.cumsum(is_eos, axis=1) - is_eos  # EOS tokens strictly before t
    return (before == 0).astype(jnp.float32)


def response_lengths(response: jax.Array, eos_id: int = EOS) -> jax.Array:
    """Tokens of each response including EOS: [n]."""
    return jnp.sum(response_mask(response, eos_id), axis=1)


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


# ---- the same problems as text, through a checkpoint's tokenizer ----------------------------------------
PROMPT_FORMATS = ("plain", "chat")
_VERIFY_PROBE = "9876543210+0123456789="  # every digit after every other piece: the pieces must decode verbatim


class TextTask:
    """The problems of :class:`Task` as text in a pretrained checkpoint's vocabulary, verified on the text.

    ``tokenizer`` is a :class:`jaxlab.models.hub.HFTokenizer` (any object with its ``encode``, ``decode``,
    ``eos_id``, ``pad_id`` and ``apply_chat_template``). Problem ``i`` is the text of :class:`Task`'s problem,
    ``"07+35="`` (add) or ``"3142="`` (sort), and its answer ``"42"`` / ``"1234"``.

    Prompt. ``prompt_format="plain"``: the special tokens the tokenizer's post-processor puts before a text
    (e.g. Llama's BOS; any it appends, e.g. an EOS, are left out: the prompt is to be continued), then the
    problem. ``"chat"``: the tokenizer's chat template of one user message holding the problem, with the
    generation prompt (the template's text around the problem encoded without added special tokens). The
    problem is encoded one character at a time (each digit, ``+`` and ``=`` by the tokenizer alone), so every
    prompt of the task has the same number of tokens, ``prompt_len``: no padding, no attention mask. That is
    checked, not assumed: the ten digits must encode to the same number of tokens, and the pieces of
    ``"9876543210+0123456789="`` must decode to exactly that text (else ``ValueError``; byte-level BPE
    tokenizers such as GPT-2's, Llama 3's and Qwen2's pass). A merged multi-digit token is another
    tokenization of the same text, which the model may still emit: answers are verified on the text.

    Answers ``[n, answer_len]``: the answer's digits encoded the same way, then the tokenizer's EOS, then
    ``pad_id`` (the tokenizer's pad token, else its EOS) — SFT's targets.

    Verifier (:meth:`is_correct`). A response ``[R]`` of token ids is correct when it holds the tokenizer's
    EOS and ``decode(tokens before the first EOS)``, stripped of surrounding whitespace, equals the answer text
    exactly (``"42"``; no leading zeros, no other characters, special tokens decoded as their text). A response
    without EOS within its R tokens (unterminated) scores 0. :meth:`format_ok`: EOS present and the text
    before it is one or more ASCII digits. Both decode on the host (``jax.pure_callback``), so they run inside
    jitted steps.
    """

    def __init__(self, kind: str = "add", num_digits: int = 2, tokenizer=None, prompt_format: str = "plain"):
        self.base = Task(kind, num_digits)
        if tokenizer is None:
            raise ValueError("TextTask needs the checkpoint's tokenizer (tokenizer=None)")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={prompt_format!r} must be one of {PROMPT_FORMATS}")
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer names no eos_token (tokenizer_config.json): responses could not end")
        self.tokenizer, self.prompt_format = tokenizer, prompt_format
        self.eos_id = int(tokenizer.eos_id)
        self.pad_id = int(tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id)
        pieces = {c: [int(t) for t in tokenizer.encode(c, add_special_tokens=False)] for c in CHARS}
        widths = {len(pieces[c]) for c in "0123456789"}
        if len(widths) != 1 or 0 in widths or not pieces["+"] or not pieces["="]:
            raise ValueError(f"the tokenizer encodes the digits alone to {sorted(widths)} tokens (and '+', '=' to "
                             f"{len(pieces['+'])}, {len(pieces['='])}): prompts would not share one length")
        self.digit_width = widths.pop()
        probe = [t for c in _VERIFY_PROBE for t in pieces[c]]
        if tokenizer.decode(probe) != _VERIFY_PROBE:
            raise ValueError(f"the tokenizer's single-character pieces decode to {tokenizer.decode(probe)!r}, not "
                             f"{_VERIFY_PROBE!r}: it cannot render the problems one character at a time")
        self._pieces = pieces
        self.prefix, self.suffix = self._frame(tokenizer, prompt_format)
        # the character task's token -> this vocabulary, one row per character token, padded to the widest
        width = max(len(p) for p in pieces.values())
        table = np.full((VOCAB_SIZE, width), self.pad_id, np.int32)
        for c, ids in pieces.items():
            table[_CHAR_TO_ID[c], :len(ids)] = ids
        self._prompt_table = table
        answer = np.full((VOCAB_SIZE, self.digit_width), self.pad_id, np.int32)
        answer[EOS, 0] = self.eos_id
        for c in "0123456789":
            answer[_CHAR_TO_ID[c]] = pieces[c]
        self._answer_table = answer
        # the character prompt's layout is fixed: the width of each position's piece, BOS dropped
        chars = np.asarray(self.base.sample(jax.random.PRNGKey(0), 1)[0])[0, 1:]
        self._widths = tuple(len(pieces[CHARS[t - 3]]) for t in chars.tolist())

    @staticmethod
    def _frame(tokenizer, prompt_format: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids before and after the problem text."""
        probe, other = "00+00=", "12+34="
        if prompt_format == "plain":
            bare = tokenizer.encode(probe, add_special_tokens=False).tolist()
            full = tokenizer.encode(probe).tolist()
            starts = [i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare]
            if not starts:
                raise ValueError(f"the tokenizer's post-processor changes the text's own tokens ({full} vs {bare})")
            return tuple(full[:starts[0]]), ()
        render = lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}])  # noqa: E731
        text = render(probe)
        if text.count(probe) != 1:
            raise ValueError(f"the chat template does not hold the problem text verbatim: {text!r}")
        before, after = text.split(probe)
        if render(other) != before + other + after:
            raise ValueError("the chat template renders problems differently from one another")
        encode = lambda s: tuple(int(t) for t in tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
        return encode(before), encode(after)

    # ---- sizes and problems -------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.base.kind

    @property
    def num_digits(self) -> int:
        return self.base.num_digits

    @property
    def description(self) -> str:
        return self.base.description

    @property
    def prompt_len(self) -> int:
        """Tokens of every prompt: the frame plus the problem's pieces."""
        return len(self.prefix) + sum(self._widths) + len(self.suffix)

    @property
    def answer_len(self) -> int:
        """The longest answer's tokens plus EOS (padding after a shorter answer's EOS)."""
        return self.base.answer_len * self.digit_width

    @property
    def response_budget(self) -> int:
        """The default response budget: the longest answer (with its EOS) plus 2 tokens."""
        return self.answer_len + 2

    def encode_prompt(self, problem: str) -> np.ndarray:
        """Token ids [prompt_len] of a problem text such as ``"07+35="`` (host; what :meth:`sample` gives)."""
        ids = [t for c in problem for t in self._pieces[c]] if set(problem) <= set(CHARS) else None
        if ids is None or len(ids) != sum(self._widths):
            raise ValueError(f"problem={problem!r} is not a {self.description} problem of this task")
        return np.asarray([*self.prefix, *ids, *self.suffix], np.int32)

    def encode_answer(self, answer: str) -> np.ndarray:
        """Token ids [answer_len] of an answer text such as ``"42"``: its digits, EOS, then ``pad_id``."""
        ids = [t for c in answer for t in self._pieces[c]] + [self.eos_id]
        if not answer.isascii() or not answer.isdigit() or len(ids) > self.answer_len:
            raise ValueError(f"answer={answer!r} is not an answer of {self.description}")
        return np.asarray(ids + [self.pad_id] * (self.answer_len - len(ids)), np.int32)

    def sample(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """:class:`Task`'s ``n`` problems from ``key`` in this vocabulary: prompts int32 [n, prompt_len], answers
        int32 [n, answer_len] (jittable: table lookups of the character tokens)."""
        return self._as_text(*self.base.sample(key, n))

    @property
    def num_levels(self) -> int:
        return self.base.num_levels

    def sample_levels(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """:meth:`Task.sample_levels`'s problems in this vocabulary: (prompts, answers, levels [n])."""
        chars, answers, levels = self.base.sample_levels(key, n)
        return (*self._as_text(chars, answers), levels)

    def _as_text(self, chars: jax.Array, answers: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Character-task prompts and answers to this vocabulary."""
        n = chars.shape[0]
        pieces = jnp.asarray(self._prompt_table)[chars[:, 1:]]  # [n, Lc, W]
        problem = jnp.concatenate([pieces[:, j, :w] for j, w in enumerate(self._widths)], axis=1)  # [n, Lq]
        frame = lambda ids: jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (n, len(ids)))  # noqa: E731
        prompts = jnp.concatenate([frame(self.prefix), problem, frame(self.suffix)], axis=1)  # [n, Lp]
        answers = jnp.asarray(self._answer_table)[answers].reshape(n, -1)  # [n, Ra * k]
        return prompts.astype(jnp.int32), answers.astype(jnp.int32)

    # ---- the verifier on the text ---------------------------------------------------------------------
    def response_text(self, response) -> str | None:
        """The text of one response [R] before its first EOS, stripped; None without EOS (unterminated)."""
        tokens = np.asarray(response).tolist()
        if self.eos_id not in tokens:
            return None
        return self.tokenizer.decode(tokens[:tokens.index(self.eos_id)]).strip()

    def text(self, tokens, until_eos: bool = True) -> str:
        """The decoded text of one prompt or response [L]: the tokens before the first EOS (all if none), or
        with ``until_eos=False`` every token but trailing padding (a chat prompt may hold EOS-like tokens)."""
        tokens = np.asarray(tokens).tolist()
        if until_eos and self.eos_id in tokens:
            tokens = tokens[:tokens.index(self.eos_id)]
        elif not until_eos:
            while tokens and tokens[-1] == self.pad_id:
                tokens.pop()
        return self.tokenizer.decode(tokens)

    @staticmethod
    def _well_formed(texts) -> np.ndarray:
        return np.array([t is not None and t.isascii() and t.isdigit() for t in texts], np.float32)

    def _verify_host(self, response, answers) -> tuple[np.ndarray, np.ndarray]:
        texts = [self.response_text(r) for r in np.asarray(response)]
        truth = [self.response_text(a) for a in np.asarray(answers)]
        correct = np.array([t is not None and t == a for t, a in zip(texts, truth)], np.float32)
        return correct, self._well_formed(texts)

    def verify(self, response: jax.Array, answers: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(is_correct, format_ok)`` [n] each from one host callback: each response decoded once."""
        out = jax.ShapeDtypeStruct(response.shape[:1], jnp.float32)
        return jax.pure_callback(self._verify_host, (out, out), response, answers, vmap_method="sequential")

    def is_correct(self, response: jax.Array, answers: jax.Array) -> jax.Array:
        """1.0 where the response's text is the answer's (see the class docstring), else 0.0: [n]."""
        return self.verify(response, answers)[0]

    def format_ok(self, response: jax.Array) -> jax.Array:
        """1.0 where the response is EOS-terminated ASCII digits: [n]."""
        host = lambda r: self._well_formed([self.response_text(x) for x in np.asarray(r)])  # noqa: E731
        return jax.pure_callback(host, jax.ShapeDtypeStruct(response.shape[:1], jnp.float32), response,
                                 vmap_method="sequential")

    def response_mask(self, response: jax.Array) -> jax.Array:
        return response_mask(response, self.eos_id)

    def response_lengths(self, response: jax.Array) -> jax.Array:
        return response_lengths(response, self.eos_id)

    def rewards(self, response: jax.Array, answers: jax.Array, format_weight: float = 0.0) -> jax.Array:
        """:meth:`Task.rewards` on the text: 1 for the right answer, plus ``format_weight`` for digits then EOS."""
        return rule_reward(*self.verify(response, answers), format_weight)
