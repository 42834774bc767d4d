"""Decoding from image prompts: KV-cache sampling of the projector VLM (:mod:`jaxlab.models.vlm`), the
image-conditioned counterpart of :func:`jaxlab.models.sampling.sample` (what a GUI agent needs to write its
next action from a screenshot: UI-TARS, Qin et al. 2025, arXiv 2501.12326).

    prompts = prepare_prompts([VLMExample((image,), tokens)], image_token=IMAGE, patch_size=8)
    out = sample_vlm(model, params, prompts, key, max_new_tokens=16, temperature=0.0, eos_id=EOS)
    out.response [B, R], out.logps [B, R], out.mask [B, R], out.model_logps [B, R]   (a sampling.Sample)
    logps = vlm_response_logprobs(model, params, prompts, out.response)   # = out.model_logps, teacher-forced

1. Prefill: the images of the batch are packed at native resolution (:func:`jaxlab.models.vision.pack_images`),
   encoded by the ViT, merged 2x2 and projected (:meth:`jaxlab.models.vlm.VLM.image_embeddings`), and the
   prompt rows (each ``<image>`` placeholder expanded to its image's slots,
   :func:`~jaxlab.models.vlm.expand_image_placeholders`) go through :meth:`jaxlab.models.lm.LM.decode` in
   one call with the image tokens as ``embeds`` at the image slots: the KV cache then holds the whole
   prompt, image tokens interleaved with text, exactly as the full forward pass sees it.
2. Decode: one text token per step in a ``lax.scan`` with the cache; token ``t`` is drawn by
   :func:`jaxlab.models.sampling.draw_token` with ``fold_in(key, t)`` (temperature 0: greedy; rows stop at
   EOS; ``logps`` of the distribution sampled from, ``model_logps`` the model's own).

The LM decodes one document per row from position 0 (no segment ids in the cache), so every prompt of a
batch must have the same expanded length (images of different sizes are fine when the text makes up the
difference; :func:`prepare_prompts` raises ``ValueError`` naming the lengths otherwise). The sampler is
jitted once per (config, response length, whether ``eos_id`` is given) and per shape; the temperature and
the EOS and padding tokens are traced.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.models.lm import LM, token_logprobs
from jaxlab.models.sampling import Sample, decode_tokens, draw_token
from jaxlab.models.vlm import VLM, VLMConfig, VLMExample, VLMImages, expand_example, pack_batch_images

__all__ = ["VLMPrompts", "prepare_prompts", "repeat_prompts", "sample_vlm", "teacher_forced_inputs",
           "vlm_response_logprobs"]


class VLMPrompts(NamedTuple):
    """A batch of image prompts as arrays (a pytree).

    Attributes:
      tokens: int32 [B, Lp], the prompts with every image placeholder expanded (``image_token`` at the slots).
      image_slots: int32 [B, Lp], the merged image token (row of ``images.merge_index``) read at each slot,
        -1 on text.
      images: the packed images of the batch (:class:`jaxlab.models.vlm.VLMImages`).
    """

    tokens: np.ndarray
    image_slots: np.ndarray
    images: VLMImages


def prepare_prompts(prompts: Sequence[VLMExample], *, image_token: int, patch_size: int, factor: int = 2,
                    image_len: int | None = None, image_rows: int | None = None, image_tokens: int | None = None,
                    num_channels: int = 3) -> VLMPrompts:
    """The :class:`VLMPrompts` of examples whose ``tokens`` are prompts with one ``image_token`` per image.

    Images are packed into rows of ``image_len`` patches (default: the largest image's); ``image_rows`` and
    ``image_tokens`` fix the image rows and merged tokens (for one compiled shape; default: as many as
    needed). ``ValueError`` when the expanded prompts differ in length (naming them), for what
    :func:`jaxlab.models.vlm.expand_example` checks (an image's patch grid must be divisible by ``factor``), and
    :class:`~jaxlab.models.vlm.CapacityError` when a fixed capacity is too small."""
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt, got none")
    rows, images, first = [], [], []
    for i, ex in enumerate(prompts):
        rows.append(expand_example(ex, f"prompts[{i}]", patch_size=patch_size, image_token=image_token, factor=factor,
                                   image_len=image_len))
        first.append(len(images))
        images.extend(ex.images)
    lengths = sorted({len(t.tokens) for t in rows})
    if len(lengths) > 1:
        raise ValueError(f"the expanded prompts have lengths {lengths}: a batch decodes one document per row from "
                         "position 0, so every prompt needs the same length (pad the text, or group prompts by length)")
    if image_len is None:  # the largest image's patches (1 without images)
        image_len = max([int(np.prod(np.shape(im)[:2])) // patch_size ** 2 for im in images], default=1)
    vision, offsets = pack_batch_images(images, patch_size=patch_size, image_len=image_len, factor=factor,
                                        num_channels=num_channels, image_rows=image_rows, image_tokens=image_tokens)
    slots = []
    for i, text in enumerate(rows):
        where = text.image_index >= 0
        slot = np.full(len(text.tokens), -1, np.int64)
        slot[where] = offsets[first[i] + text.image_index[where]] + text.token_index[where]
        slots.append(slot)
    return VLMPrompts(np.stack([t.tokens for t in rows]).astype(np.int32), np.stack(slots).astype(np.int32), vision)


def repeat_prompts(prompts: VLMPrompts, times: int) -> VLMPrompts:
    """Each prompt row ``times`` times in a row (groups contiguous, as GRPO's), sharing its images: the rows
    read the same merged image tokens, so the ViT runs once per image."""
    return VLMPrompts(np.repeat(prompts.tokens, times, axis=0), np.repeat(prompts.image_slots, times, axis=0),
                      prompts.images)


@functools.lru_cache(maxsize=32)
def _sample_fn(cfg: VLMConfig, max_new_tokens: int, stops: bool):
    """The jitted sampler of one configuration and response length (temperature, EOS and PAD traced)."""
    vlm, lm = VLM(cfg), LM(cfg.lm)

    def run(params, prompts: VLMPrompts, key, temperature, eos_id, pad_id):
        tokens, slots, images = prompts
        B, Lp = tokens.shape
        image_embeds = vlm.apply({"params": params}, images, method=VLM.image_embeddings)  # [T, d_model]
        embeds = image_embeds[jnp.maximum(slots, 0)]  # [B, Lp, d_model]
        variables = {"params": params["lm"]}

        def pick(logits, t, done):
            return draw_token(logits, key, t, done, temperature=temperature, eos_id=eos_id if stops else None,
                              pad_id=pad_id)

        cache = lm.init_cache(B, Lp + max_new_tokens)
        logits, cache = lm.apply(variables, tokens, cache, embeds=embeds, embeds_mask=slots >= 0,
                                 method=LM.decode)  # prefill: [B, Lp, V]

        def next_logits(token, cache):  # token [B] -> the logits [B, V] after it
            logits, cache = lm.apply(variables, token[:, None], cache, method=LM.decode)  # [B, 1, V]
            return logits[:, 0], cache

        response, logps, model_logps, mask = decode_tokens(pick, next_logits, logits[:, -1], cache, max_new_tokens)
        return Sample(jnp.concatenate([tokens, response], axis=1), response, logps, mask, model_logps)

    return jax.jit(run)


def sample_vlm(model: VLM, params, prompts: VLMPrompts | Sequence[VLMExample], key: jax.Array,
               max_new_tokens: int, *, temperature: float = 1.0, eos_id: int | None = None,
               pad_id: int = 0) -> Sample:
    """Sample ``max_new_tokens`` text tokens after each image prompt (see the module docstring).

    ``prompts``: :class:`VLMPrompts`, or examples for :func:`prepare_prompts` (tokens with one image
    placeholder per image; all the same expanded length). Returns a :class:`jaxlab.models.sampling.Sample`:
    ``tokens`` [B, Lp + R] (the expanded prompt, then the response), ``response``, ``logps``, ``mask``,
    ``model_logps`` [B, R]. ``temperature`` 0 is greedy; ``eos_id`` stops a row (later tokens ``pad_id``,
    mask 0)."""
    cfg = model.cfg
    if not isinstance(prompts, VLMPrompts):
        prompts = prepare_prompts(prompts, image_token=cfg.image_token, patch_size=cfg.vit.patch_size,
                                  factor=cfg.merge_factor, num_channels=cfg.vit.num_channels)
    B, Lp = np.shape(prompts.tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if Lp + max_new_tokens > cfg.lm.max_len:
        raise ValueError(f"prompt length {Lp} + max_new_tokens={max_new_tokens} exceeds lm.max_len={cfg.lm.max_len}")
    if np.shape(prompts.image_slots) != (B, Lp):
        raise ValueError(f"prompts.image_slots must have the shape of prompts.tokens {(B, Lp)}, got "
                         f"{np.shape(prompts.image_slots)}")
    if not isinstance(temperature, jax.core.Tracer) and not float(temperature) >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < cfg.lm.vocab_size):
            raise ValueError(f"{name}={value!r} must be None or a token id in [0, lm.vocab_size={cfg.lm.vocab_size})")
    fn = _sample_fn(cfg, max_new_tokens, eos_id is not None)
    return fn(params, prompts, key, jnp.asarray(temperature, jnp.float32), jnp.int32(-1 if eos_id is None else eos_id),
              jnp.int32(pad_id))


def teacher_forced_inputs(prompts: VLMPrompts, response) -> tuple[jax.Array, jax.Array]:
    """The VLM's input rows for a teacher-forced pass over prompts and responses ``[B, R]``: ``(tokens [B, Lp +
    R], image_slots [B, Lp + R])``, the response's slots text (-1)."""
    tokens, slots, _ = prompts
    full = jnp.concatenate([jnp.asarray(tokens, jnp.int32), jnp.asarray(response, jnp.int32)], axis=1)
    full_slots = jnp.concatenate([jnp.asarray(slots, jnp.int32), jnp.full(jnp.shape(response), -1, jnp.int32)], axis=1)
    return full, full_slots


def vlm_response_logprobs(model: VLM, params, prompts: VLMPrompts, response: jax.Array,
                          temperature: float = 1.0) -> jax.Array:
    """Teacher-forced ``log pi_T(response[:, t] | prompt, response[:, :t])`` [B, R] in one full forward pass
    of the VLM over the prompt and the response (``pi_T = softmax(logits / T)``). Equal to
    :attr:`Sample.model_logps` (T = 1) on the sampler's own tokens up to EOS (mask it with ``Sample.mask``).
    Traceable: the GRPO loss calls it inside its step."""
    tokens, slots, images = prompts
    B, Lp = np.shape(tokens)
    if jnp.ndim(response) != 2 or response.shape[0] != B:
        raise ValueError(f"response must be [B, R] with B = {B} prompts, got shape {jnp.shape(response)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    full, full_slots = teacher_forced_inputs(prompts, response)  # [B, Lp + R] each
    logits, _ = model.apply({"params": params}, full, images, full_slots)  # [B, Lp + R, V] fp32
    if temperature != 1:
        logits = logits / temperature
    return token_logprobs(logits[:, Lp - 1:-1], full[:, Lp:])  # [B, R]
