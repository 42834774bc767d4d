"""Metrics logging (JSONL always, TensorBoard on request) and progress bars, also from inside jit.

    with MetricsWriter(out_dir / "metrics.jsonl", tensorboard_dir=None) as writer:
        writer.write(step, {"loss": loss, "lr": lr})     # arrays are fetched and made JSON-able

    progress = JitProgress(total=num_updates, every=10, desc="ppo")
    def body(carry, i):                                     # inside a jitted lax.scan
        progress.update(i)                                  # host callback only every 10th i
        ...
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

__all__ = ["JitProgress", "MetricsWriter", "to_jsonable"]


def to_jsonable(x: Any) -> Any:
    """Convert arrays, numpy scalars, dataclasses, tuples and paths into JSON values.

    Non-finite floats become ``None`` (JSON has no NaN), so files stay strictly valid.
    """
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, pathlib.PurePath):
        return str(x)
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        arr = np.asarray(jax.device_get(x))
        if arr.dtype.kind == "c":
            return to_jsonable({"real": arr.real, "imag": arr.imag})
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot convert {type(x).__name__} to JSON: {x!r}")


class MetricsWriter:
    """Append ``{"step": s, "time": t, **metrics}`` lines to a JSONL file; mirror to TensorBoard.

    Args:
      path: the JSONL file (created with its parent folders; appended to on resume).
      tensorboard_dir: if given, scalars are also written there with tensorboardX
        (``pip install jaxlab[tensorboard]``).
      keep_through: drop the file's records of later steps first (a run resumed from the checkpoint of
        step ``keep_through`` rewrites what it logged after that checkpoint; 0 starts the file afresh).

    In a multi-process run (``jaxlab launch``) only process 0 writes; the others' writes are no-ops, so
    the file holds each step once.
    """

    def __init__(self, path: str | pathlib.Path, *, tensorboard_dir: str | pathlib.Path | None = None,
                 keep_through: int | None = None):
        self.path = pathlib.Path(path)
        self.enabled = jax.process_index() == 0
        self._file = self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_through is not None and self.path.exists():
            kept = [r for r in self.read(self.path) if int(r.get("step", 0)) <= keep_through]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard_dir is not None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ImportError("TensorBoard logging needs tensorboardX: "
                                  "pip install 'jaxlab[tensorboard]'") from e
            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = to_jsonable(jax.device_get(metrics))
        record = {"step": int(step), "time": time.time(), **values}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(name, value, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def read(path: str | pathlib.Path) -> list[dict[str, Any]]:
        """All records of a JSONL metrics file."""
        with pathlib.Path(path).open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


class JitProgress:
    """A tqdm bar fed from inside ``jax.jit`` through ``jax.debug.callback`` every ``every`` steps.

    ``update(i)`` takes the loop counter (0-based, traced) and calls back to the host only when
    ``i % every == every - 1`` or ``i == total - 1``: never once per step. Pass an unbatched
    counter (e.g. the ``lax.scan`` index) so that under ``vmap`` the condition stays a branch;
    with a batched counter the bar shows the furthest of the batch.

    On CPU, programs with host callbacks can hang under JAX's asynchronous CPU dispatch
    (jax-ml/jax#25861): the ``jaxlab`` CLI and the test suite turn it off; scripts that use this bar
    should too, before any computation: ``jax.config.update("jax_cpu_enable_async_dispatch", False)``, or
    :func:`jaxlab.process_setup.setup_process`, which also keeps freed host memory for reuse.
    """

    def __init__(self, total: int, every: int, desc: str | None = None, *, disable: bool = False):
        if total < 1 or every < 1:
            raise ValueError(f"{total=} and {every=} must be >= 1")
        self.total, self.every = total, every
        self.bar = tqdm(total=total, desc=desc, disable=disable, file=sys.stderr, dynamic_ncols=True)
        self.calls = 0  # host callbacks received, for tests and diagnostics
        self.done = 0   # steps reported so far

    def _on_host(self, i: np.ndarray) -> None:
        self.calls += 1
        done = min(int(np.max(i)) + 1, self.total)
        self.bar.update(max(done - self.done, 0))
        self.done = max(done, self.done)

    def update(self, i: jax.Array) -> None:
        i = jnp.asarray(i)
        due = jnp.logical_or(i % self.every == self.every - 1, i == self.total - 1)
        jax.lax.cond(jnp.any(due), lambda: jax.debug.callback(self._on_host, i), lambda: None)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> JitProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
