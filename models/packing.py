"""Sequence packing: variable-length documents in fixed ``[B, L]`` rows with no compute spent on padding.

A packed batch is a dict of int32/bool arrays of shape ``[B, L]`` in the one batch schema of every LM
task (the synthetic tasks of :mod:`jaxlab.models.synthetic` use the same first three keys)::

    inputs       token ids fed to the model (``pad_id`` in unused slots)
    targets      the token each position predicts: ``inputs[:, t + 1]`` (``pad_id`` at t = L - 1)
    mask         True where ``targets[:, t]`` is a real target, aligned with ``targets``: t and t + 1
                 lie in the same piece. The first token of a piece is never a target, so no
                 prediction crosses a document boundary, and padding never contributes.
    segment_ids  1, 2, 3, ... per document piece within a row; 0 marks padding
    positions    position of each token inside its piece (0 at every piece start)

The loss is :func:`jaxlab.models.lm.next_token_loss(logits, batch["targets"], batch["mask"])`.

:class:`jaxlab.models.lm.LM` takes ``segment_ids`` and ``positions`` directly: attention masks across
segments and the recurrent mixers reset their state at segment starts, so a packed row computes
exactly what its documents would compute one by one.

Two strategies:

* ``"stream"`` (pre-training): documents are laid end to end and cut at row boundaries; a document
  longer than the room left in a row continues, as a new piece, at the start of the next row. Only
  the very last row can hold padding. :class:`StreamPacker` does this incrementally with a resumable
  cursor.
* ``"best_fit"`` (fine-tuning, where examples must stay whole): each document (cut into pieces of at
  most L only if it is longer than L) goes into the fullest row it still fits in (best-fit
  decreasing bin packing).

Efficiency (:func:`packing_stats`) is the fraction of the ``B x L`` token slots holding real tokens;
the baseline it is compared with (:func:`padded_efficiency`) is the usual pad-to-longest batching of
the same pieces, ``batch_size`` consecutive pieces per batch, each batch padded to its longest piece.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["PackingStats", "StreamPacker", "pack_documents", "pad_documents", "packing_stats", "padded_efficiency",
           "split_long", "target_mask_from_segments"]

STRATEGIES = ("stream", "best_fit")


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} must be an int >= 2")


def target_mask_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """bool [B, L]: True at t when t and t + 1 are in the same (non-padding) segment; False at t = L-1."""
    seg = np.asarray(segment_ids)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)  # [B, L-1]
    return np.concatenate([same, np.zeros_like(same[:, :1])], axis=1)


def _empty_rows(num_rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    return {"inputs": np.full((num_rows, seq_len), pad_id, np.int32),
            "segment_ids": np.zeros((num_rows, seq_len), np.int32),
            "positions": np.zeros((num_rows, seq_len), np.int32)}


def _finish(rows: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Add ``targets`` (inputs shifted left by one, ``pad_id`` last) and their ``mask``."""
    inputs = rows["inputs"]
    targets = np.concatenate([inputs[:, 1:], np.full_like(inputs[:, :1], pad_id)], axis=1)  # [B, L]
    return {"inputs": inputs, "targets": targets, "mask": target_mask_from_segments(rows["segment_ids"]),
            "segment_ids": rows["segment_ids"], "positions": rows["positions"]}


class StreamPacker:
    """Fill rows from a stream of documents, cutting at row boundaries; the cursor makes it resumable.

    ``docs`` is a sequence of 1-D integer arrays and ``order(epoch)`` the document order of an epoch
    (default: the given order every epoch). The cursor ``(epoch, index, offset)`` points at token
    ``offset`` of document ``order(epoch)[index]``; when an epoch runs out mid-row the next epoch
    continues filling it, so rows never hold padding. With ``epochs`` set, the stream ends after that
    many epochs and only the last row can be partly padding.
    """

    def __init__(self, docs: Sequence[np.ndarray], seq_len: int, *, order=None, epochs: int | None = None,
                 pad_id: int = 0):
        _check_seq_len(seq_len)
        if len(docs) == 0 or sum(len(d) for d in docs) == 0:
            raise ValueError(f"docs must hold at least one non-empty document, got {len(docs)} documents")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs={epochs!r} must be None or >= 1")
        self.docs, self.seq_len, self.pad_id, self.epochs = docs, int(seq_len), pad_id, epochs
        self._order_fn = order if order is not None else (lambda epoch: np.arange(len(docs)))
        self._order_epoch, self._order = None, None
        self.epoch, self.index, self.offset = 0, 0, 0

    @property
    def exhausted(self) -> bool:
        return self.epochs is not None and self.epoch >= self.epochs

    def _order_of(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = np.asarray(self._order_fn(epoch)), epoch
        return self._order

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "offset": self.offset}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index, self.offset = int(state["epoch"]), int(state["index"]), int(state["offset"])

    def next_rows(self, num_rows: int) -> dict[str, np.ndarray]:
        """The next ``num_rows`` rows, advancing the cursor (fewer, the last one padded, at the end
        of a finite stream)."""
        rows = _empty_rows(num_rows, self.seq_len, self.pad_id)
        used = 0
        for r in range(num_rows):
            if self.exhausted:
                break
            used, t, seg = r + 1, 0, 0
            while t < self.seq_len and not self.exhausted:
                order = self._order_of(self.epoch)
                if self.index >= len(order):
                    self.epoch, self.index, self.offset = self.epoch + 1, 0, 0
                    continue
                doc = self.docs[order[self.index]]
                n = min(len(doc) - self.offset, self.seq_len - t)
                if n > 0:
                    seg += 1
                    rows["inputs"][r, t:t + n] = doc[self.offset:self.offset + n]
                    rows["segment_ids"][r, t:t + n] = seg
                    rows["positions"][r, t:t + n] = np.arange(n)
                    t, self.offset = t + n, self.offset + n
                if self.offset >= len(doc):
                    self.index, self.offset = self.index + 1, 0
        return _finish({k: v[:used] for k, v in rows.items()}, self.pad_id)


