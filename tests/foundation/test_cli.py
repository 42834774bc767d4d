"""The jaxlab command: list, reproduce, run with overrides, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

from jaxlab.cli import _one_line, main
from jaxlab.registry import experiments

TINY_HIPPO = ["--length", "64", "--state-sizes", "4", "8", "--plot-state-size", "8", "--num-signals", "1"]


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_every_experiment_with_its_paper(capsys):
    code, out, _ = _run(["list"], capsys)
    assert code == 0
    for name, exp in experiments().items():
        assert name in out and exp.paper in out and exp.description in out


def test_run_with_overrides_writes_json_png_and_report(tmp_path, capsys):
    code, out, err = _run(["run", "ssm-hippo", "--out", str(tmp_path), "--no-progress", *TINY_HIPPO], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "ssm-hippo.json").read_text())
    assert record["config"]["length"] == 64 and record["config"]["state_sizes"] == [4, 8]
    assert record["error"] is None and [r["N"] for r in record["metrics"]["rows"]] == [4, 8]
    assert record["claims"] and all(set(c) == {"claim", "holds", "evidence"} for c in record["claims"])
    assert (tmp_path / "ssm-hippo.png").stat().st_size > 10_000
    report = (tmp_path / "REPORT.md").read_text()
    assert "## ssm-hippo" in report and "![ssm-hippo](ssm-hippo.png)" in report
    assert "| quantity | ours | published | source |" in report


def test_quick_flag_starts_from_the_quick_config(tmp_path, capsys):
    code, _, err = _run(["run", "ssm-hippo", "--quick", "--out", str(tmp_path), "--no-progress",
                         "--length", "32", "--state-sizes", "4", "--plot-state-size", "4"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "ssm-hippo.json").read_text())
    quick = experiments()["ssm-hippo"].quick
    assert record["quick"] is True and record["config"]["num_signals"] == quick.num_signals


@pytest.mark.parametrize("argv, expected", [
    (["reproduce", "ssm-hipo"], "unknown experiment 'ssm-hipo'; did you mean ssm-hippo?"),
    (["run", "flash-atention"], "unknown experiment 'flash-atention'"),
    (["train", "nope"], "unknown trainer 'nope'"),
    (["reproduc"], "unknown command 'reproduc'; did you mean 'reproduce'?"),
    (["run", "ssm-hippo", "--length", "abc"], "--length"),
    (["run", "ssm-hippo", "--length", "4"], "length=4 must be >= 16"),
    (["run", "ssm-hippo", "--discretization", "rk4"], "discretization='rk4'"),
    (["run", "ssm-hippo", "--lenght", "64"], "did you mean --length"),
    (["run"], "jaxlab run needs a NAME"),
    (["list", "extra"], "takes no arguments"),
])
def test_bad_input_is_one_line_exit_2(argv, expected, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("jaxlab: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_help_documents_every_config_field(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "ssm-hippo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "State sizes N to sweep." in out and "--state-sizes" in out and "--quick" in out


def test_one_line_reduces_a_tyro_panel_unicode_or_ascii():
    panel = ("╭─ Unrecognized options ──────────╮\n│ Unrecognized options: --nn │\n│ ───────── │\n"
             "│ Perhaps you meant:        │\n│     --n INT               │\n│ ───────── │\n"
             "│ For full helptext, run x  │\n╰───────────────────────────╯\n")
    assert _one_line(panel) == "Unrecognized options: --nn (did you mean --n?)"
    ascii_panel = (" Value error \n ---------------- \n  Error parsing --n: invalid literal 'x'  \n"
                   "  ----------------\n  Argument helptext:\n      --n INT\n")
    assert _one_line(ascii_panel) == "Error parsing --n: invalid literal 'x'"


def test_console_script_and_module_entry_points(tmp_path):
    env = {**os.environ, "XLA_FLAGS": ""}
    bindir = os.path.dirname(sys.executable)
    out = subprocess.run([os.path.join(bindir, "jaxlab"), "reproduce", "no-such-experiment"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "unknown experiment" in out.stderr
    out = subprocess.run([sys.executable, "-m", "jaxlab", "--version"], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("jaxlab ")


def test_commands_that_compute_turn_cpu_async_dispatch_off(monkeypatch):
    """Every command runs CPU computations inline (faster with freed memory kept, and host callbacks from jitted
    loops can hang under asynchronous CPU dispatch, jax-ml/jax#25861); the environment variable wins both ways."""
    import jax

    from jaxlab.process_setup import configure_cpu_dispatch

    flag = "jax_cpu_enable_async_dispatch"
    before = jax.config.read(flag)
    try:
        monkeypatch.delenv("JAX_CPU_ENABLE_ASYNC_DISPATCH", raising=False)
        jax.config.update(flag, True)
        assert configure_cpu_dispatch() is False and jax.config.read(flag) is False
        monkeypatch.setenv("JAX_CPU_ENABLE_ASYNC_DISPATCH", "1")  # the user's choice wins
        assert configure_cpu_dispatch() is True and jax.config.read(flag) is True
        monkeypatch.setenv("JAX_CPU_ENABLE_ASYNC_DISPATCH", "0")
        assert configure_cpu_dispatch() is False and jax.config.read(flag) is False
    finally:
        jax.config.update(flag, before)
