"""Benchmark: DDP and ZeRO-1/2/3 side by side, step time and bytes moved by collectives.

    python benchmarks/parallel.py [--quick] [--devices 8]

For each implementation (``jit``: shardings + XLA partitioner; ``shard_map``: explicit
collectives; plus DDP with the ppermute ring all-reduce) and each strategy, one run:

* step time (median over repeats) and its ratio to DDP of the same implementation;
* bytes each device sends per step, summed over the collectives of the compiled program
  under ring algorithms (``hlo_collectives``), and for shard_map also of the program as
  written (``jaxpr_collectives``), next to the ZeRO paper's analysis (Rajbhandari et al. 2020,
  Sec. 7: DP, ZeRO-1 and ZeRO-2 move 2 Psi per device, ZeRO-3 3 Psi, i.e. 1.5x);
* XLA's per-device memory analysis of the compiled step.

On CPU the "devices" are simulated (``--xla_force_host_platform_device_count``) and share the
host's cores, so step times measure the programs' overheads, not a network. Results go to
``benchmarks/results/parallel-<backend>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
RUNS = [("jit", s, "psum") for s in STRATEGIES] + [("shard_map", s, "psum") for s in STRATEGIES] + [
    ("shard_map", "ddp", "ring")]


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, few repeats")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (data axis size)")
    p.add_argument("--out", type=pathlib.Path,
                   default=pathlib.Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    # must happen before JAX initialises its backend
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(args.devices))

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlab.optim import OptimizerConfig, make_optimizer
    from jaxlab.parallel import make_mesh, shard_train_state
    from jaxlab.parallel.collectives import hlo_collectives, jaxpr_collectives, zero_comm_bytes
    from jaxlab.parallel.memory import compiled_memory
    from jaxlab.train_state import create_train_state, make_train_step, step_key

    width, depth, batch = (256, 4, 64) if args.quick else (512, 6, 128)
    iters, repeats = (5, 3) if args.quick else (10, 5)
    n = args.devices
    rng = np.random.default_rng(0)
    params = {f"w{i}": (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32)
              for i in range(depth)}
    params |= {f"b{i}": np.zeros(width, np.float32) for i in range(depth)}
    psi = sum(x.size for x in params.values())
    x = rng.normal(size=(batch, width)).astype(np.float32)
    data = (x, np.tanh(x @ rng.normal(size=(width, width)).astype(np.float32)))

    def loss_fn(p, b, key):
        h, y = b  # [B, W]
        for i in range(depth):
            h = jnp.tanh(h @ p[f"w{i}"] + p[f"b{i}"])
        return jnp.mean((h - y) ** 2), {}

    # AdamW without global-norm clipping: the shard_map ZeRO programs update 1/N shards, where a
    # global norm is not at hand (jit would handle it)
    optimizer = make_optimizer(OptimizerConfig(lr=1e-3, weight_decay=0.01, clip_norm=0.0))
    fresh = jax.device_get(jax.jit(lambda p: create_train_state(p, optimizer, jax.random.PRNGKey(0)))(params))
    mesh = make_mesh(data=n)

    def by_kind(ops):
        out = {}
        for op in ops or ():
            out[op.kind] = out.get(op.kind, 0.0) + op.sent_bytes
        return out

    rows, runs = [], []
    for impl, strategy, allreduce in RUNS:
        state = shard_train_state(fresh, mesh, strategy)
        key = step_key(state)  # timing: one key for every step
        step = make_train_step(loss_fn, optimizer, mesh=mesh, strategy=strategy, impl=impl,
                               allreduce=allreduce)
        compiled = step.lower(state, data, key).compile()
        written = (jaxpr_collectives(jax.make_jaxpr(step.jitted(state, data))(state, data, key), dict(mesh.shape))
                   if impl == "shard_map" else None)
        rows.append({"impl": impl, "strategy": strategy, "allreduce": allreduce,
                     "sent_bytes_compiled": by_kind(hlo_collectives(compiled.as_text(), n)),
                     "sent_bytes_written": by_kind(written) if written is not None else None,
                     "memory": compiled_memory(compiled), "times": []})
        runs.append([step, state, key])
        for _ in range(2):  # warm up
            runs[-1][1], metrics = step(runs[-1][1], data, key)
        jax.block_until_ready(metrics)

    # Round-robin timing: every repeat times each run once, so drifts in machine load hit all alike.
    for _ in range(repeats):
        for row, run in zip(rows, runs):
            step, state, key = run
            t0 = time.perf_counter()
            for _ in range(iters):
                state, metrics = step(state, data, key)
            jax.block_until_ready((state, metrics))
            row["times"].append((time.perf_counter() - t0) / iters)
            run[1] = state
    for row in rows:
        row["step_ms"] = 1e3 * statistics.median(row.pop("times"))
        print(f"{row['impl']:9} {row['strategy']:5} {row['allreduce']:4} {row['step_ms']:8.2f} ms  "
              f"sent {sum(row['sent_bytes_compiled'].values()) / 2**20:7.2f} MiB/device",
              file=sys.stderr)

    paper_ratio = {"ddp": 1.0, "zero1": 1.0, "zero2": 1.0, "zero3": 1.5}
    for row in rows:
        ddp = next(r for r in rows if r["impl"] == row["impl"] and r["strategy"] == "ddp"
                   and r["allreduce"] == "psum")
        row["time_vs_ddp"] = row["step_ms"] / ddp["step_ms"]
        for key in ("compiled", "written"):
            mine, base = row[f"sent_bytes_{key}"], ddp[f"sent_bytes_{key}"]
            row[f"sent_{key}_vs_ddp"] = (sum(mine.values()) / sum(base.values())
                                         if mine is not None and base else None)
        row["paper_sent_bytes"] = zero_comm_bytes(psi, n, row["strategy"], grad_bytes=4)
        row["paper_vs_ddp"] = paper_ratio[row["strategy"]]

    backend = jax.default_backend()
    result = {"backend": backend, "devices": n, "num_params": psi, "width": width, "depth": depth,
              "batch": batch, "quick": args.quick, "jax": jax.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"parallel-{backend}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"parallel-{backend}.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _markdown(r) -> str:
    mib = 2**20
    lines = [
        f"# Data-parallel strategies on {r['devices']} simulated {r['backend']} devices"
        + (" (--quick)" if r["quick"] else ""),
        "",
        f"MLP {r['depth']} x [{r['width']}, {r['width']}], {r['num_params']:,} fp32 params, AdamW, "
        f"global batch {r['batch']}; jax {r['jax']}. Sent = bytes each device sends per step under "
        "ring algorithms; paper = Rajbhandari et al. 2020 (ZeRO) Sec. 7: 2 Psi for DP/ZeRO-1/2, "
        "3 Psi for ZeRO-3, Psi = fp32 parameter bytes x (N-1)/N.",
        "",
        "| impl | strategy | step ms | time / DDP | sent MiB (compiled) | / DDP | sent MiB (as written) "
        "| / DDP | paper MiB | paper / DDP | XLA peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        written = row["sent_bytes_written"]
        name = row["strategy"] + (" (ring)" if row["allreduce"] == "ring" else "")
        lines.append(
            f"| {row['impl']} | {name} | {row['step_ms']:.2f} | {row['time_vs_ddp']:.2f} | "
            f"{sum(row['sent_bytes_compiled'].values()) / mib:.2f} | "
            f"{_fmt(row['sent_compiled_vs_ddp'], '.2f')} | "
            f"{_fmt(sum(written.values()) / mib if written is not None else None, '.2f')} | "
            f"{_fmt(row['sent_written_vs_ddp'], '.2f')} | {row['paper_sent_bytes'] / mib:.2f} | "
            f"{row['paper_vs_ddp']:.1f} | {row['memory']['peak'] / mib:.2f} |")
    lines += [
        "",
        "XLA:CPU notes: the jit path's gradient reduce-scatter is emitted as all-reduce + slice "
        "(reduce-scatter creation runs only in the GPU/TPU pipelines), so its ZeRO-2/3 rows move "
        "more than the shard_map rows; and XLA:CPU merges ZeRO-3's backward re-gather with the "
        "forward all-gather (it keeps the gathered parameters), so the compiled ZeRO-3 volume "
        "stays near DDP's while the program as written re-gathers in the backward pass (only the "
        "weights the backward needs: not the first layer's, nor biases, hence a little under "
        "1.5x). ZeRO-1 here "
        "gives every device the whole reduced gradient (all-reduce) before updating its optimizer "
        "shard and all-gathering the parameters, 3 Psi; the paper's P_os reduce-scatters instead "
        "(2 Psi), which in a step without gradient accumulation is exactly the ZeRO-2 program.",
        "",
        "Step times: the simulated devices share the host's cores and their collectives are memory "
        "copies, so communication is nearly free while every redundant FLOP costs; DDP repeats the "
        "whole AdamW update on every device and ZeRO-1/2/3 do 1/N of it each, which is why ZeRO "
        "steps are faster here. On real accelerators the ordering is set by the network instead.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
