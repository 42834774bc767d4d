"""Registries of experiments and trainers, filled by decorators and discovered by module scan.

Adding an experiment or a trainer means writing one module under ``experiments/`` (the
``jaxlab.experiments`` package, subpackages included) that applies a decorator; nothing else
is edited. Lookups are lazy: ``get_experiment(name)`` and ``get_trainer(name)`` read the sources
of that package without importing them (``index()``: which module registers which name) and
import only the module they need, so ``jaxlab train lm`` does not pay for gymnax or matplotlib.
``discover()`` imports every module once (``jaxlab list``, ``jaxlab reproduce`` with no names).

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

import ast
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from typing import Any

__all__ = [
    "Claim",
    "Comparison",
    "Experiment",
    "ExperimentResult",
    "RegistryError",
    "SourceIndex",
    "Trainer",
    "discover",
    "experiment_names",
    "experiments",
    "get_experiment",
    "get_trainer",
    "index",
    "register_experiment",
    "register_trainer",
    "trainer_names",
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
class Claim:
    """One result of the paper, stated as a predicate on the experiment's own metrics.

    ``claim`` is the paper's statement with its thresholds, fixed before the run (never adjusted to
    what a run produced); ``holds`` is the predicate evaluated on this run's metrics; ``evidence``
    gives the numbers it was decided on. A claim that fails is reported failing.

        Claim("attention >= 0.9 at every width", holds=min(acc) >= 0.9,
              evidence=f"worst width: {min(acc):.3f}")
    """

    claim: str
    holds: bool
    evidence: str

    def __post_init__(self):
        if not isinstance(self.claim, str) or not self.claim.strip():
            raise ValueError(f"claim={self.claim!r} must be a non-empty statement")
        try:  # numpy / jax booleans from comparisons on metrics
            holds = bool(self.holds)
        except Exception as e:
            raise TypeError(f"holds={self.holds!r} of claim {self.claim!r} is not a boolean") from e
        object.__setattr__(self, "holds", holds)
        object.__setattr__(self, "evidence", str(self.evidence))


@dataclasses.dataclass(frozen=True)
class ExperimentResult:
    """What an experiment returns; the runner writes it to ``<name>.json`` and the report.

    ``metrics`` must be JSON-serialisable (numbers, strings, lists, dicts; numpy/jax arrays and
    scalars are converted). ``claims`` are the paper's results checked on those metrics (see
    :class:`Claim`); the experiment reproduces its paper when every claim holds. ``summary`` is a
    short Markdown paragraph for REPORT.md.
    """

    metrics: dict[str, Any]
    comparisons: tuple[Comparison, ...] = ()
    summary: str = ""
    claims: tuple[Claim, ...] = ()

    def __post_init__(self):
        claims = tuple(self.claims)
        for c in claims:
            if not isinstance(c, Claim):
                raise TypeError(f"claims must be Claim instances, got {type(c).__name__}: {c!r}")
        object.__setattr__(self, "claims", claims)

    @property
    def reproduces(self) -> bool | None:
        """True when every claim holds, False when one fails, None when no claim is stated."""
        return all(c.holds for c in self.claims) if self.claims else None


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    paper: str
    fn: Callable[..., ExperimentResult]
    quick: Any
    full_needs_gpu: bool = False
    """The full size takes hours on a CPU: run it on a GPU (the report says so when it is missing)."""
    timed: bool = False
    """Its claims read wall-clock times: ``jaxlab reproduce --jobs N`` runs it with no other experiment
    beside it."""
    quick_seconds: float | None = None
    """About how long the quick size runs on 2 CPU cores beside one other experiment (as last measured): orders
    the first ``jaxlab reproduce --quick`` in a folder, longest first; the folder's own earlier times replace it."""

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


