"""Registries of experiments and trainers, filled by decorators and discovered by module scan.

Adding an experiment or a trainer means writing one module under ``experiments/`` (the
``jaxlab.experiments`` package, subpackages included) that applies a decorator; nothing else
is edited. ``discover()`` imports every module of that package once, which runs the decorators.

    @dataclasses.dataclass(frozen=True)
    class HippoConfig:
        N: int = 64
        \"\"\"State size.\"\"\"          # field docstrings become the `--help` text

    @register_experiment("ssm-hippo", description="...", paper="Gu et al. 2020, Fig. 2",
                         quick=HippoConfig(N=32))
    def ssm_hippo(cfg: HippoConfig, ctx: RunContext) -> ExperimentResult: ...

An experiment's config class is ``type(quick)``; its full-size configuration is ``Config()``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

__all__ = [
    "Comparison",
    "Experiment",
    "ExperimentResult",
    "RegistryError",
    "Trainer",
    "discover",
    "experiments",
    "get_experiment",
    "get_trainer",
    "register_experiment",
    "register_trainer",
    "trainers",
]

DISCOVERY_PACKAGES = ("jaxlab.experiments",)


class RegistryError(LookupError):
    """An unknown or duplicate experiment/trainer name."""


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One row of a report table: our number beside the published one (when the paper gives it)."""

    quantity: str
    ours: float | str
    published: float | str | None = None
    source: str | None = None


@dataclasses.dataclass(frozen=True)
class ExperimentResult:
    """What an experiment returns; the runner writes it to ``<name>.json`` and the report.

    ``metrics`` must be JSON-serialisable (numbers, strings, lists, dicts; numpy/jax arrays and
    scalars are converted). ``summary`` is a short Markdown paragraph for REPORT.md.
    """

    metrics: dict[str, Any]
    comparisons: tuple[Comparison, ...] = ()
    summary: str = ""


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    paper: str
    fn: Callable[..., ExperimentResult]
    quick: Any

    @property
    def config_cls(self) -> type:
        return type(self.quick)

    def default_config(self, quick: bool) -> Any:
        return self.quick if quick else self.config_cls()


@dataclasses.dataclass(frozen=True)
class Trainer:
    name: str
    description: str
    config_cls: type
    fn: Callable[..., Any]


_EXPERIMENTS: dict[str, Experiment] = {}
_TRAINERS: dict[str, Trainer] = {}
_DISCOVERED = False


def _check_name(name: str, table: dict, kind: str, fn: Callable) -> None:
    if not name or name != name.strip() or " " in name:
        raise RegistryError(f"invalid {kind} name {name!r}: use lowercase words joined by '-'")
    if name in table and table[name].fn.__qualname__ != fn.__qualname__:
        raise RegistryError(f"{kind} {name!r} is registered twice: {table[name].fn} and {fn}")


def register_experiment(name: str, *, description: str, paper: str, quick: Any):
    """Register ``fn(cfg, ctx) -> ExperimentResult`` under ``name``.

    ``quick`` is an instance of the experiment's frozen config dataclass sized for
    ``jaxlab reproduce --quick`` (the whole set in under 15 minutes on 2 CPU cores).
    """
    if not dataclasses.is_dataclass(quick) or isinstance(quick, type):
        raise TypeError(f"{name}: quick= must be a dataclass instance, got {quick!r}")

    def decorator(fn):
        _check_name(name, _EXPERIMENTS, "experiment", fn)
        _EXPERIMENTS[name] = Experiment(name, description, paper, fn, quick)
        return fn

    return decorator


def register_trainer(name: str, *, description: str, config: type):
    """Register ``fn(cfg, out_dir) -> dict`` as ``jaxlab train <name>``; ``config`` is a frozen dataclass."""
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise TypeError(f"{name}: config= must be a dataclass type, got {config!r}")

    def decorator(fn):
        _check_name(name, _TRAINERS, "trainer", fn)
        _TRAINERS[name] = Trainer(name, description, config, fn)
        return fn

    return decorator


def discover() -> None:
    """Import every module of the discovery packages once (this runs their decorators)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    for package_name in DISCOVERY_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=package_name + "."):
            if info.name.rsplit(".", 1)[-1].startswith("_"):
                continue
            importlib.import_module(info.name)
    _DISCOVERED = True


def experiments() -> dict[str, Experiment]:
    discover()
    return dict(sorted(_EXPERIMENTS.items()))


def trainers() -> dict[str, Trainer]:
    discover()
    return dict(sorted(_TRAINERS.items()))


def _unknown(kind: str, name: str, known: list[str]) -> RegistryError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    listing = ", ".join(known) if known else "none registered"
    return RegistryError(f"unknown {kind} {name!r}{hint} (known: {listing})")


def get_experiment(name: str) -> Experiment:
    table = experiments()
    if name not in table:
        raise _unknown("experiment", name, list(table))
    return table[name]


def get_trainer(name: str) -> Trainer:
    table = trainers()
    if name not in table:
        raise _unknown("trainer", name, list(table))
    return table[name]
