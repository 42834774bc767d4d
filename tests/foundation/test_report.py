"""Claims in results and REPORT.md: each paper's result as a predicate, counted, failing ones shown failing."""

import json

import numpy as np
import pytest

from jaxlab.registry import Claim, ExperimentResult
from jaxlab.reproduce import RunRecord, claims_tally, reproduce, seeds_note, write_report


def _record(name: str, claims=(), error=None, quick=True, seed=0) -> RunRecord:
    result = None if error else ExperimentResult(metrics={"x": 1.0}, claims=claims)
    return RunRecord(name=name, description=f"{name} figure", paper=f"{name} et al.", quick=quick, config={},
                     runtime_s=1.0, result=result, error=error, seed=seed)


def test_claim_coerces_array_booleans_and_rejects_empty_statements():
    c = Claim("x >= 1", holds=np.float32(2.0) >= 1, evidence=np.float32(2.0))
    assert c.holds is True and c.evidence == "2.0"
    assert Claim("nan is no pass", holds=np.nan >= 1, evidence="nan").holds is False
    with pytest.raises(ValueError, match="claim="):
        Claim(" ", holds=True, evidence="")
    with pytest.raises(TypeError, match="Claim instances"):
        ExperimentResult(metrics={}, claims=({"claim": "a", "holds": True},))


def test_reproduces_needs_every_claim():
    ok, bad = Claim("a", True, "1"), Claim("b", False, "0")
    assert ExperimentResult({}, claims=(ok, ok)).reproduces is True
    assert ExperimentResult({}, claims=(ok, bad)).reproduces is False
    assert ExperimentResult({}).reproduces is None
    assert _record("x", error="boom").reproduces is False


def test_report_counts_and_lists_claims(tmp_path):
    records = [_record("good", (Claim("a >= 1", True, "a = 2"),)),
               _record("half", (Claim("b >= 1", True, "b = 3"), Claim("c <= 0.5", False, "c = 0.9"))),
               _record("broken", error="RuntimeError: boom")]
    assert claims_tally(records) == "1 of 3 experiment(s) reproduce their paper's claims (2 of 3 claims hold)."
    report = write_report(records, tmp_path, quick=True).read_text()
    assert claims_tally(records) in report
    assert "| experiment | reproduces | status | claims hold | time (s) |" in report
    assert "| [good](#good) | good et al. | ok | ✓ 1/1 | 1.0 |" in report
    assert "| [half](#half) | half et al. | ok | ✗ 1/2 | 1.0 |" in report
    assert "- ✗ c <= 0.5 — c = 0.9" in report and "- ✓ b >= 1 — b = 3" in report


def test_json_round_trip_and_report_keeps_earlier_experiments(tmp_path):
    from jaxlab.registry import get_experiment

    first = _record("gridworld-optimal", (Claim("v* = book", True, "max err 0"),))
    (tmp_path / "gridworld-optimal.json").write_text(json.dumps(first.to_json()))
    (tmp_path / "other-size.json").write_text(json.dumps(_record("other-size", quick=False).to_json()))
    (tmp_path / "garbage.json").write_text("{not json")
    back = RunRecord.from_json(json.loads((tmp_path / "gridworld-optimal.json").read_text()))
    assert back.result.claims == first.result.claims and back.reproduces is True
    experiment = get_experiment("ssm-hippo")
    config = experiment.quick.__class__(length=64, state_sizes=(4, 8), plot_state_size=8, num_signals=1)
    records, path = reproduce([(experiment, config)], tmp_path, quick=True, show_progress=False)
    report = path.read_text()
    assert [r.name for r in records] == ["ssm-hippo"]
    assert "## ssm-hippo" in report and "## gridworld-optimal" in report  # the earlier run stays in the report
    assert "## other-size" not in report  # a full-size record is not mixed into a quick report
    assert "Not run at this size in this folder:" in report and "`zero-memory`" in report
    saved = json.loads((tmp_path / "ssm-hippo.json").read_text())
    assert saved["claims"] and saved["reproduces"] == all(c["holds"] for c in saved["claims"])