def register_experiment(name: str, *, description: str, paper: str, quick: Any, full_needs_gpu: bool = False,
                        timed: bool = False, quick_seconds: float | None = None):
    """Register ``fn(cfg, ctx) -> ExperimentResult`` under ``name``.

    ``quick`` is an instance of the experiment's frozen config dataclass sized for
    ``jaxlab reproduce --quick`` (its claims checked at a size that keeps the whole set under 20 minutes on 2 CPU
    cores; a claim that needs more than that size reports failing there).
    ``full_needs_gpu`` marks experiments whose full size takes hours on a CPU; ``timed`` those whose claims
    compare wall-clock times, which run alone when experiments run in parallel; ``quick_seconds`` the quick
    size's run time on 2 CPU cores, which orders a first run when no earlier times exist.
    """
    if not dataclasses.is_dataclass(quick) or isinstance(quick, type):
        raise TypeError(f"{name}: quick= must be a dataclass instance, got {quick!r}")
    if quick_seconds is not None and not quick_seconds > 0:
        raise ValueError(f"{name}: {quick_seconds=} must be a positive number of seconds")

    def decorator(fn):
        _check_name(name, _EXPERIMENTS, "experiment", fn)
        _EXPERIMENTS[name] = Experiment(name, description, paper, fn, quick, full_needs_gpu, timed, quick_seconds)
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


_DECORATORS = {"register_experiment": "experiment", "register_trainer": "trainer"}


def _modules() -> list[str]:
    """Names of the discoverable modules (``_*`` skipped); imports only the packages themselves."""
    names = []
    for package_name in DISCOVERY_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=package_name + "."):
            if not info.name.rsplit(".", 1)[-1].startswith("_"):
                names.append(info.name)
    return names


def _registered_names(source: str, filename: str) -> list[tuple[str, str]]:
    """``(kind, name)`` of each ``register_experiment(...)``/``register_trainer(...)`` call in
    ``source`` (as a decorator or not). The name must be a string literal, so the sources alone tell
    which module registers it."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if fname not in _DECORATORS:
            continue
        first = node.args[0] if node.args else None
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            raise RegistryError(f"{filename}:{node.lineno}: {fname}(...) must name the {_DECORATORS[fname]} "
                                f"with a string literal as its first argument")
        found.append((_DECORATORS[fname], first.value))
    return found


@dataclasses.dataclass(frozen=True)
class SourceIndex:
    """Which module registers which name, read from the sources without importing them."""

    experiment: dict[str, str]
    trainer: dict[str, str]


@functools.cache
def index() -> SourceIndex:
    """Scan the discovery packages' sources for ``@register_experiment("name", ...)`` and
    ``@register_trainer("name", ...)``; a lookup then imports just the module it needs."""
    table: dict[str, dict[str, str]] = {"experiment": {}, "trainer": {}}
    for module in _modules():
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue  # a compiled or namespace module: experiments are Python sources
        with open(spec.origin, encoding="utf-8") as f:
            for kind, name in _registered_names(f.read(), spec.origin):
                table[kind][name] = module
    return SourceIndex(table["experiment"], table["trainer"])


def discover() -> None:
    """Import every discoverable module once (this runs their decorators)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    for module in _modules():
        importlib.import_module(module)
    _DISCOVERED = True


def experiments() -> dict[str, Experiment]:
    discover()
    return dict(sorted(_EXPERIMENTS.items()))


def trainers() -> dict[str, Trainer]:
    discover()
    return dict(sorted(_TRAINERS.items()))


def experiment_names() -> list[str]:
    """Registered experiment names, sorted, without importing the experiments."""
    return _names("experiment", _EXPERIMENTS)


def trainer_names() -> list[str]:
    """Registered trainer names, sorted, without importing the trainers."""
    return _names("trainer", _TRAINERS)


def _names(kind: str, table: dict) -> list[str]:
    return sorted(set(getattr(index(), kind)) | set(table))


def _unknown(kind: str, name: str, known: list[str]) -> RegistryError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    listing = ", ".join(known) if known else "none registered"
    return RegistryError(f"unknown {kind} {name!r}{hint} (known: {listing})")


def _lookup(kind: str, name: str, table: dict):
    static = getattr(index(), kind)
    if name not in table and name in static:
        importlib.import_module(static[name])  # runs the one module's decorator
        if name not in table:
            raise RegistryError(f"module {static[name]} names {kind} {name!r} but did not register it")
    if name not in table:
        raise _unknown(kind, name, _names(kind, table))
    return table[name]


def get_experiment(name: str) -> Experiment:
    return _lookup("experiment", name, _EXPERIMENTS)


def get_trainer(name: str) -> Trainer:
    return _lookup("trainer", name, _TRAINERS)
