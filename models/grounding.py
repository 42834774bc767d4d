"""Coordinate-free visual grounding: a pointing head over image patches (GUI-Actor, Wu et al. 2025,
"GUI-Actor: Coordinate-Free Visual Grounding for GUI Agents", arXiv 2506.03143).

A VLM that writes a click's coordinates as digits must learn where each image token lies on the screen and
spell it; GUI-Actor instead lets the LM write a pointing token (``<ACTOR>``) and reads the location off an
attention head: the pointing token's hidden state is the query, the image's patches are the keys, and the
softmax over patches is the policy's distribution over where to point. The point is the chosen patch's centre.

    query  q = W_q h_t                                  h_t: LM hidden state where the pointing token is input
    keys   k_{s,j} = W_o gelu(W_c h_s + W_p v_{s,j} + e_j)  h_s: LM hidden state at image slot s (a merged token)
                                                       v_{s,j}: ViT output of the j-th of its f*f patches
    logit_{s,j} = q . k_{s,j} / sqrt(d_head)           over the slots of the query's own image(s)

Pointing at the ViT's patches (not at the merged tokens the LM reads) keeps the resolution of a patch: with
8-pixel patches every box at least 8 pixels wide and tall holds a patch centre.

Training (GUI-Actor section 3.2 supervises every patch that overlaps the target box): the loss here is the
negative log of the probability mass on the patches whose centres lie in the box, the probability that a
sampled point does the step's job. :func:`choose_point` samples a patch (or takes the most likely at
temperature 0) and returns its log-probability, the pointing part of the action's log-probability for
policy-gradient methods.

Greedy pointing (GUI-Actor's inference without the verifier): the most likely patch alone throws away how the
probability is spread. :func:`region_point` keeps the patches with at least ``threshold`` times the largest
probability, joins side-adjacent ones into regions, takes the region of the highest mean probability and
points at its probability-weighted centre, so a target whose mass is spread over its patches is still hit.

Shapes: ``B`` rows, ``L`` slots, ``ff = merge_factor**2`` patches per merged token, ``Dv`` the ViT width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

__all__ = ["NEG_INF", "PointerHead", "box_targets", "choose_point", "patch_candidates", "pointer_log_probs",
           "pointer_loss", "pointer_mask", "points_in_boxes", "region_point"]

NEG_INF = -1e9
"""Logit of a patch that cannot be pointed at (finite, so masked entries never make a NaN)."""


class PointerHead(nn.Module):
    """``(query [B, d], slot_hidden [B, L, d], patch_features [B, L, ff, Dv]) -> logits [B, L, ff]`` (see the
    module docstring; masking is the caller's, :func:`pointer_mask`)."""

    d_head: int = 64

    @nn.compact
    def __call__(self, query, slot_hidden, patch_features):
        ff = patch_features.shape[2]
        q = nn.Dense(self.d_head, name="query")(query)  # [B, K]
        sub = nn.Embed(ff, self.d_head, name="sub_patch")(jnp.arange(ff))  # [ff, K]
        k = (nn.Dense(self.d_head, name="slot")(slot_hidden)[:, :, None, :]  # [B, L, 1, K]
             + nn.Dense(self.d_head, use_bias=False, name="patch")(patch_features) + sub)  # [B, L, ff, K]
        k = nn.Dense(self.d_head, name="key")(nn.gelu(k))  # [B, L, ff, K]
        return jnp.einsum("bk,blfk->blf", q, k) / jnp.sqrt(self.d_head).astype(q.dtype)  # [B, L, ff]


def patch_candidates(merge_index, patch_positions, image_slots, patch_size: int):
    """The patches a pointer can choose at each slot and their centres.

    ``merge_index [T, ff]`` (flat patch slots of each merged token), ``patch_positions [Bv, Lv, 2]`` (row, col
    of each patch in its image), ``image_slots [B, L]`` (merged token per slot, -1 on text). Returns ``flat
    [B, L, ff]`` (indices into the ``Bv * Lv`` patch slots; 0 where the slot is text) and ``points [B, L, ff,
    2]``: each patch's centre ``(x, y)`` in image pixels, ``(col + 1/2, row + 1/2) * patch_size``."""
    slots = jnp.asarray(image_slots, jnp.int32)
    flat = jnp.asarray(merge_index, jnp.int32)[jnp.maximum(slots, 0)]  # [B, L, ff]
    rc = jnp.asarray(patch_positions, jnp.int32).reshape(-1, 2)[flat]  # [B, L, ff, 2] (row, col)
    points = rc[..., ::-1] * patch_size + patch_size // 2  # [B, L, ff, 2] (x, y)
    return flat, points


def pointer_mask(image_slots, segment_ids, query_index):
    """bool ``[B, L, ff]``-broadcastable ``[B, L, 1]``: the image slots of the query's own example (its
    segment; every image slot of the row when ``segment_ids`` is None). ``query_index [B]``: the query slot."""
    slots = jnp.asarray(image_slots)
    valid = slots >= 0  # [B, L]
    if segment_ids is not None:
        own = jnp.take_along_axis(segment_ids, query_index[:, None], axis=1)  # [B, 1]
        valid &= segment_ids == own
    return valid[..., None]  # [B, L, 1]


def points_in_boxes(points, boxes):
    """bool ``[B, L, ff]``: whether each candidate point ``[B, L, ff, 2]`` (x, y) lies in its row's box
    ``boxes [B, 4]`` ``(x0, y0, x1, y1)``, ends exclusive (as ``rl.gui.click_in_box``)."""
    x, y = points[..., 0], points[..., 1]
    b = jnp.asarray(boxes)[:, None, None, :]  # [B, 1, 1, 4]
    return (b[..., 0] <= x) & (x < b[..., 2]) & (b[..., 1] <= y) & (y < b[..., 3])


def box_targets(points, boxes, patch_size: int):
    """bool ``[B, L, ff]``: the patches a pointer should choose for each row's box: those whose centre lies in
    the box (:func:`points_in_boxes`), or, for a box too small to hold any candidate's centre, those the box
    overlaps (GUI-Actor's labels: every patch overlapping the box). ``points [B, L, ff, 2]`` patch centres,
    ``boxes [B, 4]``."""
    centre = points_in_boxes(points, boxes)  # [B, L, ff]
    half = patch_size // 2
    x, y, b = points[..., 0], points[..., 1], jnp.asarray(boxes)[:, None, None, :]
    overlap = (x - half < b[..., 2]) & (b[..., 0] < x + half) & (y - half < b[..., 3]) & (b[..., 1] < y + half)
    some = centre.reshape(centre.shape[0], -1).any(axis=-1)[:, None, None]  # [B, 1, 1]
    return jnp.where(some, centre, overlap)


def pointer_loss(logits, valid, inside, weight):
    """``sum_b weight_b * -log P_b(box) / sum_b weight_b``: the negative log-probability that the pointer
    lands in the box, ``P_b(box) = sum_{valid & inside} softmax(logits_b)``, over the rows with ``weight > 0``.

    ``logits [B, L, ff]``, ``valid`` and ``inside`` (the targets, :func:`box_targets`) bool broadcastable to
    it, ``weight [B]`` (0: a row without a pointing step). A weighted row whose targets are all invalid is an
    error of the data: its loss is about ``-NEG_INF`` (finite, so the mean shows it rather than turning NaN);
    a row with no valid candidate at all (no image) adds 0. Returns ``(loss, accuracy)``: the mean loss and
    the fraction of weighted rows whose most likely patch is in the box."""
    B = logits.shape[0]
    hit = jnp.broadcast_to(valid & inside, logits.shape).reshape(B, -1)  # [B, L*ff]
    logits = jnp.where(valid, logits, NEG_INF).reshape(B, -1)  # [B, L*ff]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B]
    log_box = jax.nn.logsumexp(jnp.where(hit, logits, NEG_INF), axis=-1)  # [B]
    w = jnp.asarray(weight, jnp.float32)
    denom = jnp.maximum(w.sum(), 1.0)
    loss = jnp.sum(w * (log_z - log_box)) / denom
    best = jnp.take_along_axis(hit, jnp.argmax(logits, axis=-1)[:, None], axis=1)[:, 0]  # [B]
    return loss, jnp.sum(w * best) / denom


def pointer_log_probs(logits, valid, temperature):
    """``log softmax(logits / temperature)`` over each row's valid candidates, flat: ``[B, L*ff]`` (index
    ``l * ff + j``; invalid candidates about ``NEG_INF``). ``temperature <= 0`` (a traced value is fine) means
    the untempered distribution."""
    flat = jnp.where(valid, logits, NEG_INF).reshape(logits.shape[0], -1)  # [B, L*ff]
    return jax.nn.log_softmax(flat / jnp.where(temperature <= 0, 1.0, temperature), axis=-1)


def choose_point(logits, valid, points, key, temperature):
    """Point with each row's pointer: ``(index [B], point [B, 2] (x, y), logp [B])``.

    Samples from ``softmax(logits / temperature)`` over the valid candidates (``key``), or takes the most
    likely at ``temperature == 0`` (a traced value is fine); ``logp`` is the log-probability of the choice
    under the distribution sampled (:func:`pointer_log_probs`: the temperature's; the untempered one when
    greedy), ``index`` the flat candidate ``l * ff + j``."""
    B = logits.shape[0]
    logp_all = pointer_log_probs(logits, valid, temperature)  # [B, L*ff]
    index = jnp.where(temperature <= 0, jnp.argmax(logp_all, axis=-1),
                      jax.random.categorical(key, logp_all, axis=-1))  # [B]
    logp = jnp.take_along_axis(logp_all, index[:, None], axis=1)[:, 0]  # [B]
    point = jnp.take_along_axis(points.reshape(B, -1, 2), index[:, None, None], axis=1)[:, 0]  # [B, 2]
    return index, point, logp


def region_point(probs, points, patch_size: int, threshold: float = 0.3) -> tuple[np.ndarray, float]:
    """GUI-Actor's greedy point from one pointer distribution (host numpy): ``(point [2] (x, y), score)``.

    ``probs [N]`` (a softmax over the candidates; 0 where invalid), ``points [N, 2]`` their patch centres
    ``(x, y)`` in pixels, on one image's grid of ``patch_size`` cells. The patches with ``probs >= threshold *
    max(probs)`` are joined into 4-connected regions on that grid; the region of the highest mean probability
    (``score``; the first found on ties) gives the point, its patches' centres weighted by their
    probabilities (float pixels, not always a patch centre). ``threshold = 1`` keeps only the most likely
    patch(es)."""
    probs, points = np.asarray(probs, np.float64), np.asarray(points)
    if probs.ndim != 1 or points.shape != (probs.shape[0], 2):
        raise ValueError(f"probs must be [N] and points [N, 2], got {probs.shape} and {points.shape}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r} must be in (0, 1]")
    top = probs.max(initial=0.0)
    if not top > 0:
        raise ValueError("probs has no positive entry: no candidate to point at")
    active = probs >= threshold * top  # [N]
    cells = points[active] // patch_size  # [n, 2] (col, row)
    grid = np.zeros(tuple(cells.max(axis=0)[::-1] + 1), np.float64)  # [rows, cols]
    np.maximum.at(grid, (cells[:, 1], cells[:, 0]), probs[active])  # a patch listed twice counts once
    labels, count = ndimage.label(grid > 0)  # 4-connectivity (the default structure), labels 1..count
    index = np.arange(1, count + 1)
    means = ndimage.mean(grid, labels, index)  # [count]
    best = labels == index[int(np.argmax(means))]  # [rows, cols]
    rows, cols = np.nonzero(best)
    w = grid[rows, cols]
    centre = np.stack([cols, rows], axis=1) * patch_size + patch_size // 2  # [m, 2] (x, y), as patch_candidates
    return (w[:, None] * centre).sum(axis=0) / w.sum(), float(means.max())
