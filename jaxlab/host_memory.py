"""Host memory for XLA:CPU programs: keep freed memory in the process instead of handing it back to the OS.

XLA:CPU allocates every buffer a program needs with ``malloc`` and frees it when the buffer dies, so a
training step asks for the same megabytes of activations again at every step. glibc serves an allocation
above its mmap threshold (128 KiB at first, raised as blocks are freed, to at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap``, and it trims the top of its heap back to the OS past 128 KiB free: each
step's buffers are then page-faulted in anew, which is system time that scales with the bytes the step touches.
Serving every allocation from the heap and never trimming it makes the freed pages reusable. The program is
unchanged (the same numbers, bit for bit). Measured on ``jaxlab run lm-stdlib --quick`` on one core:
85-92 s before, 63 s after, with system time 27-33 s before and 2-3 s after.

The cost is that the process keeps its peak heap until it exits, which is what a training run holds anyway.
It keeps the memory of programs run inline (``jax.config.update("jax_cpu_enable_async_dispatch", False)``):
under JAX's asynchronous CPU dispatch the buffers are allocated and freed on other threads, whose malloc arenas
still hand memory back (:func:`jaxlab.process_setup.configure_cpu_dispatch` has the measurements).
The ``jaxlab`` command and the experiments' child processes call both at start
(:func:`jaxlab.process_setup.setup_process`); library users can call them themselves.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # the largest value glibc's mallopt takes (an int)
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to their maximum for this process, so that freed buffers stay in
    the heap for the next allocation. Returns whether it did: False where the C library is not glibc (no
    ``mallopt``, or one that refuses) and where the user set ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` in the environment (their choice stands)."""
    if any(name in os.environ for name in _ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, _LIMIT) == 1 and mallopt(_M_TRIM_THRESHOLD, _LIMIT) == 1