def test_records_and_reports_name_the_seed(tmp_path):
    """A record keeps the base seed of its run (JSON and back); a report says which seed(s) its experiments ran
    at, every one's on its numbers line; a record from before seeds were recorded reads back without one."""
    record = _record("a", (Claim("x", True, "1"),), seed=3)
    data = record.to_json()
    assert data["seed"] == 3 and RunRecord.from_json(data).seed == 3
    del data["seed"]
    old = RunRecord.from_json(data)
    assert old.seed is None
    report = write_report([record], tmp_path, quick=True).read_text()
    assert ", seed 3." in report.splitlines()[2] and "Seed: 3." in report
    mixed = [_record("b", seed=1), _record("c", seed=0), _record("d", seed=1), old]
    assert seeds_note(mixed) == "seeds 0 (1 experiment), 1 (2 experiments), unrecorded (1 experiment)"
    assert seeds_note([_record("b", seed=2), _record("c", seed=2)]) == "seed 2" and seeds_note([]) == ""
    report = write_report(mixed, tmp_path, quick=True).read_text()
    assert "seeds 0 (1 experiment), 1 (2 experiments), unrecorded (1 experiment)." in report.splitlines()[2]
    assert report.count("Seed: 1.") == 2 and report.count("Seed: 0.") == 1  # none for the unrecorded one


def test_full_size_report_names_the_missing_experiments_that_need_a_gpu(tmp_path):
    from jaxlab.registry import experiment_names, get_experiment

    records = [_record("good", (Claim("a >= 1", True, "a = 2"),), quick=False)]
    gpu = [n for n in experiment_names() if get_experiment(n).full_needs_gpu]
    assert gpu, "some registered experiment must be marked as needing a GPU at full size"
    full = write_report(records, tmp_path, quick=False, not_run=["mqar", "zero-memory"], needs_gpu=["mqar"]).read_text()
    assert "These need a GPU at full size (each takes hours on 2 CPU cores): `mqar`." in full
    assert "Command: `jaxlab reproduce mqar zero-memory --out" in full
    quick = write_report(records, tmp_path, quick=True, not_run=["mqar"], needs_gpu=["mqar"]).read_text()
    assert "need a GPU" not in quick and "Command: `jaxlab reproduce mqar --quick --out" in quick


def test_parallel_children_write_the_records_of_an_in_process_run(tmp_path):
    from jaxlab.registry import get_experiment

    experiments = [get_experiment(n) for n in ("gridworld-optimal", "gridworld-dp", "sa-mean")]
    runs = [(e, e.quick) for e in experiments]
    serial, _ = reproduce(runs, tmp_path / "serial", quick=True, seed=1, show_progress=False)
    parallel, path = reproduce(runs, tmp_path / "parallel", quick=True, seed=1, show_progress=False, jobs=2)
    assert [r.name for r in parallel] == [e.name for e in experiments]  # the order of the runs, not of finishing
    for a, b in zip(serial, parallel):
        assert b.error is None, b.error
        assert a.seed == b.seed == 1  # the children were given the run's seed, and their records say so
        assert json.loads((tmp_path / "parallel" / f"{b.name}.json").read_text())["seed"] == 1
        assert json.dumps(a.result.metrics, sort_keys=True) == json.dumps(b.result.metrics, sort_keys=True)
        assert a.result.claims == b.result.claims
        assert (tmp_path / "parallel" / f"{b.name}.png").exists()
        assert (tmp_path / "parallel" / "logs" / f"{b.name}.log").exists()
    assert "2 experiments at a time" in path.read_text() and ", seed 1." in path.read_text()
    with pytest.raises(ValueError, match="differs from its registered quick size"):
        reproduce([(experiments[0], experiments[0].quick), (experiments[1], experiments[0].quick)], tmp_path,
                  quick=True, show_progress=False, jobs=2)


def test_timed_experiments_run_alone():
    from jaxlab.registry import Experiment
    from jaxlab.reproduce import may_start

    plain = [Experiment(f"e{i}", "", "", lambda c, x: None, None) for i in range(3)]
    timed = Experiment("t", "", "", lambda c, x: None, None, timed=True)
    assert may_start(plain[0], [], 2) and may_start(plain[1], [plain[0]], 2)
    assert not may_start(plain[2], plain[:2], 2)  # at most `jobs`
    assert may_start(timed, [], 2) and not may_start(timed, [plain[0]], 2)  # only with nothing beside it
    assert not may_start(plain[0], [timed], 4)  # and nothing starts beside it


