"""What an experiment is handed when it runs: where to write, its seed, progress bars."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Iterable
from typing import TypeVar

import jax
from tqdm.auto import tqdm

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Run-time context of one experiment.

    Attributes:
      name: the experiment's registered name.
      out_dir: folder for its outputs; the figure goes to ``figure_path``.
      quick: whether ``--quick`` sizes are in use.
      seed: base seed; derive every key from ``key`` with ``jax.random.fold_in``.
    """

    name: str
    out_dir: pathlib.Path
    quick: bool = False
    seed: int = 0
    show_progress: bool = True

    @property
    def figure_path(self) -> pathlib.Path:
        return self.out_dir / f"{self.name}.png"

    @property
    def key(self) -> jax.Array:
        return jax.random.PRNGKey(self.seed)

    def progress(self, iterable: Iterable[T], desc: str | None = None, total: int | None = None) -> Iterable[T]:
        """A tqdm progress bar labelled with the experiment's name."""
        label = f"{self.name}: {desc}" if desc else self.name
        return tqdm(iterable, desc=label, total=total, leave=False, disable=not self.show_progress,
                    file=sys.stderr, dynamic_ncols=True)

    def log(self, message: str) -> None:
        tqdm.write(f"[{self.name}] {message}", file=sys.stderr)
