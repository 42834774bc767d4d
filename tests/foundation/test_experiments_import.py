"""Importing an experiment leaves matplotlib's backend alone: every experiment draws on a
``matplotlib.figure.Figure`` (saved through the Agg canvas) instead of pyplot's global state, so
``import jaxlab.experiments.X`` in a notebook does not switch the notebook's backend."""

import pkgutil
import subprocess
import sys

import jaxlab.experiments

MODULES = sorted(m.name for m in pkgutil.iter_modules(jaxlab.experiments.__path__))


def test_importing_every_experiment_keeps_the_active_backend(tmp_path):
    """In a child (run from ``tmp_path`` so the source folder ``jaxlab/`` does not shadow the installed
    package) select the ``svg`` backend, import every experiment module, and check it is still selected."""
    assert "gridworld_dp" in MODULES and "_lm_common" in MODULES  # the scan found the experiments
    code = ("import importlib, matplotlib; matplotlib.use('svg')\n"
            f"for name in {MODULES!r}:\n"
            "    importlib.import_module('jaxlab.experiments.' + name)\n"
            "    assert matplotlib.get_backend() == 'svg', (name, matplotlib.get_backend())\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
