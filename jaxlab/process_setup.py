"""What a jaxlab process that computes sets up before JAX creates its CPU client: the dispatch mode and host memory.

Both the ``jaxlab`` command and the child processes of ``jaxlab reproduce --jobs N`` call :func:`setup_process`,
so that an experiment runs the same way in either. (The children had kept JAX's asynchronous CPU dispatch, which
defeats :func:`~jaxlab.host_memory.keep_freed_memory` (:func:`configure_cpu_dispatch`): set up like the command, the
quick set's experiment time fell from 1,921 to 1,728 s on 2 cores, e.g. ``lm-stdlib`` 69 -> 52 s and
``moonlight-muon`` 238 -> 173 s, with the same results, and Mamba-2's forward pass at L=8192 in ``linear-scaling
--quick`` from 37-39 to 23-24 ms, which had moved its fitted time exponent from 1.02-1.06 to 1.11-1.23.)
"""

from __future__ import annotations

import os

from jaxlab.host_memory import keep_freed_memory

__all__ = ["configure_cpu_dispatch", "setup_process"]


def configure_cpu_dispatch() -> bool:
    """Run CPU computations inline rather than on JAX's asynchronous CPU dispatch threads. Returns whether
    asynchronous dispatch is on. Must run before JAX creates its CPU client.

    Two reasons, measured on 2 cores:
    * Speed. With freed memory kept for reuse (:func:`keep_freed_memory`) a ``jaxlab train lm`` step at its
      default size runs at 32-34k tokens/s inline against 20-22k under asynchronous dispatch (d=384, 6 layers,
      B8 x L512: 3.7-3.9k against 3.0-3.1k). Under asynchronous dispatch XLA's buffers are allocated and freed on
      other threads, in malloc arenas of their own that the raised thresholds do not keep: 80 steps page-faulted
      6.0 million times (10.3 s of system time) against 0.14 million (1.4 s) inline. ``MALLOC_ARENA_MAX=1``
      removes most of those faults but not the gap at the larger size (3.0k against 3.8k).
    * Safety. The training loops report progress through ``jax.debug.callback`` from inside jitted scans
      (``JitProgress``) and the post-training verifiers run on the host (``jax.pure_callback``); with
      asynchronous CPU dispatch such programs can hang, intermittently (jax-ml/jax#25861).

    ``JAX_CPU_ENABLE_ASYNC_DISPATCH=1`` (or ``0``) in the environment turns it on (or off) instead.
    """
    import jax

    choice = os.environ.get("JAX_CPU_ENABLE_ASYNC_DISPATCH", "").strip().lower()
    keep = choice in ("1", "true", "yes")
    jax.config.update("jax_cpu_enable_async_dispatch", keep)
    return keep


def setup_process() -> None:
    """The setup of a process about to compute (a ``jaxlab`` command, an experiment's child process): CPU
    computations inline (:func:`configure_cpu_dispatch`) and freed host memory kept for reuse
    (:func:`jaxlab.host_memory.keep_freed_memory`). Call it before JAX creates its CPU client."""
    configure_cpu_dispatch()
    keep_freed_memory()  # XLA:CPU's buffers reused instead of page-faulted in anew every step
