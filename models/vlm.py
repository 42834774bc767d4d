"""Vision-language model with a projector (Kimi-VL, Kimi Team 2025, "Kimi-VL Technical Report", §2.1; the
LLaVA recipe, Liu et al. 2023): image tokens from a vision encoder interleaved with text tokens in the LM.

    patches --ViT--> [h*w, Dv] per image --pixel_shuffle 2x2--> [(h/2)*(w/2), 4 Dv] --Projector--> [.., d_model]
    text "<image> question ..." --expand_image_placeholders--> one slot per merged image token
    LM input rows: the token embeddings, with the projected image tokens in the image slots --> logits

* Vision side: the images of a batch are packed NaViT-style into ``[Bv, Lv]`` rows of patches
  (:func:`jaxlab.models.vision.pack_images`) and encoded by :class:`~jaxlab.models.vision.ViT` (MoonViT:
  native resolution, 2D RoPE). Kimi-VL's 2 x 2 patch merging (:func:`~jaxlab.models.vision.pixel_shuffle`)
  is done for all images at once by one gather: ``merge_index [T, f*f]`` holds, for each of the batch's T
  merged tokens, the flat indices (into the ``Bv * Lv`` slots) of its ``f x f`` block of patches in
  raster order, so ``x.reshape(Bv*Lv, Dv)[merge_index].reshape(T, f*f*Dv)`` is ``pixel_shuffle`` of every
  image, concatenated (:func:`merge_indices`; tested against ``pixel_shuffle``). The
  :class:`~jaxlab.models.vision.Projector` (LayerNorm, Dense, GELU, Dense) maps them to the LM's width.
* Text side: an example's tokens hold one ``image_token`` placeholder per image; each is expanded to
  ``(h/f)*(w/f)`` slots holding ``image_token`` (:func:`expand_image_placeholders`). ``image_slots
  [B, L]`` names the merged token of each slot (-1 on text), and the LM
  (:class:`~jaxlab.models.lm.LM` with ``embeds``/``embeds_mask``) reads the projected image tokens there
  (the scatter into the rows, written as a gather by slot) and its token embeddings elsewhere.
* Packing (:func:`pack_examples`): whole examples (images and text) go into ``[B, L]`` rows by the LM
  packer's best-fit (:func:`jaxlab.models.packing.pack_documents`, ``strategy="best_fit"``; an example
  is never cut), with its ``segment_ids``/``positions``, so each example attends to itself only (its image
  slots included; positions restart at 0 per example, image slots counted as tokens: Kimi-VL's LM keeps
  1D positions). Loss: ``mask`` (aligned with ``targets``) is the packer's mask, and also False where the
  target is an image slot (so neither the image slots predicting the next slot nor the token before an
  image, predicting its first slot, count) or a token the example's ``loss_mask`` excludes; the last
  image slot predicts the first text token after the image, and that target counts.

    cfg = VLMConfig(vit=ViTConfig(patch_size=8, d_model=64, num_layers=2, num_heads=2),
                    lm=LMConfig(vocab_size=259, d_model=64), image_token=256)
    batch = pack_examples(examples, seq_len=128, patch_size=8, image_len=128, image_token=256)
    model = VLM(cfg)
    params = init_vlm_params(model, key, batch)
    logits, aux = vlm_apply(model, params, batch)                     # [B, L, V]
    loss, metrics = next_token_loss(logits, batch["targets"], batch["mask"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.models.grounding import PointerHead, patch_candidates, pointer_mask
from jaxlab.models.lm import LM, LMConfig
from jaxlab.models.packing import pack_documents
from jaxlab.models.vision import PackedImages, Projector, ViT, ViTConfig, pack_images
from jaxlab.validation import check, check_positive

__all__ = ["CapacityError", "ExpandedText", "VLM", "VLMConfig", "VLMExample", "VLMImages", "expand_example",
           "expand_image_placeholders", "images_of", "init_vlm_params", "merge_indices", "pack_batch_images",
           "pack_examples", "vlm_apply"]


# ---- configuration --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """Configuration of :class:`VLM`: the encoder, the LM, and how image tokens enter the LM."""

    vit: ViTConfig
    """The vision encoder."""
    lm: LMConfig
    """The language model; its ``vocab_size`` includes ``image_token``."""
    image_token: int
    """Token id of the ``<image>`` placeholder and of the expanded image slots (an id of the LM's vocabulary
    that text never uses)."""
    merge_factor: int = 2
    """Side of the patch blocks merged into one image token (Kimi-VL: 2, four patches per token)."""
    projector_hidden: int | None = None
    """Hidden width of the projector MLP (None: its input width, merge_factor**2 * vit.d_model)."""
    pointer_dim: int | None = None
    """Width of the pointing head (:meth:`VLM.point`, GUI-Actor's coordinate-free grounding,
    :mod:`jaxlab.models.grounding`); None: no pointing head."""

    def __post_init__(self):
        check(isinstance(self.vit, ViTConfig), f"vit={self.vit!r} must be a models.vision.ViTConfig")
        check(isinstance(self.lm, LMConfig), f"lm={self.lm!r} must be a models.lm.LMConfig")
        check_positive(self, "merge_factor", integer=True)
        if self.projector_hidden is not None:
            check_positive(self, "projector_hidden", integer=True)
        if self.pointer_dim is not None:
            check_positive(self, "pointer_dim", integer=True)
        check(not isinstance(self.image_token, bool) and isinstance(self.image_token, int)
              and 0 <= self.image_token < self.lm.vocab_size,
              f"image_token={self.image_token!r} must be an int in [0, lm.vocab_size={self.lm.vocab_size})")

    @property
    def merged_dim(self) -> int:
        """Width of a merged image token: merge_factor**2 * vit.d_model."""
        return self.merge_factor ** 2 * self.vit.d_model


# ---- the text side --------------------------------------------------------------------------------
class ExpandedText(NamedTuple):
    """A token sequence with its image placeholders expanded (1-D int32 arrays of one length).

    Attributes:
      tokens: the tokens, ``image_token`` at every image slot.
      image_index: which of the example's images a slot belongs to (0, 1, ...), -1 on text.
      token_index: the merged image token of the slot within its image (raster order), -1 on text.
      source: index of each token in the unexpanded sequence (all slots of an image point at its placeholder).
    """

    tokens: np.ndarray
    image_index: np.ndarray
    token_index: np.ndarray
    source: np.ndarray


def _grids(grid_hw, factor: int) -> np.ndarray:
    grid = np.asarray(grid_hw, np.int64).reshape(-1, 2)
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor={factor!r} must be an int >= 1")
    for i, (h, w) in enumerate(grid):
        if h < 1 or w < 1 or h % factor or w % factor:
            raise ValueError(f"image {i}: patch grid ({h}, {w}) must be positive and divisible by factor={factor} "
                             "on both sides (image height and width multiples of factor * patch_size)")
    return grid


def expand_image_placeholders(tokens, grid_hw, image_token: int, factor: int = 2) -> ExpandedText:
    """Replace the i-th ``image_token`` of ``tokens`` (1-D ints) by ``(h_i/f) * (w_i/f)`` image slots for image
    i of patch grid ``grid_hw[i] = (h_i, w_i)``. Raises ``ValueError`` when the number of placeholders differs
    from the number of images, or a grid is not divisible by ``factor``."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D int array, got dtype {tokens.dtype} and shape {tokens.shape}")
    grid = _grids(grid_hw, factor)
    where = np.flatnonzero(tokens == image_token)
    if len(where) != len(grid):
        raise ValueError(f"tokens hold {len(where)} image placeholders (image_token={image_token}) but "
                         f"{len(grid)} images were given (grid_hw {grid.tolist()})")
    counts = np.ones(len(tokens), np.int64)
    counts[where] = (grid[:, 0] // factor) * (grid[:, 1] // factor)
    source = np.repeat(np.arange(len(tokens)), counts)  # [n'] index of each slot's token
    image_of_token = np.full(len(tokens), -1, np.int64)
    image_of_token[where] = np.arange(len(where))
    image_index = image_of_token[source]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # first slot of each token
    token_index = np.where(image_index >= 0, np.arange(len(source)) - starts[source], -1)
    return ExpandedText(tokens[source].astype(np.int32), image_index.astype(np.int32), token_index.astype(np.int32),
                        source.astype(np.int32))


# ---- the vision side ------------------------------------------------------------------------------
def merge_indices(packed: PackedImages, factor: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The 2x2 (``factor x factor``) patch merging of every packed image as one gather (host-side indices).

    Returns ``(merge_index [T, f*f], offsets [N + 1])``: row ``offsets[i] + k`` of ``merge_index`` holds the
    flat slots (into ``B * L`` of ``packed``) of the ``f x f`` patches of image i's merged token k, in the
    order of :func:`jaxlab.models.vision.pixel_shuffle`, so
    ``x.reshape(B*L, D)[merge_index].reshape(T, f*f*D)[offsets[i]:offsets[i+1]]`` equals
    ``pixel_shuffle(unpack_images(x, packed)[i], packed.grid_hw[i], f)``."""
    grid = _grids(packed.grid_hw, factor)
    ids = np.asarray(packed.image_ids)
    L = ids.shape[1]
    f = factor
    rows, offsets = [], [0]
    for i, (h, w) in enumerate(grid):
        b, t = np.nonzero(ids == i)
        start = b[0] * L + t[0]  # an image's patches are one contiguous run of slots, in raster order
        r, c, a, bb = np.meshgrid(np.arange(h // f), np.arange(w // f), np.arange(f), np.arange(f), indexing="ij")
        rows.append((start + (f * r + a) * w + f * c + bb).reshape(-1, f * f))  # [(h/f)*(w/f), f*f]
        offsets.append(offsets[-1] + len(rows[-1]))
    return np.concatenate(rows).astype(np.int32), np.asarray(offsets, np.int64)


class VLMImages(NamedTuple):
    """The vision inputs of a batch (a pytree of arrays).

    Attributes:
      patches: [Bv, Lv, P*P*C] packed patches (:func:`jaxlab.models.vision.pack_images`).
      segment_ids: int32 [Bv, Lv], 1, 2, ... per image within a row, 0 in padding.
      positions: int32 [Bv, Lv, 2], (row, col) of each patch in its image's grid.
      merge_index: int32 [T, f*f], the flat patch slots of each merged image token (:func:`merge_indices`;
        rows past the batch's image tokens are padding, never read).
    """

    patches: Any
    segment_ids: Any
    positions: Any
    merge_index: Any


# ---- the model ------------------------------------------------------------------------------------
class VLM(nn.Module):
    """ViT -> 2x2 pixel shuffle -> projector -> image tokens in the LM's input rows -> logits.

    ``__call__(tokens [B, L], images: VLMImages, image_slots [B, L], positions=None, segment_ids=None)
    -> (logits [B, L, V] fp32, aux)``: ``image_slots[b, t]`` is the merged image token (a row of
    ``images.merge_index``) read at slot (b, t), -1 where the LM reads the token embedding of
    ``tokens[b, t]``. ``aux`` is the LM's.
    """

    cfg: VLMConfig

    def setup(self):
        cfg = self.cfg
        self.vit = ViT(cfg.vit)
        self.projector = Projector(cfg.lm.d_model, hidden=cfg.projector_hidden, dtype=cfg.lm.compute_dtype,
                                   param_dtype=cfg.lm.storage_dtype)
        self.lm = LM(cfg.lm)
        if cfg.pointer_dim is not None:
            self.pointer = PointerHead(cfg.pointer_dim)

    def image_embeddings(self, images: VLMImages):
        """The projected image tokens of ``images``: [T, lm.d_model]."""
        return self._encode(images)[1]

    def _encode(self, images: VLMImages):
        """``(patch features [Bv*Lv, Dv], projected image tokens [T, lm.d_model])``."""
        cfg, (patches, segment_ids, positions, merge_index) = self.cfg, images
        ff = cfg.merge_factor ** 2
        if getattr(merge_index, "ndim", None) != 2 or merge_index.shape[1] != ff or merge_index.shape[0] < 1:
            raise ValueError(f"images.merge_index must be [T, merge_factor**2] = [T, {ff}] with T >= 1, got shape "
                             f"{getattr(merge_index, 'shape', merge_index)}")
        x = self.vit(patches, segment_ids, positions)  # [Bv, Lv, Dv]
        flat = x.reshape(-1, x.shape[-1])  # [Bv*Lv, Dv]
        merged = flat[merge_index].reshape(merge_index.shape[0], ff * x.shape[-1])  # [T, f*f*Dv], pixel shuffle
        return flat, self.projector(merged)  # [Bv*Lv, Dv], [T, d_model]

    def __call__(self, tokens, images: VLMImages, image_slots, positions=None, segment_ids=None):
        return self._forward(tokens, images, image_slots, positions, segment_ids)[:2]

    def _forward(self, tokens, images, image_slots, positions, segment_ids, return_hidden=False):
        if getattr(image_slots, "shape", None) != getattr(tokens, "shape", None):
            raise ValueError(f"image_slots must have the shape of tokens {getattr(tokens, 'shape', tokens)}, got "
                             f"{getattr(image_slots, 'shape', image_slots)}")
        features, embedded = self._encode(images)  # [Bv*Lv, Dv], [T, d_model]
        slots = jnp.asarray(image_slots, jnp.int32)
        embeds = embedded[jnp.maximum(slots, 0)]  # [B, L, d_model]
        out = self.lm(tokens, positions, segment_ids, embeds=embeds, embeds_mask=slots >= 0,
                      return_hidden=return_hidden)
        return (*out, features)

    def point(self, tokens, images: VLMImages, image_slots, query_index, positions=None, segment_ids=None):
        """The forward pass and the pointing head (``cfg.pointer_dim`` set): ``(logits [B, L, V], aux,
        pointer_logits [B, L, ff], valid [B, L, 1], points [B, L, ff, 2])``.

        ``query_index [B]``: the slot of each row whose hidden state queries (where the pointing token is
        input; one query per row). ``pointer_logits[b, s, j]`` scores the j-th patch of the merged image token
        at slot s (:func:`jaxlab.models.grounding.patch_candidates`: ``points`` are the patch centres (x, y) in
        image pixels); ``valid`` marks the image slots of the query's own example (its segment)."""
        if self.cfg.pointer_dim is None:
            raise ValueError("VLM.point needs a pointing head: VLMConfig.pointer_dim is None")
        query_index = jnp.asarray(query_index, jnp.int32)
        if query_index.shape != tokens.shape[:1]:
            raise ValueError(f"query_index must have shape {tokens.shape[:1]} (one query per row), got "
                             f"{query_index.shape}")
        logits, aux, hidden, features = self._forward(tokens, images, image_slots, positions, segment_ids,
                                                      return_hidden=True)  # hidden [B, L, d]
        flat, points = patch_candidates(images.merge_index, images.positions, image_slots, self.cfg.vit.patch_size)
        query = jnp.take_along_axis(hidden, query_index[:, None, None], axis=1)[:, 0]  # [B, d]
        pointer_logits = self.pointer(query, hidden, features[flat])  # [B, L, ff]
        valid = pointer_mask(image_slots, segment_ids, query_index)  # [B, L, 1]
        return logits, aux, pointer_logits.astype(jnp.float32), valid, points


def images_of(batch: dict) -> VLMImages:
    """The :class:`VLMImages` of a batch of :func:`pack_examples`."""
    return VLMImages(batch["patches"], batch["patch_segment_ids"], batch["patch_positions"], batch["merge_index"])


def vlm_apply(model: VLM, params, batch: dict):
    """``(logits [B, L, V], aux)`` of a batch of :func:`pack_examples`."""
    return model.apply({"params": params}, batch["inputs"], images_of(batch), batch["image_slots"],
                       batch["positions"], batch["segment_ids"])


def init_vlm_params(model: VLM, key, batch: dict) -> dict:
    """The parameters of ``model`` (plain arrays, the logical-axis boxes removed) for a batch's shapes:
    ``{"vit": ..., "projector": ..., "lm": ...}``, and ``"pointer"`` with a pointing head."""
    args = (batch["inputs"], images_of(batch), batch["image_slots"])
    if model.cfg.pointer_dim is None:
        variables = jax.jit(model.init)(key, *args, batch["positions"], batch["segment_ids"])
    else:
        query = np.zeros(np.shape(batch["inputs"])[:1], np.int32)
        init = jax.jit(lambda key, *a: model.init(key, *a, method=VLM.point))
        variables = init(key, *args, query, batch["positions"], batch["segment_ids"])
    return nn.unbox(variables["params"])


# ---- examples and batches -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VLMExample:
    """One example: its images and its tokens with one ``image_token`` placeholder per image."""

    images: tuple
    """Images ``[H, W, C]`` (H, W multiples of merge_factor * patch_size), in placeholder order."""
    tokens: np.ndarray
    """1-D int token ids with the placeholders."""
    loss_mask: np.ndarray | None = None
    """bool per token of ``tokens``: True where predicting that token counts in the loss (None: every text
    token). Image slots never count."""


class CapacityError(ValueError):
    """The examples need more text rows, image rows or image tokens than a fixed batch shape has."""


def _pad_rows(array: np.ndarray, rows: int, fill) -> np.ndarray:
    pad = np.full((rows - len(array),) + array.shape[1:], fill, array.dtype)
    return np.concatenate([array, pad])


def pack_examples(examples: Sequence[VLMExample], *, seq_len: int, patch_size: int, image_len: int,
                  image_token: int, factor: int = 2, num_rows: int | None = None, image_rows: int | None = None,
                  image_tokens: int | None = None, pad_id: int = 0, num_channels: int = 3) -> dict[str, np.ndarray]:
    """Pack whole examples into one batch: text rows ``[B, seq_len]`` and image rows ``[Bv, image_len]``.

    Text: each example's placeholders expanded, then placed by the LM packer's best fit (see the module
    docstring). Images: every image of the batch by :func:`jaxlab.models.vision.pack_images`. The batch is the
    LM batch schema (``inputs``, ``targets``, ``mask``, ``segment_ids``, ``positions``, all ``[B, L]``) plus
    ``image_slots`` [B, L] (merged image token of each slot, -1 on text), ``example_ids`` [B, L] (index into
    ``examples``, -1 on padding) and the :class:`VLMImages` fields ``patches``, ``patch_segment_ids``,
    ``patch_positions`` [Bv, Lv(, ...)], ``merge_index`` [T, f*f].

    ``num_rows``/``image_rows``/``image_tokens`` fix B, Bv and T (for ``jit``; None: as many as needed);
    :class:`CapacityError` when the examples need more. ``ValueError`` naming the example for an expanded
    example longer than ``seq_len`` (an example is never cut), and for what :func:`expand_example` checks (an
    image not of whole patches or of more than ``image_len`` patches, a patch grid not divisible by ``factor``, a
    placeholder count differing from its image count). ``num_channels`` is the patch width of a batch
    without images.
    """
    if len(examples) == 0:
        raise ValueError("examples must hold at least one example, got none")
    expanded, images, first_image = [], [], []
    for e, ex in enumerate(examples):
        text = expand_example(ex, f"examples[{e}]", patch_size=patch_size, image_token=image_token, factor=factor,
                              image_len=image_len)
        if len(text.tokens) > seq_len:
            raise ValueError(f"examples[{e}] needs {len(text.tokens)} slots ({len(ex.tokens)} tokens with "
                             f"{len(ex.images)} images expanded to {int((text.image_index >= 0).sum())} image "
                             f"slots), more than a row of seq_len={seq_len}: an example is never cut")
        keep = np.ones(len(ex.tokens), bool) if ex.loss_mask is None else np.asarray(ex.loss_mask, bool)
        if keep.shape != np.shape(ex.tokens):
            raise ValueError(f"examples[{e}].loss_mask has shape {keep.shape}, tokens {np.shape(ex.tokens)}")
        expanded.append((text, keep[text.source] & (text.image_index < 0)))
        first_image.append(len(images))
        images.extend(ex.images)

    # placement: the LM packer's best fit on documents of the examples' lengths holding their index + 1
    layout = pack_documents([np.full(len(t.tokens), e + 1, np.int32) for e, (t, _) in enumerate(expanded)],
                            seq_len, strategy="best_fit", pad_id=0)
    B = len(layout["inputs"])
    if num_rows is not None and B > num_rows:
        raise CapacityError(f"the {len(examples)} examples need {B} rows of seq_len={seq_len}, num_rows={num_rows}")
    rows = B if num_rows is None else num_rows
    example_ids = _pad_rows(layout["inputs"] - 1, rows, -1)  # [B, L]
    positions = _pad_rows(layout["positions"], rows, 0)
    segment_ids = _pad_rows(layout["segment_ids"], rows, 0)
    packer_mask = _pad_rows(layout["mask"], rows, False)

    inputs = np.full(example_ids.shape, pad_id, np.int32)
    counts = np.zeros(example_ids.shape, bool)  # the loss flag of the token in each slot
    image_of_slot = np.full(example_ids.shape, -1, np.int64)  # global image index of image slots
    token_of_slot = np.full(example_ids.shape, -1, np.int64)
    b, t = np.nonzero(example_ids >= 0)
    e, p = example_ids[b, t], positions[b, t]
    for k in np.unique(e):
        sel = e == k
        text, keep = expanded[k]
        inputs[b[sel], t[sel]] = text.tokens[p[sel]]
        counts[b[sel], t[sel]] = keep[p[sel]]
        local = text.image_index[p[sel]]
        image_of_slot[b[sel], t[sel]] = np.where(local >= 0, first_image[k] + local, -1)
        token_of_slot[b[sel], t[sel]] = text.token_index[p[sel]]
    targets = np.concatenate([inputs[:, 1:], np.full_like(inputs[:, :1], pad_id)], axis=1)  # [B, L]
    target_counts = np.concatenate([counts[:, 1:], np.zeros_like(counts[:, :1])], axis=1)
    mask = packer_mask & target_counts  # image-slot targets are never counted (keep is False there)

    vision, offsets = pack_batch_images(images, patch_size=patch_size, image_len=image_len, factor=factor,
                                        num_channels=num_channels, image_rows=image_rows, image_tokens=image_tokens)
    image_slots = np.where(image_of_slot >= 0, offsets[np.maximum(image_of_slot, 0)] + token_of_slot, -1)
    return {"inputs": inputs, "targets": targets.astype(np.int32), "mask": mask, "segment_ids": segment_ids,
            "positions": positions, "image_slots": image_slots.astype(np.int32),
            "example_ids": example_ids.astype(np.int32), "patches": vision.patches,
            "patch_segment_ids": vision.segment_ids, "patch_positions": vision.positions,
            "merge_index": vision.merge_index}


def expand_example(example: VLMExample, name: str, *, patch_size: int, image_token: int, factor: int = 2,
                   image_len: int | None = None) -> ExpandedText:
    """``example.tokens`` with each image placeholder expanded (:func:`expand_image_placeholders`), after checking
    every image: ``[H, W(, C)]`` with H and W multiples of ``patch_size`` and, with ``image_len``, at most
    ``image_len`` patches (one image row). ``ValueError`` messages start with ``name`` (``"examples[3]"``), as do
    the expansion's (a placeholder count differing from the image count, a patch grid not divisible by
    ``factor``)."""
    grids = []
    for j, image in enumerate(example.images):
        shape = np.shape(image)
        if len(shape) < 2 or shape[0] % patch_size or shape[1] % patch_size:
            raise ValueError(f"{name}.images[{j}] of shape {shape}: height and width must be multiples of "
                             f"patch_size={patch_size}")
        grids.append((shape[0] // patch_size, shape[1] // patch_size))
        if image_len is not None and grids[-1][0] * grids[-1][1] > image_len:
            raise ValueError(f"{name}.images[{j}] of shape {shape} has {grids[-1][0]}x{grids[-1][1]} patches, "
                             f"more than an image row of image_len={image_len}")
    try:
        return expand_image_placeholders(example.tokens, np.asarray(grids, np.int64).reshape(-1, 2), image_token,
                                         factor)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def pack_batch_images(images: Sequence[Any], *, patch_size: int, image_len: int, factor: int = 2,
                      num_channels: int = 3, image_rows: int | None = None,
                      image_tokens: int | None = None) -> tuple[VLMImages, np.ndarray]:
    """The vision inputs of a batch: every image packed at native resolution into rows of ``image_len`` patches
    (:func:`jaxlab.models.vision.pack_images`) and their merge gather (:func:`merge_indices`), padded to
    ``image_rows`` rows and ``image_tokens`` merged tokens (None: as many as needed, at least one); a batch
    without images gets one empty row of ``num_channels`` patches. Returns the :class:`VLMImages` and
    ``offsets [N + 1]`` (image i's merged tokens are rows ``offsets[i]:offsets[i + 1]`` of ``merge_index``).
    :class:`CapacityError` when the images need more rows or merged tokens than fixed."""
    if len(images):
        packed = pack_images(images, patch_size=patch_size, max_len=image_len)
        merge_index, offsets = merge_indices(packed, factor)
        patches, segment_ids, positions = packed.patches, packed.segment_ids, packed.positions
    else:  # text only: one empty image row, no merged token
        patches = np.zeros((1, image_len, patch_size * patch_size * num_channels), np.float32)
        segment_ids, positions = np.zeros((1, image_len), np.int32), np.zeros((1, image_len, 2), np.int32)
        merge_index, offsets = np.zeros((0, factor * factor), np.int32), np.zeros(1, np.int64)
    Bv, T = len(patches), len(merge_index)
    if image_rows is not None and Bv > image_rows:
        raise CapacityError(f"the {len(images)} images need {Bv} rows of image_len={image_len}, "
                            f"image_rows={image_rows}")
    if image_tokens is not None and T > image_tokens:
        raise CapacityError(f"the {len(images)} images give {T} merged tokens, image_tokens={image_tokens}")
    Bv = Bv if image_rows is None else image_rows
    T = max(T, 1) if image_tokens is None else image_tokens
    return VLMImages(_pad_rows(np.asarray(patches, np.float32), Bv, 0),
                     _pad_rows(np.asarray(segment_ids, np.int32), Bv, 0),
                     _pad_rows(np.asarray(positions, np.int32), Bv, 0),
                     _pad_rows(np.asarray(merge_index, np.int32), T, 0)), offsets
