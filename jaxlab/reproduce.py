"""Run registered experiments and write ``<name>.png``, ``<name>.json`` and ``REPORT.md``.

One failing experiment does not stop the others: its section in the report says what failed,
and ``reproduce`` returns the names of the failures so that the CLI exits non-zero.

With ``jobs > 1`` the experiments run in child processes, ``jobs`` at a time (``python -m
jaxlab.reproduce NAME OUT_DIR`` through :func:`jaxlab.child_process.python_module_command`, so a child
imports the installed jaxlab), each writing its JSON and figure and its output to ``OUT_DIR/logs/NAME.log``;
the parent reads the JSON back. Every experiment derives its keys from the seed alone, so the draws do not
change; the floating-point results may, by reassociation, with the number of XLA threads a process has (a
pinned child has fewer than a run in one process).
Experiments registered ``timed=True`` (their claims compare wall-clock times) run first, one at a time, with
nothing beside them and every core. The others are pinned (:func:`cpu_slices`): with ``jobs`` no more than the
cores, each child runs on its own share of them, so the children's XLA thread pools do not contend for the same
cores (on 2 cores, two children each on one core finish sooner than two children each spreading over both).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

from jaxlab.child_process import python_module_command
from jaxlab.context import RunContext
from jaxlab.metrics import to_jsonable
from jaxlab.registry import Claim, Comparison, Experiment, ExperimentResult, experiment_names, get_experiment

__all__ = ["RunRecord", "claims_tally", "cpu_slices", "default_jobs", "folder_report", "may_start", "reproduce",
           "run_experiment", "run_order", "seeds_note", "usable_cpus", "write_report"]


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """The outcome of one experiment run, as written to ``<name>.json``."""

    name: str
    description: str
    paper: str
    quick: bool
    config: dict[str, Any]
    runtime_s: float
    result: ExperimentResult | None
    error: str | None = None
    seed: int | None = None
    """The base seed the run derived its keys from (None: a record written before seeds were recorded)."""

    @property
    def reproduces(self) -> bool | None:
        """Whether every claim of the paper holds (False if the run failed, None if it states none)."""
        return False if self.result is None else self.result.reproduces

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """The record of an earlier run, read back from its ``<name>.json``."""
        result = None
        if data.get("error") is None:
            result = ExperimentResult(
                metrics=data.get("metrics") or {},
                comparisons=tuple(Comparison(**c) for c in data.get("comparisons", [])),
                summary=data.get("summary") or "",
                claims=tuple(Claim(**c) for c in data.get("claims", [])))
        return cls(name=data["name"], description=data.get("description", ""), paper=data.get("paper", ""),
                   quick=bool(data.get("quick")), config=data.get("config") or {},
                   runtime_s=float(data.get("runtime_s", 0.0)), result=result, error=data.get("error"),
                   seed=data.get("seed"))

    def save(self, out_dir: pathlib.Path) -> pathlib.Path:
        """Write ``out_dir/<name>.json`` (read back by :meth:`from_json`)."""
        path = out_dir / f"{self.name}.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def to_json(self) -> dict[str, Any]:
        result = self.result
        return to_jsonable({
            "name": self.name, "description": self.description, "paper": self.paper,
            "quick": self.quick, "seed": self.seed, "config": self.config, "runtime_s": round(self.runtime_s, 3),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "jax_version": jax.__version__, "python": platform.python_version(),
            "metrics": result.metrics if result else None,
            "comparisons": [dataclasses.asdict(c) for c in result.comparisons] if result else [],
            "claims": [dataclasses.asdict(c) for c in result.claims] if result else [],
            "reproduces": self.reproduces,
            "summary": result.summary if result else None,
            "error": self.error,
        })


def run_experiment(experiment: Experiment, config: Any, out_dir: pathlib.Path, *, quick: bool,
                   seed: int = 0, show_progress: bool = True) -> RunRecord:
    """Run one experiment, write its JSON, and return the record (errors are caught and recorded)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(experiment.name, out_dir, quick=quick, seed=seed, show_progress=show_progress)
    start = time.perf_counter()
    result, error = None, None
    try:
        result = experiment.fn(config, ctx)
        if not isinstance(result, ExperimentResult):
            raise TypeError(f"experiment {experiment.name!r} returned {type(result).__name__}, "
                            "expected ExperimentResult")
        if not ctx.figure_path.exists():
            raise FileNotFoundError(f"experiment {experiment.name!r} did not write {ctx.figure_path}")
    except Exception as e:  # recorded in the report; the other experiments still run
        error = f"{type(e).__name__}: {e}"
        tqdm.write(f"[{experiment.name}] FAILED: {error}\n{traceback.format_exc()}", file=sys.stderr)
        result = None
    record = RunRecord(
        name=experiment.name, description=experiment.description, paper=experiment.paper,
        quick=quick, config=to_jsonable(config), runtime_s=time.perf_counter() - start,
        result=result, error=error, seed=seed)
    record.save(out_dir)
    return record


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _mark(holds: bool | None) -> str:
    return {True: "✓", False: "✗", None: "—"}[holds]


