"""Early-fusion mixed-modal LM (Chameleon Team 2024, "Chameleon: Mixed-Modal Early-Fusion Foundation Models"):
images become discrete tokens of the LM's own vocabulary (a VQ-VAE's codes, :mod:`jaxlab.models.vqvae`), and
one decoder-only :class:`~jaxlab.models.lm.LM` reads and writes text and image tokens alike, with no separate
vision encoder at the LM's side.

Vocabulary (:class:`FusionVocab`): the text ids ``[0, text_vocab)``, then ``<boi> = text_vocab``,
``<eoi> = text_vocab + 1``, then the image ids ``[image_offset, image_offset + K)`` with ``image_offset =
text_vocab + 2``: code ``c`` is token ``image_offset + c``, so text and image ids never collide. An image of
codes ``[h, w]`` is the block ``<boi> c_0 .. c_{hw-1} <eoi>`` (codes in raster order, §2.1). A QA example is
``<boi> image <eoi> question answer`` (:func:`fusion_example`); the loss counts the answer targets, and with
``image_loss`` the image codes and ``<eoi>`` too (what image generation needs). Examples go one per row of
the LM batch schema (:func:`fusion_batch`: ``inputs``, ``targets``, ``mask``, ``example_ids``).

Stabilisers of §2.3 (Chameleon's training diverged without them): QK-norm (``LMConfig.qk_norm``, set by
:func:`fusion_lm_config`) and the z-loss on the output logits, ``z_coef * log^2 Z`` with ``Z`` the softmax
normaliser (PaLM's, Chowdhery et al. 2022, §5; Chameleon uses ``1e-5``): :func:`z_loss`,
:func:`fusion_loss` (the LM's :func:`~jaxlab.models.lm.next_token_loss` plus the z-loss over the same
counted targets).

Generation (:func:`generate_image_codes`): after a prompt (ending in ``<boi>``), ``h * w`` image tokens are
sampled with the LM's KV cache (prefill in one :meth:`~jaxlab.models.lm.LM.decode` call, then one token per
step in a ``lax.scan``, token t drawing ``fold_in(key, t)``, as :func:`jaxlab.models.sampling.sample`), each
from the logits restricted to the image range (:func:`image_logits`: every other id at ``-inf``), so only
codes are ever emitted; the VQ-VAE's decoder turns them into pixels.

    vocab = FusionVocab(text_vocab=259, codebook_size=256)
    tokens, loss = fusion_example(codes, question_ids, answer_ids, vocab)
    batch = fusion_batch([(tokens, loss)], seq_len=128, num_rows=16)
    logits, _ = LM(cfg).apply({"params": params}, batch["inputs"])
    loss, metrics = fusion_loss(logits, batch["targets"], batch["mask"], z_coef=1e-5)
    codes = generate_image_codes(LM(cfg), params, prompts, key, vocab, grid=(8, 8))   # [B, 8, 8]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.models.lm import LM, LMConfig, next_token_loss
from jaxlab.validation import check, check_positive

__all__ = ["FusionVocab", "fusion_batch", "fusion_example", "fusion_lm_config", "fusion_loss", "generate_image_codes",
           "image_block", "image_logits", "z_loss"]


@dataclasses.dataclass(frozen=True)
class FusionVocab:
    """Token ids of an early-fusion LM: text, ``<boi>``, ``<eoi>``, then one id per code."""

    text_vocab: int
    """Text ids are [0, text_vocab)."""
    codebook_size: int
    """Codes K of the image tokenizer."""

    def __post_init__(self):
        check_positive(self, "text_vocab", "codebook_size", integer=True)

    @property
    def boi(self) -> int:
        return self.text_vocab

    @property
    def eoi(self) -> int:
        return self.text_vocab + 1

    @property
    def image_offset(self) -> int:
        """Token id of code 0."""
        return self.text_vocab + 2

    @property
    def size(self) -> int:
        """The LM's vocab_size: text_vocab + 2 + codebook_size."""
        return self.image_offset + self.codebook_size

    def image_tokens(self, codes) -> np.ndarray:
        """Token ids of codes int [...] (checked to lie in [0, codebook_size))."""
        codes = np.asarray(codes)
        if not np.issubdtype(codes.dtype, np.integer) or codes.size and (codes.min() < 0
                                                                          or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must be ints in [0, codebook_size={self.codebook_size}), got dtype "
                             f"{codes.dtype}, range [{codes.min() if codes.size else None}, "
                             f"{codes.max() if codes.size else None}]")
        return (codes + self.image_offset).astype(np.int32)

    def codes_of(self, tokens):
        """Codes of image token ids (an error on any other id); works on numpy and traced arrays alike."""
        if not isinstance(tokens, jax.core.Tracer):
            t = np.asarray(tokens)
            if t.size and (t.min() < self.image_offset or t.max() >= self.size):
                raise ValueError(f"tokens must be image ids in [{self.image_offset}, {self.size}), got range "
                                 f"[{t.min()}, {t.max()}]")
        return tokens - self.image_offset


