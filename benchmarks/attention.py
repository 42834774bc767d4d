"""Benchmark: exact attention implementations side by side, time and memory against sequence length.

    python benchmarks/attention.py [--quick] [--out DIR]

For every implementation the backend has (CPU: ``xla`` = dense scores, ``blockwise`` = tiled online
softmax; GPU: also ``pallas``, ``cudnn`` and JAX's own Pallas kernel ``jax.experimental.pallas.ops.
gpu.attention.mha`` as ``jax-mha``) and each sequence length, one row with:

* forward and forward+backward wall time (best of interleaved repeats, so load spikes hit every
  impl alike) and the FLOP rate with FlashAttention-2's count (fwd 4 B H L^2 D, halved if causal;
  fwd+bwd 3.5x that);
* the temporary memory XLA's ``memory_analysis`` reports for the compiled forward and
  forward+backward programs (lengths above ``--time-max-len`` are compiled but not run).

Targets checked and reported: CPU, ``blockwise`` fwd+bwd temporary memory at L=8192 under 10% of
``xla``'s, and its fwd+bwd time within 2x of ``xla``'s at L=4096; GPU (bf16, B=2, H=16, D=128),
``pallas`` fwd+bwd at least as fast as ``jax-mha`` and at least 70% of ``cudnn`` for L >= 4096
(``--pallas-blocks`` times extra tilings of the Pallas kernels next to the defaults).
The Pallas interpreter (the CPU test path) is not a performance path and is not timed.
Results go to ``benchmarks/results/attention-<backend>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import warnings

CPU = dict(batch=1, heads=8, head_dim=64, dtype="float32", impls=("xla", "blockwise"), max_dense_gib=4.0)
GPU = dict(batch=2, heads=16, head_dim=128, dtype="bfloat16", impls=("pallas", "cudnn", "jax-mha", "xla", "blockwise"),
           max_dense_gib=24.0)
LENGTHS = {("cpu", False): (512, 1024, 2048, 4096, 8192), ("cpu", True): (1024, 4096, 8192),
           ("gpu", False): (1024, 2048, 4096, 8192, 16384), ("gpu", True): (1024, 4096, 16384)}


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer lengths, non-causal only, one repeat")
    p.add_argument("--time-max-len", type=int, default=None, help="longest timed length (default 4096 CPU, all GPU)")
    p.add_argument("--pallas-blocks", default="",
                   help="extra pallas tilings to time on GPU, e.g. '64x64,128x128' (block_q x block_k)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jax
    import jax.numpy as jnp

    from jaxlab.experiments.flash_attention import (attention_flops, attention_fns, random_qkv, temp_bytes,
                                                    time_interleaved)

    backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
    cfg = GPU if backend == "gpu" else CPU
    time_max = args.time_max_len or (1 << 30 if backend == "gpu" else 4096)
    repeats = 1 if args.quick else 3
    B, H, D, dtype = cfg["batch"], cfg["heads"], cfg["head_dim"], jnp.dtype(cfg["dtype"])
    rows = []
    for causal in (False,) if args.quick else (False, True):
        lengths = LENGTHS[(backend, causal)]
        if args.quick:
            lengths = (1024, 4096, 8192) if backend == "cpu" else (4096, 16384)
        for L in lengths:
            shapes = [jax.ShapeDtypeStruct((B, L, H, D), dtype)] * 4
            q, k, v, do = random_qkv(L, B, L, H, D, cfg["dtype"]) if L <= time_max else (None,) * 4
            found, calls = {}, {}
            variants = [(impl, {}) for impl in cfg["impls"]]
            if backend == "gpu":
                variants += [(f"pallas[{t}]", dict(zip(("block_q", "block_k"), map(int, t.split("x")))))
                             for t in args.pallas_blocks.split(",") if t]
            for impl, blocks in variants:
                fwd, fwd_bwd = attention_fns(impl.split("[")[0], causal=causal, **blocks)
                try:
                    c_fwd, c_bwd = fwd.lower(*shapes[:3]).compile(), fwd_bwd.lower(*shapes).compile()
                except Exception as e:  # noqa: BLE001 -- declined (cuDNN shapes, jax-mha limits) or failed to
                    # compile: one impl must not end the comparison of the others
                    print(f"  {impl} L={L} causal={causal}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
                    continue
                row = dict(impl=impl, seq_len=L, causal=causal, temp_mib_fwd=temp_bytes(c_fwd) / 2**20,
                           temp_mib_fwd_bwd=temp_bytes(c_bwd) / 2**20, fwd_ms=None, fwd_bwd_ms=None,
                           tflops_fwd=None, tflops_fwd_bwd=None)
                found[impl] = row
                dense_too_big = impl == "xla" and row["temp_mib_fwd_bwd"] > 1024 * cfg["max_dense_gib"]
                if L <= time_max and not dense_too_big:
                    calls[(impl, "fwd")] = lambda c=c_fwd: c(q, k, v)
                    calls[(impl, "fwd_bwd")] = lambda c=c_bwd: c(q, k, v, do)
            for (impl, mode), seconds in time_interleaved(calls, repeats).items():
                flops = attention_flops(B, H, L, D, causal=causal, mode=mode)
                found[impl].update({f"{mode}_ms": 1e3 * seconds, f"tflops_{mode}": flops / seconds / 1e12})
            for row in found.values():
                print(_row_text(row), flush=True)
            rows.extend(found.values())

    result = {"backend": backend, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "python": platform.python_version(), "quick": args.quick, "repeats": repeats,
              "config": {k: cfg[k] for k in ("batch", "heads", "head_dim", "dtype")}, "rows": rows,
              "targets": _targets(rows, backend)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"attention-{backend}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"attention-{backend}.md").write_text(_markdown(result))
    for t in result["targets"]:
        print(f"target: {t['target']}: {t['value']} -> {'met' if t['met'] else 'MISSED'}")
    return 0


def _find(rows, impl, L, causal):
    return next((r for r in rows if r["impl"] == impl and r["seq_len"] == L and r["causal"] == causal), None)


def _targets(rows, backend):
    out = []
    for causal in sorted({r["causal"] for r in rows}):
        tag = "causal" if causal else "non-causal"
        if backend == "cpu":
            dense, tiled = _find(rows, "xla", 8192, causal), _find(rows, "blockwise", 8192, causal)
            if dense and tiled:
                ratio = tiled["temp_mib_fwd_bwd"] / dense["temp_mib_fwd_bwd"]
                out.append(dict(target=f"blockwise/xla fwd+bwd temp memory, L=8192, {tag} < 0.10",
                                value=round(ratio, 4), met=ratio < 0.10))
            dense, tiled = _find(rows, "xla", 4096, causal), _find(rows, "blockwise", 4096, causal)
            if dense and tiled and dense["fwd_bwd_ms"] and tiled["fwd_bwd_ms"]:
                ratio = tiled["fwd_bwd_ms"] / dense["fwd_bwd_ms"]
                out.append(dict(target=f"blockwise/xla fwd+bwd time, L=4096, {tag} < 2", value=round(ratio, 3),
                                met=ratio < 2))
            continue
        for L in sorted({r["seq_len"] for r in rows if r["seq_len"] >= 4096}):
            ours = _find(rows, "pallas", L, causal)
            for other, need in (("jax-mha", 1.0), ("cudnn", 0.7)):
                theirs = _find(rows, other, L, causal)
                if ours and theirs and ours["tflops_fwd_bwd"] and theirs["tflops_fwd_bwd"]:
                    ratio = ours["tflops_fwd_bwd"] / theirs["tflops_fwd_bwd"]
                    out.append(dict(target=f"pallas/{other} fwd+bwd TFLOP/s, L={L}, {tag} >= {need}",
                                    value=round(ratio, 3), met=ratio >= need))
    return out


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def _row_text(r):
    return (f"{r['impl']:>10} L={r['seq_len']:>6} {'causal' if r['causal'] else '      '} "
            f"fwd {_fmt(r['fwd_ms'], '.2f')} ms, fwd+bwd {_fmt(r['fwd_bwd_ms'], '.2f')} ms "
            f"({_fmt(r['tflops_fwd_bwd'], '.3f')} TFLOP/s), temp fwd {_fmt(r['temp_mib_fwd'])} MiB, "
            f"fwd+bwd {_fmt(r['temp_mib_fwd_bwd'])} MiB")


def _markdown(result) -> str:
    c = result["config"]
    lines = [f"# Exact attention on {result['backend']} ({result['device']})", "",
             f"B={c['batch']}, H={c['heads']}, D={c['head_dim']}, {c['dtype']}; jax {result['jax']}; best of "
             f"{result['repeats']} interleaved repeats{' (quick run)' if result['quick'] else ''}. Time ratios and "
             "memory ratios are relative to `xla` (dense scores) at the same length; temp = XLA memory_analysis "
             "temporary bytes of the compiled program; '-' = compiled only (memory), not run.", "",
             "| impl | L | causal | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | time / xla | temp fwd MiB | "
             "temp fwd+bwd MiB | memory / xla |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        dense = _find(result["rows"], "xla", r["seq_len"], r["causal"])
        t_ratio = r["fwd_bwd_ms"] / dense["fwd_bwd_ms"] if dense and dense["fwd_bwd_ms"] and r["fwd_bwd_ms"] else None
        m_ratio = r["temp_mib_fwd_bwd"] / dense["temp_mib_fwd_bwd"] if dense else None
        lines.append(f"| {r['impl']} | {r['seq_len']} | {'yes' if r['causal'] else 'no'} | "
                     f"{_fmt(r['fwd_ms'], '.2f')} | {_fmt(r['fwd_bwd_ms'], '.2f')} | "
                     f"{_fmt(r['tflops_fwd_bwd'], '.3f')} | {_fmt(t_ratio, '.2f')} | "
                     f"{_fmt(r['temp_mib_fwd'])} | {_fmt(r['temp_mib_fwd_bwd'])} | {_fmt(m_ratio, '.3f')} |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |" for t in result["targets"]]
    if result["backend"] == "cpu":
        lines += ["", "The Pallas kernels run here only through the interpreter (a correctness path); their "
                  "GPU TFLOP/s against cuDNN and `jax-mha` need a CUDA device (run this script there)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
