"""What a jaxlab process that computes sets up before JAX creates its CPU client: the dispatch mode and host memory.

Both the ``jaxlab`` command and the child processes of ``jaxlab reproduce --jobs N`` call :func:`setup_process`,
so that an experiment runs the same way in either: the same dispatch mode, the same allocator settings. (Before,
the children kept JAX's asynchronous CPU dispatch while ``jaxlab reproduce NAME`` ran inline; Mamba-2's forward
pass at L=8192 in ``linear-scaling --quick`` took 37-39 ms in a child against 23-24 ms from the command, on 2 cores,
enough to move its fitted time exponent from 1.02-1.06 to 1.11-1.19. On a pinned child's one core the dispatch
thread competed with the computation: set up like the command, the quick set's experiment time fell from 1,921 to
1,728 s, e.g. ``lm-stdlib`` 69 -> 52 s and ``moonlight-muon`` 238 -> 173 s, with the same results.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from jaxlab.host_memory import keep_freed_memory

__all__ = ["ASYNC_DISPATCH_COMMANDS", "configure_cpu_dispatch", "setup_process"]

ASYNC_DISPATCH_COMMANDS = frozenset({("train", "lm")})
"""``(command, name)`` pairs whose programs make no host callbacks, so they keep JAX's asynchronous CPU
dispatch: the host packs the next batch while the step runs (``jaxlab train lm``: 4-5% more tokens/s,
``benchmarks/results/lm-cpu.md``)."""


def configure_cpu_dispatch(command: str | None = None, rest: Sequence[str] = ()) -> bool:
    """Run CPU computations inline rather than on JAX's asynchronous CPU dispatch threads, except for the
    ``(command, rest[0])`` pairs in ``ASYNC_DISPATCH_COMMANDS``. Returns whether asynchronous dispatch is on.

    The training loops report progress through ``jax.debug.callback`` from inside jitted scans
    (``JitProgress``) and the post-training verifiers run on the host (``jax.pure_callback``); with
    asynchronous CPU dispatch such programs can hang, intermittently (jax-ml/jax#25861). Whole-run ``jit``
    programs lose nothing by running inline, and timed ones measure faster and steadier (module docstring).
    Must run before JAX creates its CPU client.
    ``JAX_CPU_ENABLE_ASYNC_DISPATCH=1`` (or ``0``) in the environment turns it on (or off) for every command.
    """
    import jax

    choice = os.environ.get("JAX_CPU_ENABLE_ASYNC_DISPATCH", "").strip().lower()
    if choice in ("1", "true", "yes"):
        keep = True
    elif choice in ("0", "false", "no"):
        keep = False
    else:
        keep = (command, rest[0] if rest else None) in ASYNC_DISPATCH_COMMANDS
    jax.config.update("jax_cpu_enable_async_dispatch", keep)
    return keep


def setup_process(command: str | None = None, rest: Sequence[str] = ()) -> None:
    """The setup of a process about to run ``jaxlab COMMAND REST...``: the CPU dispatch mode
    (:func:`configure_cpu_dispatch`) and freed host memory kept for reuse
    (:func:`jaxlab.host_memory.keep_freed_memory`). Call it before JAX creates its CPU client."""
    configure_cpu_dispatch(command, rest)
    keep_freed_memory()  # XLA:CPU's buffers reused instead of page-faulted in anew every step