def image_block(codes, vocab: FusionVocab) -> np.ndarray:
    """``<boi> c_0 .. c_{hw-1} <eoi>`` of codes int [h, w] (raster order): int32 [h * w + 2]."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be one image's grid [h, w], got shape {codes.shape}")
    return np.concatenate([[vocab.boi], vocab.image_tokens(codes).reshape(-1), [vocab.eoi]]).astype(np.int32)


def fusion_example(codes, prompt: Sequence[int], target: Sequence[int], vocab: FusionVocab, *,
                   image_loss: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``<boi> image <eoi> prompt target`` and its loss mask (bool, one per token: True where the token is a
    counted target): the ``target`` tokens (an answer with its end token, or a caption), and with
    ``image_loss`` the image codes and ``<eoi>`` (the ``<boi>`` opening the row is never a target).
    ``prompt`` and ``target`` are text ids in [0, text_vocab)."""
    prompt, target = np.asarray(prompt, np.int64).reshape(-1), np.asarray(target, np.int64).reshape(-1)
    for name, ids in (("prompt", prompt), ("target", target)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab.text_vocab):
            raise ValueError(f"{name} ids must be text ids in [0, text_vocab={vocab.text_vocab}), got range "
                             f"[{ids.min()}, {ids.max()}]")
    check(target.size > 0 or image_loss, "target is empty and image_loss is off: the example has no loss")
    block = image_block(codes, vocab)
    tokens = np.concatenate([block, prompt, target]).astype(np.int32)
    loss = np.zeros(len(tokens), bool)
    loss[len(tokens) - len(target):] = True
    if image_loss:
        loss[1:len(block)] = True
    return tokens, loss


def fusion_batch(examples: Sequence[tuple[np.ndarray, np.ndarray]], *, seq_len: int, num_rows: int,
                 pad_id: int = 0) -> dict[str, np.ndarray]:
    """One example per row in the LM batch schema: ``inputs`` = tokens[:-1], ``targets`` = tokens[1:],
    ``mask`` = the loss mask of the targets, padded to ``seq_len`` with ``pad_id`` (mask 0), plus
    ``example_ids`` [B, L] (the row's example index where a target is real, -1 on padding and empty rows)."""
    check(len(examples) <= num_rows, f"{len(examples)} examples do not fit num_rows={num_rows}")
    inputs = np.full((num_rows, seq_len), pad_id, np.int32)
    targets = np.full((num_rows, seq_len), pad_id, np.int32)
    mask = np.zeros((num_rows, seq_len), bool)
    ids = np.full((num_rows, seq_len), -1, np.int32)
    for row, (tokens, loss) in enumerate(examples):
        n = len(tokens) - 1
        if n > seq_len:
            raise ValueError(f"example {row} has {len(tokens)} tokens, more than seq_len + 1 = {seq_len + 1}")
        inputs[row, :n], targets[row, :n], mask[row, :n], ids[row, :n] = tokens[:-1], tokens[1:], loss[1:], row
    return {"inputs": inputs, "targets": targets, "mask": mask, "example_ids": ids}