def test_child_process_is_set_up_as_the_command_sets_up_its_own(monkeypatch, tmp_path):
    """A child of `reproduce --jobs N` runs its experiment with the dispatch mode and allocator settings of
    `jaxlab reproduce NAME` (asynchronous CPU dispatch had made it slower and its timed sweeps noisier)."""
    from types import SimpleNamespace

    from jaxlab import process_setup
    from jaxlab import reproduce as rp

    calls = []
    monkeypatch.setattr(process_setup, "setup_process", lambda *args: calls.append(args))
    monkeypatch.setattr(rp, "run_experiment", lambda *args, **kwargs: SimpleNamespace(error=None))
    assert rp._worker(["linear-scaling", str(tmp_path), "--quick"]) == 0
    assert calls == [()]


def test_cpu_slices_give_each_child_its_own_cores(monkeypatch):
    from jaxlab import reproduce as rp

    monkeypatch.setattr(rp.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5}, raising=False)
    monkeypatch.setattr(rp.os, "sched_setaffinity", lambda pid, cpus: None, raising=False)
    assert rp.cpu_slices(2) == [(0, 1, 2), (3, 5)]  # disjoint, covering the mask, the first one larger
    assert rp.cpu_slices(5) == [(0,), (1,), (2,), (3,), (5,)]
    assert rp.cpu_slices(1) == [(0, 1, 2, 3, 5)]
    assert rp.cpu_slices(6) == []  # more children than cores: unpinned


def test_a_child_that_dies_is_a_failed_record(tmp_path):
    from jaxlab.registry import get_experiment
    from jaxlab.reproduce import _child_record

    log = tmp_path / "logs" / "sa-mean.log"
    log.parent.mkdir()
    log.write_text("Killed\n")
    record = _child_record(get_experiment("sa-mean"), tmp_path, quick=True, seed=4, status=-9, runtime=3.0,
                           log_path=log)
    assert record.seed == 4 and record.reproduces is False
    assert "exited with status -9" in record.error and str(log) in record.error
    assert json.loads((tmp_path / "sa-mean.json").read_text())["error"] == record.error


def test_run_order_puts_timed_first_then_the_longest():
    from jaxlab.registry import Experiment
    from jaxlab.reproduce import run_order

    def exp(name, **kw):
        return Experiment(name, "", "", lambda c, x: None, None, **kw)

    a, b, lm, t = exp("a"), exp("b"), exp("lm", full_needs_gpu=True), exp("t", timed=True)
    known, slow = exp("known"), exp("slow")
    order = run_order([a, b, known, lm, slow, t], {"known": 5.0, "slow": 50.0})
    assert [e.name for e in order] == ["t", "lm", "a", "b", "slow", "known"]


def test_run_order_falls_back_on_registered_quick_seconds():
    """A first quick run (no earlier times in the folder) starts the longest registered ones first; the
    folder's own times win over the registered ones, and full-size runs ignore the quick estimates."""
    from jaxlab.registry import Experiment, experiments
    from jaxlab.reproduce import run_order

    def exp(name, **kw):
        return Experiment(name, "", "", lambda c, x: None, None, **kw)

    short, long_, unknown = exp("short", quick_seconds=10.0), exp("long", quick_seconds=200.0), exp("unknown")
    mid = exp("mid", quick_seconds=300.0)
    assert [e.name for e in run_order([short, long_, unknown, mid], {}, quick=True)] == [
        "unknown", "mid", "long", "short"]
    assert [e.name for e in run_order([short, long_, unknown, mid], {"mid": 5.0}, quick=True)] == [
        "unknown", "long", "short", "mid"]
    assert [e.name for e in run_order([short, long_, mid], {}, quick=False)] == ["short", "long", "mid"]
    # every registered experiment carries an estimate, so a first quick run is ordered by length
    assert all(e.quick_seconds for e in experiments().values())