def claims_tally(records: list[RunRecord]) -> str:
    """One line: how many experiments reproduce their paper's claims, and how many claims hold."""
    claims = [c for r in records if r.result is not None for c in r.result.claims]
    reproduced = sum(r.reproduces is True for r in records)
    return (f"{reproduced} of {len(records)} experiment(s) reproduce their paper's claims "
            f"({sum(c.holds for c in claims)} of {len(claims)} claims hold).")


def seeds_note(records: Sequence[RunRecord]) -> str:
    """The base seeds of ``records``, for a report's header: ``"seed 1"`` when they share one, else each seed
    with its count of experiments (``"seeds 0 (3 experiments), 1 (24 experiments)"``), a folder filled by runs at
    different seeds; records written before seeds were recorded count as seed ``unrecorded``. Empty for no
    records."""
    counts = Counter("unrecorded" if r.seed is None else str(r.seed) for r in records)
    if not counts:
        return ""
    if len(counts) == 1:
        return f"seed {next(iter(counts))}"
    order = sorted(counts, key=lambda s: (s == "unrecorded", int(s) if s != "unrecorded" else 0))
    return "seeds " + ", ".join(f"{s} ({counts[s]} experiment{'s' if counts[s] > 1 else ''})" for s in order)


def write_report(records: list[RunRecord], out_dir: pathlib.Path, *, quick: bool,
                 not_run: Sequence[str] = (), needs_gpu: Sequence[str] = (),
                 wall: tuple[float, int] | None = None) -> pathlib.Path:
    """Write ``REPORT.md``: a table of every experiment with whether its paper's claims hold, then one
    section per figure with its picture, the claims checked, and our numbers beside the paper's.
    ``not_run`` names registered experiments absent from the folder; the report gives the command, and in
    a full-size report says which of them (``needs_gpu``, a subset of ``not_run``) take hours on a CPU.
    ``wall``: the wall-clock seconds of the run that wrote it and how many experiments it ran at a time."""
    total = sum(r.runtime_s for r in records)
    at_once = (f" ({wall[0]:.0f} s of wall-clock time in this run, {wall[1]} experiments at a time)"
               if wall is not None and wall[1] > 1 else "")
    lines = [
        "# jaxlab reproduction report",
        "",
        f"{len(records)} experiment(s), {'--quick sizes' if quick else 'full sizes'}, "
        f"{total:.0f} s in all{at_once}, on {jax.default_backend()} ({jax.device_count()} device(s)), "
        f"jax {jax.__version__}" + (f", {seeds_note(records)}." if records else "."),
        "",
        f"**{claims_tally(records)}** An experiment reproduces its paper when every claim, stated from the "
        "paper with its thresholds fixed before the run, holds on the run's own metrics; a failing claim "
        "is reported as failing.",
        "",
        "| experiment | reproduces | status | claims hold | time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        status = "ok" if r.error is None else "**failed**"
        claims = r.result.claims if r.result is not None else ()
        held = f"{_mark(r.reproduces)} {sum(c.holds for c in claims)}/{len(claims)}" if claims else _mark(None)
        lines.append(f"| [{r.name}](#{r.name}) | {_fmt(r.paper)} | {status} | {held} | {r.runtime_s:.1f} |")
    if not_run:
        size = " --quick" if quick else ""
        lines += ["", f"Not run at this size in this folder: {', '.join(f'`{n}`' for n in not_run)}. "
                  f"Command: `jaxlab reproduce {' '.join(not_run)}{size} --out {out_dir}`."]
        if needs_gpu and not quick:
            lines[-1] += (" These need a GPU at full size (each takes hours on 2 CPU cores): "
                          + ", ".join(f"`{n}`" for n in needs_gpu) + ".")
    for r in records:
        lines += ["", f"## {r.name}", "", f"*{r.description}* — reproduces {r.paper}.", ""]
        if r.error is not None:
            lines += [f"**This experiment failed:** `{r.error}`", ""]
            continue
        lines += [f"![{r.name}]({r.name}.png)", ""]
        if r.result.claims:
            lines += ["Claims of the paper, checked on this run:", ""]
            lines += [f"- {_mark(c.holds)} {c.claim} — {c.evidence}" for c in r.result.claims]
            lines.append("")
        if r.result.summary:
            lines += [r.result.summary.strip(), ""]
        if r.result.comparisons:
            lines += ["| quantity | ours | published | source |", "|---|---|---|---|"]
            for c in r.result.comparisons:
                lines.append(f"| {_fmt(c.quantity)} | {_fmt(c.ours)} | {_fmt(c.published)} | {_fmt(c.source)} |")
            lines.append("")
        seed = "" if r.seed is None else f" Seed: {r.seed}."
        lines += [f"Numbers: [`{r.name}.json`]({r.name}.json). Config: `{json.dumps(r.config)}`.{seed}"]
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def earlier_records(out_dir: pathlib.Path, *, quick: bool, exclude: set[str]) -> list[RunRecord]:
    """Records of the experiments already in ``out_dir`` at the same size (``quick``), except ``exclude``.

    Lets a report folder be filled one experiment at a time (``jaxlab reproduce NAME --out DIR``) while
    ``DIR/REPORT.md`` always covers every experiment in it. Unreadable JSON files are skipped.
    """
    records = []
    for path in sorted(out_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            if data.get("name") == path.stem and path.stem not in exclude and bool(data.get("quick")) == quick:
                records.append(RunRecord.from_json(data))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return records


def usable_cpus() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's
    ``cpu.max``), which ``os.cpu_count()`` does not see."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = pathlib.Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def cpu_slices(jobs: int) -> list[tuple[int, ...]]:
    """The cores of this process's affinity mask cut into ``jobs`` disjoint shares of near-equal size (the first
    ones one core larger), one per child; no shares (children unpinned) when ``jobs`` exceeds the cores or the
    platform has no affinity masks."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    cpus = sorted(os.sched_getaffinity(0))
    if jobs > len(cpus):
        return []
    size, extra = divmod(len(cpus), jobs)
    bounds = [i * size + min(i, extra) for i in range(jobs + 1)]
    return [tuple(cpus[a:b]) for a, b in zip(bounds, bounds[1:])]


def default_jobs() -> int:
    """Experiments run at a time when not told: one on a GPU/TPU (children would share its memory), else
    one per usable CPU core, at most 4 (each child's XLA also spreads its larger operations over the cores)."""
    if jax.default_backend() != "cpu":
        return 1
    return min(4, usable_cpus())


def reproduce(runs: list[tuple[Experiment, Any]], out_dir: pathlib.Path, *, quick: bool, seed: int = 0,
              show_progress: bool = True, jobs: int = 1) -> tuple[list[RunRecord], pathlib.Path]:
    """Run ``(experiment, config)`` pairs, then write REPORT.md; returns this run's records (in the order
    of ``runs``) and the report's path. The report also lists experiments of earlier runs of the same size
    in ``out_dir``. ``jobs > 1`` runs them in child processes, ``jobs`` at a time (module docstring); a
    child runs its experiment's registered config, so every config must be that default."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be >= 1")
    start = time.perf_counter()
    if jobs > 1 and len(runs) > 1:
        for experiment, config in runs:
            if config != experiment.default_config(quick):
                raise ValueError(f"jobs={jobs}: {experiment.name}'s config differs from its registered "
                                 f"{'quick' if quick else 'full'} size; a child process runs the registered one "
                                 "(use jobs=1 for other configs)")
        records = _reproduce_parallel([e for e, _ in runs], out_dir, quick=quick, seed=seed, jobs=jobs,
                                      show_progress=show_progress)
    else:
        records = []
        bar = tqdm(runs, desc="reproduce", unit="exp", disable=not show_progress, file=sys.stderr,
                   dynamic_ncols=True)
        for experiment, config in bar:
            bar.set_postfix_str(experiment.name)
            records.append(run_experiment(experiment, config, out_dir, quick=quick, seed=seed,
                                          show_progress=show_progress))
        jobs = 1
    wall = time.perf_counter() - start
    return records, folder_report(out_dir, quick=quick, records=records, wall=(wall, jobs))


def may_start(experiment: Experiment, running: Sequence[Experiment], jobs: int) -> bool:
    """Whether ``experiment`` may start beside ``running``: fewer than ``jobs`` run, and neither it nor
    any of them is ``timed`` (a timed experiment runs alone)."""
    if len(running) >= jobs:
        return False
    return not running or not (experiment.timed or any(r.timed for r in running))


def run_order(experiments: Sequence[Experiment], seconds: dict[str, float], *,
              quick: bool = False) -> list[Experiment]:
    """The order child processes start in: the ``timed`` experiments first (each runs alone), then the
    longest first, so that the last to finish are short ones and no core idles long at the end. An
    experiment's length is ``seconds[name]`` (an earlier run's time in the same folder) where known, else, for
    ``quick`` runs, its registered ``quick_seconds``; those with neither go first, the ones whose full size
    needs a GPU (the long language-model runs) ahead of the others."""
    def length(e: Experiment) -> float | None:
        return seconds.get(e.name, e.quick_seconds if quick else None)

    rest = sorted((e for e in experiments if not e.timed),
                  key=lambda e: (length(e) is not None, -(length(e) or 0.0), not e.full_needs_gpu))
    return [e for e in experiments if e.timed] + rest


def _reproduce_parallel(experiments: list[Experiment], out_dir: pathlib.Path, *, quick: bool, seed: int,
                        jobs: int, show_progress: bool) -> list[RunRecord]:
    """Run each experiment in a child process, ``jobs`` at a time, timed ones first and alone."""
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    before = {r.name: r.runtime_s for r in earlier_records(out_dir, quick=quick, exclude=set())}
    queue = run_order(experiments, before, quick=quick)
    free_cpus = cpu_slices(jobs)  # shares of the cores not held by a running child
    running: dict[str, tuple[subprocess.Popen, Any, float, Experiment, tuple[int, ...] | None]] = {}
    done: dict[str, RunRecord] = {}
    bar = tqdm(total=len(queue), desc="reproduce", unit="exp", disable=not show_progress, file=sys.stderr,
               dynamic_ncols=True)
    shown = ""  # the running experiments named beside the bar
    try:
        while queue or running:
            while queue and may_start(queue[0], [r[3] for r in running.values()], jobs):
                experiment = queue.pop(0)
                (out_dir / f"{experiment.name}.json").unlink(missing_ok=True)  # never read a stale record
                log = open(logs / f"{experiment.name}.log", "w")  # noqa: SIM115 (closed when it ends)
                cpus = None if experiment.timed or not free_cpus else free_cpus.pop(0)  # timed: every core
                argv = python_module_command("jaxlab.reproduce", experiment.name, str(out_dir), "--seed",
                                             str(seed), *(["--quick"] if quick else []),
                                             *(["--cpus", ",".join(map(str, cpus))] if cpus else []))
                env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[experiment.name] = (proc, log, time.perf_counter(), experiment, cpus)
            if shown != (shown := ", ".join(running)):
                bar.set_postfix_str(shown)
            time.sleep(0.2)
            for name, (proc, log, started, experiment, cpus) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if cpus:
                    free_cpus.append(cpus)
                done[name] = _child_record(experiment, out_dir, quick=quick, seed=seed, status=proc.returncode,
                                           runtime=time.perf_counter() - started, log_path=logs / f"{name}.log")
                bar.update()
    finally:
        for proc, log, *_ in running.values():  # interrupted: stop the children
            proc.kill()
            log.close()
        bar.close()
    return [done[e.name] for e in experiments]


def _child_record(experiment: Experiment, out_dir: pathlib.Path, *, quick: bool, seed: int, status: int,
                  runtime: float, log_path: pathlib.Path) -> RunRecord:
    """The record a child wrote, or a failure record naming its exit status and log."""
    path = out_dir / f"{experiment.name}.json"
    try:
        record = RunRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as e:
        error = (f"the child process running {experiment.name} exited with status {status} without a "
                 f"readable record ({type(e).__name__}); its output is in {log_path}")
        record = RunRecord(name=experiment.name, description=experiment.description, paper=experiment.paper,
                           quick=quick, config=to_jsonable(experiment.default_config(quick)), runtime_s=runtime,
                           result=None, error=error, seed=seed)
        record.save(out_dir)
    if record.error is not None:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-20:])
        tqdm.write(f"[{experiment.name}] FAILED: {record.error}\n{tail}", file=sys.stderr)
    return record


def folder_report(out_dir: pathlib.Path, *, quick: bool, records: Sequence[RunRecord] = (),
                  wall: tuple[float, int] | None = None) -> pathlib.Path:
    """Write ``out_dir/REPORT.md`` over ``records`` and every earlier run of the same size in the folder
    (their JSON files), naming the registered experiments the folder lacks. ``wall``: this run's
    wall-clock seconds and the experiments it ran at a time."""
    earlier = earlier_records(out_dir, quick=quick, exclude={r.name for r in records})
    everything = sorted([*records, *earlier], key=lambda r: r.name)
    not_run = sorted(set(experiment_names()) - {r.name for r in everything})
    # Looking the flag up imports each missing experiment's module: only a full-size report uses it.
    needs_gpu = [] if quick else [n for n in not_run if get_experiment(n).full_needs_gpu]
    return write_report(everything, out_dir, quick=quick, not_run=not_run, needs_gpu=needs_gpu, wall=wall)


def _pin_process(cpus: set[int]) -> None:
    """Restrict this process to ``cpus``: every thread it has (imports may have started some) and, through
    inheritance, every thread it starts later."""
    tasks = pathlib.Path("/proc/self/task")
    for tid in ([int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]):
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # a thread that has ended since
            pass


def _worker(argv: Sequence[str]) -> int:
    """``python -m jaxlab.reproduce NAME OUT_DIR [--seed S] [--quick] [--cpus 0,1]``: one experiment at its
    registered size, its record and figure written to OUT_DIR (what :func:`reproduce` starts for ``jobs > 1``),
    on the listed cores only (its share from :func:`cpu_slices`; XLA sizes its thread pool by them)."""
    import argparse

    from jaxlab.process_setup import setup_process

    parser = argparse.ArgumentParser(prog="python -m jaxlab.reproduce")
    parser.add_argument("name")
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cpus", type=lambda text: {int(c) for c in text.split(",")}, default=None)
    args = parser.parse_args(argv)
    if args.cpus:  # before JAX starts its backend, whose CPU thread pool has one thread per core it may use
        _pin_process(args.cpus)
    setup_process()  # as `jaxlab reproduce NAME` sets up its own process
    experiment = get_experiment(args.name)
    record = run_experiment(experiment, experiment.default_config(args.quick), args.out_dir, quick=args.quick,
                            seed=args.seed, show_progress=False)
    return 0 if record.error is None else 1


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