def split_long(docs: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Cut every document into consecutive pieces of at most ``max_len`` tokens (empty ones dropped)."""
    _check_seq_len(max_len)
    return [d[i:i + max_len] for d in docs for i in range(0, len(d), max_len)]


def pack_documents(docs: Sequence[np.ndarray], seq_len: int, *, strategy: str = "stream",
                   pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pack all ``docs`` (1-D int arrays) into ``[R, seq_len]`` rows; see the module docstring.

    ``"stream"`` returns ``ceil(total / seq_len)`` rows, padding only the last; ``"best_fit"`` keeps
    every document (or L-sized piece of a longer one) whole inside one row.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    _check_seq_len(seq_len)
    total = int(sum(len(d) for d in docs))
    if total == 0:
        raise ValueError(f"docs must hold at least one non-empty document, got {len(docs)} documents")
    if strategy == "stream":
        return StreamPacker(docs, seq_len, epochs=1, pad_id=pad_id).next_rows(-(-total // seq_len))
    pieces = split_long(docs, seq_len)
    by_length = sorted(range(len(pieces)), key=lambda i: -len(pieces[i]))
    room = np.zeros(0, np.int64)  # free slots of every open row
    placement = []  # (row, piece index)
    for i in by_length:
        n = len(pieces[i])
        fits = np.flatnonzero(room >= n)
        if fits.size:
            row = int(fits[np.argmin(room[fits])])  # best fit: the fullest row that still has room
        else:
            room, row = np.append(room, seq_len), len(room)
        room[row] -= n
        placement.append((row, i))
    rows = _empty_rows(len(room), seq_len, pad_id)
    filled = np.zeros(len(room), np.int64)
    counts = np.zeros(len(room), np.int64)
    for row, i in sorted(placement):  # within a row, pieces in their original order
        n, t = len(pieces[i]), filled[row]
        counts[row] += 1
        rows["inputs"][row, t:t + n] = pieces[i]
        rows["segment_ids"][row, t:t + n] = counts[row]
        rows["positions"][row, t:t + n] = np.arange(n)
        filled[row] += n
    return _finish(rows, pad_id)


def pad_documents(docs: Sequence[np.ndarray], *, pad_id: int = 0, length: int | None = None) -> dict[str, np.ndarray]:
    """The unpacked baseline: one document per row, padded to the longest (or to ``length``)."""
    longest = max((len(d) for d in docs), default=0)
    length = longest if length is None else length
    if not docs or longest == 0 or longest > length:
        raise ValueError(f"need non-empty docs no longer than {length=}, got lengths {[len(d) for d in docs][:8]}")
    rows = _empty_rows(len(docs), length, pad_id)
    for r, d in enumerate(docs):
        rows["inputs"][r, :len(d)] = d
        rows["segment_ids"][r, :len(d)] = 1
        rows["positions"][r, :len(d)] = np.arange(len(d))
    return _finish(rows, pad_id)


@dataclasses.dataclass(frozen=True)
class PackingStats:
    """How much of a batch is real work."""

    real_tokens: int
    slots: int
    targets: int
    """Positions with a loss (``mask``)."""

    @property
    def efficiency(self) -> float:
        """Fraction of token slots holding real tokens (1.0 = no padding)."""
        return self.real_tokens / self.slots

    @property
    def target_fraction(self) -> float:
        """Fraction of token slots that carry a loss."""
        return self.targets / self.slots


def packing_stats(rows: dict[str, np.ndarray]) -> PackingStats:
    """Real tokens, slots and targets of packed (or padded) rows."""
    seg = np.asarray(rows["segment_ids"])
    return PackingStats(real_tokens=int((seg != 0).sum()), slots=int(seg.size),
                        targets=int(np.asarray(rows["mask"]).sum()))


def padded_efficiency(lengths: Sequence[int], batch_size: int, seq_len: int) -> PackingStats:
    """Pad-to-longest baseline: documents cut into pieces of at most ``seq_len``, ``batch_size``
    consecutive pieces per batch, every row of a batch padded to the batch's longest piece."""
    _check_seq_len(seq_len)
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be >= 1")
    lengths = np.asarray(lengths, np.int64)
    if lengths.sum() == 0:
        raise ValueError("lengths must include at least one non-empty document")
    # each document's full pieces, then its remainder, in document order
    order = np.concatenate([np.append(np.full(n // seq_len, seq_len), [n % seq_len] if n % seq_len else [])
                            for n in lengths]).astype(np.int64)
    num_batches = -(-len(order) // batch_size)
    padded = np.zeros(num_batches * batch_size, np.int64)
    padded[:len(order)] = order
    longest = padded.reshape(num_batches, batch_size).max(axis=1)
    rows_per_batch = np.minimum(batch_size, len(order) - np.arange(num_batches) * batch_size)
    return PackingStats(real_tokens=int(order.sum()), slots=int((longest * rows_per_batch).sum()),
                        targets=int(np.maximum(order - 1, 0).sum()))
