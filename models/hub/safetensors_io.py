"""Reading and writing safetensors checkpoints one tensor at a time, single-file or sharded with an index.

A Hugging Face checkpoint folder holds ``model.safetensors``, or shards ``model-0000k-of-0000n.safetensors``
listed by ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {tensor:
file}}``). :class:`CheckpointReader` parses each file's header once (:func:`read_header`: the 8-byte
little-endian length, then the JSON header, validated as the safetensors format requires: dtypes, shapes, byte
sizes, offsets contiguous from 0 and ending at the end of the file) and reads one tensor when asked, so loading
never holds a host copy of the whole checkpoint; shapes and dtypes come from that one parse without reading
data. A tensor is read with a plain file read (the header's ``data_offsets``) into
a fresh 64-byte-aligned buffer, not through a memory map: pages of a mapped file stay resident in the
process while it is mapped (a whole extra copy of the checkpoint by the end of a load), and an aligned
buffer becomes a CPU ``jax.Array`` without a copy. :func:`write_checkpoint` fills shards of at most
``max_shard_bytes`` (a tensor larger than that gets a shard of its own) and writes the index when there
is more than one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np
import safetensors.numpy

__all__ = ["INDEX_FILE", "SINGLE_FILE", "CheckpointReader", "TensorInfo", "read_header", "write_checkpoint"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
"""Bytes per element of the safetensors dtypes whose sizes :func:`read_header` checks."""
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's limit on the JSON header
ALIGN = 64  # bytes: XLA:CPU adopts an aligned host buffer instead of copying it


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header: stored dtype, shape and absolute byte range in its file."""

    dtype: str
    """The stored dtype ("F32", "BF16", ...)."""
    shape: tuple[int, ...]
    start: int
    """First byte in the file (the header's ``data_offsets`` count from the end of the header)."""
    end: int


def read_header(path: pathlib.Path) -> dict[str, TensorInfo]:
    """``{tensor: TensorInfo}`` of a safetensors file from one read of its header, checked as the format
    requires (``ValueError`` "``path``: not a readable safetensors file (...)" otherwise): a header length that
    fits the file, a JSON object header of ``{"dtype", "shape", "data_offsets"}`` entries (``__metadata__``
    apart), each tensor's byte size ``prod(shape) * itemsize`` (for the dtypes of :data:`DTYPE_BYTES`), and
    the data offsets contiguous from 0 to the end of the file."""
    def bad(why: str):
        return ValueError(f"{path}: not a readable safetensors file ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"header length {n} does not fit the file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")
    tensors, end = {}, 0
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        ordered = sorted(entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))
        for name, entry in ordered:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            if lo != end or hi < lo:
                raise bad(f"tensor {name!r} has data_offsets {[lo, hi]}, expected to start at {end}")
            if dtype in DTYPE_BYTES and hi - lo != math.prod(shape) * DTYPE_BYTES[dtype]:
                raise bad(f"tensor {name!r} ({dtype}, shape {list(shape)}) spans {hi - lo} bytes")
            tensors[name] = TensorInfo(dtype, shape, 8 + n + lo, 8 + n + hi)
            end = hi
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(path)):
            raise
        raise bad(f"malformed header entry: {e!r}") from None
    if 8 + n + end != size:
        raise bad(f"the tensors' data ends at byte {8 + n + end}, the file has {size} (truncated or padded)")
    return {name: tensors[name] for name in entries}


def _read_aligned(path: pathlib.Path, start: int, end: int, dtype, shape) -> np.ndarray:
    """Bytes ``[start, end)`` of ``path`` as a C-contiguous array in a fresh ALIGN-aligned buffer."""
    raw = np.empty(end - start + ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % ALIGN
    buf = raw[offset:offset + end - start]
    with open(path, "rb") as f:
        f.seek(start)
        if f.readinto(memoryview(buf)) != end - start:
            raise ValueError(f"{path}: truncated ({end - start} bytes expected at offset {start})")
    return buf.view(dtype).reshape(shape)


class CheckpointReader:
    """The tensors of a checkpoint folder by name, read lazily; a context manager.

    Errors: a folder without weights, an index naming a missing shard (``FileNotFoundError`` naming it),
    a corrupt file or index, or an index whose shard lacks a tensor it lists (``ValueError`` naming them)."""

    def __init__(self, folder: str | pathlib.Path):
        self.folder = pathlib.Path(folder)
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.exists():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        for name in files:
            if not (self.folder / name).exists():
                raise FileNotFoundError(f"shard {self.folder / name} listed in {index} is missing")
        self._headers = {name: read_header(self.folder / name) for name in files}  # one parse per file
        self.location: dict[str, str] = {}
        self._stored: dict[str, str] = {}  # name -> name in the file (they differ after add_prefix)
        for name, header in self._headers.items():
            for key in header:
                self.location[key] = name
                self._stored[key] = key
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.location.get(key) != name:
                    raise ValueError(f"{index} lists tensor {key!r} in {name}, which does not hold it")

    def names(self) -> set[str]:
        return set(self.location)

    def add_prefix(self, prefix: str) -> None:
        """Name every tensor ``prefix + name`` (checkpoints saved from a base model, e.g. the original GPT-2
        files, lack the causal-LM wrapper's ``transformer.`` prefix)."""
        self.location = {prefix + k: v for k, v in self.location.items()}
        self._stored = {prefix + k: v for k, v in self._stored.items()}

    def info(self, name: str) -> TensorInfo:
        """The header entry of tensor ``name`` (parsed when the reader opened its file)."""
        return self._headers[self.location[name]][self._stored[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        """The stored dtype ("F32", "BF16", ...)."""
        return self.info(name).dtype

    def get(self, name: str) -> np.ndarray:
        info, path = self.info(name), self.folder / self.location[name]
        dtype = NUMPY_DTYPES.get(info.dtype)
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info.dtype}, which is not supported")
        return _read_aligned(path, info.start, info.end, dtype, info.shape)

    def close(self) -> None:
        """Nothing stays open between reads (each :meth:`get` opens and closes its file); kept for the context
        manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_checkpoint(tensors: Iterable[tuple[str, np.ndarray]], folder: str | pathlib.Path,
                     max_shard_bytes: int) -> list[str]:
    """Write ``(name, array)`` pairs in order into ``folder``: one ``model.safetensors`` when everything fits
    in ``max_shard_bytes``, else shards of at most that size plus the index. Holds one shard in memory at a
    time. Returns the file names written."""
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} must be a positive int")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [folder / SINGLE_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    shards, current, size, total = [], {}, 0, 0
    temp_names = []
    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            temp_names.append(_flush(current, folder, len(shards)))
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
        total += array.nbytes
    if not shards:
        safetensors.numpy.save_file(current, str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    shards.append(current)
    temp_names.append(_flush(current, folder, len(shards)))
    n = len(shards)
    names, weight_map = [], {}
    for k, (temp, shard) in enumerate(zip(temp_names, shards), start=1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        (folder / temp).rename(folder / final)
        names.append(final)
        weight_map.update({key: final for key in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]


def _flush(shard: dict, folder: pathlib.Path, k: int) -> str:
    """Write shard number ``k`` under a temporary name (the count of shards is known only at the end) and
    drop its arrays from memory, keeping the names."""
    temp = f"model-{k:05d}-partial.safetensors"
    safetensors.numpy.save_file(shard, str(folder / temp), metadata={"format": "pt"})
    for key in shard:
        shard[key] = None
    return temp
