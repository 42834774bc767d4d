"""XLA compiler options shared by experiments, benchmarks and tests.

``FAST_COMPILE`` turns XLA's backend optimisation off: programs compile about twice as fast and run
slower, the better trade when compilation dominates (short runs, smoke tests, the test suite):

    jax.jit(fn, compiler_options=FAST_COMPILE)          # or jax.jit(fn).lower(*args).compile(FAST_COMPILE)
"""

from __future__ import annotations

__all__ = ["FAST_COMPILE"]

FAST_COMPILE: dict[str, int] = {"xla_backend_optimization_level": 0}
"""Compiler options for programs run once or briefly, where compile time dominates."""
