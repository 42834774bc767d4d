"""``jaxlab launch``: start N processes joined by ``jax.distributed`` (the torchrun of jaxlab).

    jaxlab launch --nproc 2 -- train.py --steps 100                 # 2 local processes
    jaxlab launch --nproc 2 --cpu-devices 4 -- python train.py       # 2 x 4 simulated CPU devices
    # the same job on two hosts (one process per host, JAX's usual layout):
    host0$ jaxlab launch --nproc 2 --coordinator host0:1234 --process-id 0 -- train.py
    host1$ jaxlab launch --nproc 2 --coordinator host0:1234 --process-id 1 -- train.py

The command after ``--`` is a jaxlab command (``run zero-memory ...``; a leading ``jaxlab`` is
optional), a Python script (``script.py ...``) or ``python ...`` (run with this interpreter).
Each child gets ``JAXLAB_COORDINATOR``, ``JAXLAB_NUM_PROCESSES`` and ``JAXLAB_PROCESS_ID``;
programs call ``maybe_initialize_distributed()`` first thing, which joins the job when those
are set and does nothing otherwise, so one command line serves 1 or N processes. After that,
``jax.devices()`` lists every process's devices, a mesh from ``make_mesh`` spans them all, and
the train step (``make_train_step(loss_fn, optimizer, mesh=mesh, strategy=...)``, called with the
same global batch and ``step_key(state)`` in every process), its metrics and the orbax checkpoints
are the same program as in one process.

If a child fails, the others are stopped and its exit code is returned. Usage errors exit
with status 2 (``SystemExit``, as argparse does).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from jaxlab.child_process import python_module_command

__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "child_command",
           "distributed_env", "main", "maybe_initialize_distributed"]

ENV_COORDINATOR = "JAXLAB_COORDINATOR"
ENV_NUM_PROCESSES = "JAXLAB_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLAB_PROCESS_ID"


def distributed_env(environ: dict[str, str] | None = None) -> tuple[str, int, int] | None:
    """``(coordinator, num_processes, process_id)`` from the launcher's variables, or ``None``."""
    env = os.environ if environ is None else environ
    if ENV_NUM_PROCESSES not in env:
        return None
    try:
        coordinator = env[ENV_COORDINATOR]
        num, pid = int(env[ENV_NUM_PROCESSES]), int(env[ENV_PROCESS_ID])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{ENV_NUM_PROCESSES} is set, so {ENV_COORDINATOR} (host:port) and "
                         f"{ENV_PROCESS_ID} (an int) must be too: {e!r}") from None
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={num})")
    return coordinator, num, pid


def maybe_initialize_distributed() -> bool:
    """Join the ``jax.distributed`` job described by the launcher's variables, if any.

    Call before anything touches JAX devices. Returns whether this process is part of a
    multi-process job. Idempotent.
    """
    env = distributed_env()
    if env is None:
        return False
    import jax

    if not jax.distributed.is_initialized():
        coordinator, num, pid = env
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                                   process_id=pid)
    return True


def child_command(command: list[str]) -> list[str]:
    """The argv a child runs for the command given after ``--``."""
    if not command:
        raise ValueError("no command after '--'; e.g. jaxlab launch --nproc 2 -- python train.py")
    head, rest = command[0], command[1:]
    if head in ("python", "python3", sys.executable):
        return [sys.executable, *rest]
    if head.endswith(".py"):
        return [sys.executable, head, *rest]
    if head == "jaxlab":
        return python_module_command("jaxlab", *rest)
    return python_module_command("jaxlab", *command)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxlab launch",
        description="Run a jaxlab command as N processes joined by jax.distributed.",
        usage="jaxlab launch --nproc N [--coordinator HOST:PORT --process-id I] "
              "[--cpu-devices K] -- COMMAND ...")
    p.add_argument("--nproc", type=int, required=True,
                   help="total number of processes in the job")
    p.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0 (default: 127.0.0.1 and a free port)")
    p.add_argument("--process-id", type=int, default=None,
                   help="start only this process of the job (one host of a multi-host job); "
                        "without it all --nproc processes start here")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="simulated CPU devices per process (sets JAX_NUM_CPU_DEVICES)")
    return p


def _child_env(coordinator: str, nproc: int, pid: int, cpu_devices: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(nproc),
                ENV_PROCESS_ID: str(pid)})
    if cpu_devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
        env["JAX_NUM_CPU_DEVICES"] = str(cpu_devices)
    return env


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str]) -> int:
    """Entry point of ``jaxlab launch``; returns the job's exit code."""
    if "--" not in argv:
        _parser().print_usage(sys.stderr)
        print("jaxlab launch: error: put the command after '--'", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = _parser()
    args = parser.parse_args(argv[:split])  # usage errors exit with status 2, like argparse
    if args.nproc < 1:
        parser.error(f"--nproc={args.nproc} must be at least 1")
    if args.process_id is not None:
        if not 0 <= args.process_id < args.nproc:
            parser.error(f"--process-id={args.process_id} must be in [0, --nproc={args.nproc})")
        if args.coordinator is None:
            parser.error("--process-id needs --coordinator HOST:PORT (process 0's address)")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        parser.error(f"--cpu-devices={args.cpu_devices} must be at least 1")
    coordinator = args.coordinator or f"127.0.0.1:{_free_port()}"
    if ":" not in coordinator:
        parser.error(f"--coordinator={coordinator!r} must be HOST:PORT")
    if not argv[split + 1:]:
        parser.error("no command after '--'; e.g. jaxlab launch --nproc 2 -- python train.py")
    command = child_command(argv[split + 1:])
    ids = range(args.nproc) if args.process_id is None else [args.process_id]

    procs = [subprocess.Popen(command, env=_child_env(coordinator, args.nproc, i, args.cpu_devices))
             for i in ids]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
