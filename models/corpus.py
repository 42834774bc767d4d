"""Byte-level text corpora for LM training: loading, a stable train/validation split, resumable batches.

Tokens are the UTF-8 bytes of the text (``VOCAB_SIZE = 256``); no special ids are needed because
documents are kept apart by ``segment_ids`` (see :mod:`jaxlab.models.packing`), not by separator
tokens. ``PAD_ID = 0`` (the NUL byte) fills unused slots of a padded row; it never occurs inside a
document, since a file containing NUL is treated as binary and skipped. One token is one byte, so
bits per byte = cross-entropy in nats / ln 2.

Sources (:func:`load_corpus`):

* ``None``: the default corpus, the ``.py`` files of the running Python's standard library
  (``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded): every machine has it.
* a text file: one document;  a folder: every file under it, one document each;
* a ``.jsonl`` file: one document per line, from its ``"text"`` field.

Empty (whitespace only), binary (a NUL byte or invalid UTF-8) and unreadable inputs are skipped and
counted. Each document goes to validation when the SHA-256 of its name (path relative to the data
root, or ``file.jsonl:line``) falls below ``val_fraction``: the split does not depend on file order,
absolute paths or the machine. When that leaves one side empty (a single file, very few documents),
the last ``val_fraction`` of every document's bytes is held out instead.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import pathlib
import sysconfig

import numpy as np

from jaxlab.models.packing import StreamPacker

__all__ = ["PAD_ID", "VOCAB_SIZE", "Corpus", "PackedIterator", "decode", "encode", "load_corpus", "stdlib_root"]

VOCAB_SIZE = 256
PAD_ID = 0
SKIP_REASONS = ("empty", "binary", "unreadable")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes as a uint8 token array."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).copy()


def decode(tokens) -> str:
    """Tokens (any int array) back to text; bytes that are not valid UTF-8 become U+FFFD."""
    return bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", errors="replace")


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Tokenised documents split into train and validation; ``skipped`` counts rejected inputs by reason."""

    train: tuple[np.ndarray, ...]
    validation: tuple[np.ndarray, ...]
    source: str
    skipped: dict[str, int]
    split: str
    """"hash" (whole documents by name hash) or "tail" (the end of every document held out)."""

    @property
    def num_bytes(self) -> dict[str, int]:
        return {"train": int(sum(map(len, self.train))), "validation": int(sum(map(len, self.validation)))}

    def describe(self) -> str:
        n = self.num_bytes
        skipped = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v) or "none"
        return (f"{self.source}: {len(self.train)} train documents ({n['train']:,} bytes), "
                f"{len(self.validation)} validation ({n['validation']:,} bytes), split by {self.split}; "
                f"skipped: {skipped}")


def _text_from_bytes(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason)."""
    if b"\x00" in raw:
        return None, "binary"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "binary"
    if not text.strip():
        return None, "empty"
    return text, None


def _hash_unit(name: str) -> float:
    """A uniform number in [0, 1) from the name alone."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def _documents(data: pathlib.Path | None, skipped: collections.Counter) -> list[tuple[str, str]]:
    """(name, text) pairs of the usable documents, in a deterministic order."""
    if data is None:
        root = stdlib_root()
        paths = sorted(p for p in root.rglob("*.py") if not _EXCLUDED_DIRS & set(p.relative_to(root).parts))
    elif data.is_dir():
        root = data
        paths = sorted(p for p in data.rglob("*") if (p.is_file() or p.is_symlink())
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    elif data.is_file():
        root, paths = data.parent, [data]
    else:
        raise ValueError(f"data={str(data)!r} is neither a file nor a folder")
    docs = []
    for path in paths:
        name = path.relative_to(root).as_posix()
        try:
            raw = path.read_bytes()
        except OSError:
            skipped["unreadable"] += 1
            continue
        if path.suffix == ".jsonl":
            docs.extend(_jsonl_documents(name, raw, skipped))
            continue
        text, reason = _text_from_bytes(raw)
        if reason:
            skipped[reason] += 1
        else:
            docs.append((name, text))
    return docs


def _jsonl_documents(name: str, raw: bytes, skipped: collections.Counter) -> list[tuple[str, str]]:
    docs = []
    for i, line in enumerate(raw.splitlines()):
        if not line.strip():
            continue
        try:
            text = json.loads(line).get("text")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            skipped["unreadable"] += 1
            continue
        if not isinstance(text, str) or "\x00" in text:
            skipped["unreadable" if not isinstance(text, str) else "binary"] += 1
        elif not text.strip():
            skipped["empty"] += 1
        else:
            docs.append((f"{name}:{i}", text))
    return docs


def load_corpus(data: str | pathlib.Path | None = None, *, val_fraction: float = 0.05,
                max_documents: int | None = None) -> Corpus:
    """Load, tokenise and split a corpus (see the module docstring for the sources and the split).

    ``max_documents`` keeps the first documents by name hash (a deterministic random subset).
    Raises ValueError when the data does not exist or holds no usable document.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1)")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents={max_documents!r} must be None or >= 1")
    path = None if data is None or str(data) == "" else pathlib.Path(data).expanduser()
    skipped: collections.Counter = collections.Counter({k: 0 for k in SKIP_REASONS})
    docs = _documents(path, skipped)
    source = "python stdlib" if path is None else str(path)
    if not docs:
        detail = ", ".join(f"{k}={v}" for k, v in skipped.items())
        raise ValueError(f"data={source!r} holds no usable document (skipped: {detail})")
    if max_documents is not None:
        docs = sorted(docs, key=lambda d: _hash_unit("subset:" + d[0]))[:max_documents]
        docs.sort()
    held_out = [_hash_unit(name) < val_fraction for name, _ in docs]
    if any(held_out) and not all(held_out):
        train = tuple(encode(t) for (_, t), v in zip(docs, held_out) if not v)
        validation = tuple(encode(t) for (_, t), v in zip(docs, held_out) if v)
        split = "hash"
    else:
        tokens = [encode(t) for _, t in docs]
        cuts = [len(x) - max(1, math.ceil(val_fraction * len(x))) for x in tokens]
        train = tuple(x[:c] for x, c in zip(tokens, cuts) if c > 0)
        validation = tuple(x[c:] for x, c in zip(tokens, cuts))
        split = "tail"
        if not train:
            raise ValueError(f"data={source!r} is too small to split (total {sum(map(len, tokens))} bytes)")
    return Corpus(train=train, validation=validation, source=source, skipped=dict(skipped), split=split)


class PackedIterator:
    """Endless packed training batches ``[batch_size, seq_len]`` (see :mod:`jaxlab.models.packing`),
    the document order reshuffled every epoch from ``(seed, epoch)``; resumable with
    ``get_state``/``set_state`` (the ``jaxlab.loop.DataIterator`` protocol)."""

    def __init__(self, docs, batch_size: int, seq_len: int, *, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"{batch_size=} must be >= 1")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle

        def order(epoch: int) -> np.ndarray:
            if not shuffle:
                return np.arange(len(docs))
            return np.random.default_rng([seed, epoch]).permutation(len(docs))

        self._packer = StreamPacker(docs, seq_len, order=order, pad_id=PAD_ID)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self._packer.next_rows(self.batch_size)

    def get_state(self) -> dict:
        return self._packer.get_state()

    def set_state(self, state: dict) -> None:
        self._packer.set_state(state)