def fusion_lm_config(vocab: FusionVocab, **fields) -> LMConfig:
    """An :class:`~jaxlab.models.lm.LMConfig` over the fused vocabulary with Chameleon's QK-norm."""
    return LMConfig(**{**fields, "vocab_size": vocab.size, "qk_norm": True})


# ---- losses ---------------------------------------------------------------------------------------
def z_loss(logits, mask):
    """Mean of ``log^2 Z`` (``Z = sum_v exp(logits_v)``) over the positions where ``mask`` [B, L] is set
    (logits [B, L, V]; 0 when none is)."""
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [B, L]
    mask = mask.astype(jnp.float32)
    return jnp.sum(log_z ** 2 * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def fusion_loss(logits, targets, mask, z_coef: float = 1e-5):
    """``next_token_loss + z_coef * z_loss`` over the counted targets: ``(loss, metrics)`` with
    ``cross_entropy``, ``z_loss`` (unweighted), ``accuracy`` and ``loss_weight``."""
    ce, metrics = next_token_loss(logits, targets, mask)
    z = z_loss(logits, mask)
    return ce + z_coef * z, {"cross_entropy": ce, "z_loss": z, **metrics}


# ---- generation -----------------------------------------------------------------------------------
def image_logits(logits, vocab: FusionVocab):
    """Logits [..., V] with every id outside the image range [image_offset, size) at ``-inf``."""
    ids = jnp.arange(logits.shape[-1])
    inside = (ids >= vocab.image_offset) & (ids < vocab.size)
    return jnp.where(inside, logits.astype(jnp.float32), -jnp.inf)


@functools.lru_cache(maxsize=16)
def _generate_fn(cfg: LMConfig, vocab: FusionVocab, num_tokens: int):
    model = LM(cfg)

    def run(params, prompts, key, temperature):
        B, Lp = prompts.shape

        def pick(logits, t):
            logits = image_logits(logits, vocab)  # [B, V]
            drawn = jax.random.categorical(jax.random.fold_in(key, t), logits / jnp.maximum(temperature, 1e-6))
            return jnp.where(temperature <= 0, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)  # [B]

        cache = model.init_cache(B, Lp + num_tokens)
        logits, cache = model.apply({"params": params}, prompts, cache, method=LM.decode)  # prefill
        first = pick(logits[:, -1], 0)

        def step(carry, t):
            token, cache = carry
            logits, cache = model.apply({"params": params}, token[:, None], cache, method=LM.decode)
            token = pick(logits[:, 0], t)
            return (token, cache), token

        _, rest = jax.lax.scan(step, (first, cache), jnp.arange(1, num_tokens))
        return jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, num_tokens]

    return jax.jit(run)


def generate_image_codes(model: LM, params, prompts, key, vocab: FusionVocab, grid: tuple[int, int], *,
                         temperature: float = 1.0):
    """Sample one image of ``grid = (h, w)`` codes after each prompt int [B, Lp] (ending in ``<boi>``): codes
    int32 [B, h, w], each drawn from the LM's logits restricted to the image ids (temperature 0: the most
    likely code)."""
    prompts = jnp.asarray(prompts, jnp.int32)
    h, w = grid
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be a non-empty int array [B, Lp], got shape {prompts.shape}")
    if model.cfg.vocab_size != vocab.size:
        raise ValueError(f"the LM's vocab_size={model.cfg.vocab_size} is not the fused vocabulary's {vocab.size}")
    if h < 1 or w < 1 or prompts.shape[1] + h * w > model.cfg.max_len:
        raise ValueError(f"grid={grid} after a prompt of {prompts.shape[1]} tokens must fit max_len="
                         f"{model.cfg.max_len}")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0")
    tokens = _generate_fn(model.cfg, vocab, h * w)(params, prompts, key, jnp.float32(temperature))
    return (tokens - vocab.image_offset).reshape(-1, h, w)
