"""Start Python child processes that import the *installed* jaxlab, whatever the working directory.

``python -m pkg`` and ``python -c ...`` put the current directory first on ``sys.path``. Run from a
clone of the repository, that makes the source folder ``jaxlab/`` (the glue alone: the other
subpackages are mapped in by ``pyproject.toml`` at install time) shadow the installed package, and the
child fails with "No module named 'jaxlab.experiments'". Every child process that imports jaxlab is
started through :func:`python_module_command`, which leaves the current directory off ``sys.path``.
"""

from __future__ import annotations

import sys

__all__ = ["python_module_command"]

_RUN_MODULE = ("import runpy, sys; del sys.path[0]; "
               "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")


def python_module_command(module: str, *args: str) -> list[str]:
    """argv of ``python -m module args...`` without the working directory on the child's ``sys.path``.

    Python >= 3.11 has ``-P`` for exactly this; on 3.10 the module is run through :mod:`runpy` after
    dropping ``sys.path[0]`` (the ``''`` entry that ``-c`` adds).
    """
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module, *args]
    return [sys.executable, "-c", _RUN_MODULE.format(module=module), *args]
