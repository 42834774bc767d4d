"""XLA compiler options shared by experiments, benchmarks and tests.

``FAST_COMPILE`` turns XLA's backend optimisation off: programs compile about twice as fast and run
slower, the better trade when compilation dominates (short runs, smoke tests, the test suite). How much slower
depends on the program: a training step of a small LM runs about 2.7x slower, a sampler's decode loop (a
``while`` of many tiny steps) about 15x (d_model=64, 128 rows of 64 tokens on one core: 1.04 s against 0.07 s),
so anything that samples more than a few times compiles with the default options. For the short runs:

    jax.jit(fn, compiler_options=FAST_COMPILE)          # or jax.jit(fn).lower(*args).compile(FAST_COMPILE)
"""

from __future__ import annotations

__all__ = ["FAST_COMPILE"]

FAST_COMPILE: dict[str, int] = {"xla_backend_optimization_level": 0}
"""Compiler options for programs run once or briefly, where compile time dominates."""
