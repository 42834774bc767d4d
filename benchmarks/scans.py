"""Benchmark: every method of the recurrent kernels side by side, time and memory against sequence length.

    python benchmarks/scans.py [--quick] [--out DIR]

Ops and methods (one row per op, method, length):

* ``linear_recurrence`` (a, b [B, L, W]): sequential, associative, chunked;
* ``linear_attention`` (causal, normalised, q, k, v [B, L, H, D]): parallel (quadratic), chunked, recurrent,
  and ``softmax-xla``, exact causal softmax attention (``dot_product_attention(impl="xla")``) for scale;
* ``selective_scan`` (Mamba, u [B, L, Dm], N states): sequential, associative, chunked;
* ``ssd`` (Mamba-2, x [B, L, H, P]): chunked (the state-space dual form), recurrent (steps rematerialised per
  chunk) and sequential (``ssd_reference``, one ``lax.scan``).

Each row has forward and forward+backward wall time (best of interleaved repeats, so load spikes hit every
method alike) and the temporary memory of the compiled programs (XLA ``memory_analysis``); a program whose
temporary memory exceeds ``--max-temp-gib`` is compiled but not run. Targets checked and reported: the method
``"auto"`` picks on this backend is within 1.2x of the fastest measured one (every op with an auto policy, every
length, fwd and fwd+bwd); CPU: chunked causal linear attention at L=8192 at least 20x faster than ``softmax-xla``;
GPU: ``ssd`` at least 5x faster than its sequential scan at L=8192.
Results go to ``benchmarks/results/scans-<backend>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import warnings

LENGTHS = {False: (1024, 4096, 8192, 16384, 65536), True: (1024, 8192)}
SIZES = dict(batch=1, width=1024, heads=4, head_dim=64, d_inner=64, d_state=16, ssd_heads=8, ssd_head_dim=16)


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two lengths, one repeat")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, 1 with --quick)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths to sweep")
    p.add_argument("--ops", nargs="+", default=None, help="subset of ops (default: all four)")
    p.add_argument("--max-temp-gib", type=float, default=2.5, help="programs needing more temp memory are not run")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def _ops(backend):
    """{op: (make_inputs(rng, L) -> tuple of arrays, {method: fn(*inputs)}, auto(L, grad) -> method, or None)}.

    ``auto(L, grad)`` is the method whose code ``method="auto"`` runs for the values (grad=False) or for the
    gradients (grad=True); they differ for linear attention on CPU (a custom VJP joins the two forms).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlab.kernels import linear_attention as la
    from jaxlab.kernels import scan, ssm
    from jaxlab.kernels.attention import dot_product_attention

    s = SIZES
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

    def rec_inputs(rng, L):
        return (f32(rng.uniform(0.9, 1.0, (s["batch"], L, s["width"]))),
                f32(rng.standard_normal((s["batch"], L, s["width"]))))

    def la_inputs(rng, L):
        shape = (s["batch"], L, s["heads"], s["head_dim"])
        q, k, v = (f32(rng.standard_normal(shape)) for _ in range(3))
        return la.elu_plus_one(q), la.elu_plus_one(k), v

    def ss_inputs(rng, L):
        B, Dm, N = s["batch"], s["d_inner"], s["d_state"]
        return (f32(rng.standard_normal((B, L, Dm))), f32(rng.standard_normal((B, L, Dm))),
                -f32(np.broadcast_to(np.arange(1, N + 1), (Dm, N))), f32(rng.standard_normal((B, L, N))),
                f32(rng.standard_normal((B, L, N))))

    def ssd_inputs(rng, L):
        B, H, P, N = s["batch"], s["ssd_heads"], s["ssd_head_dim"], s["d_state"]
        return (f32(rng.standard_normal((B, L, H, P))), f32(rng.uniform(1e-3, 0.1, (B, L, H))),
                -f32(rng.uniform(1, 16, (H,))), f32(rng.standard_normal((B, L, 1, N))),
                f32(rng.standard_normal((B, L, 1, N))))

    rec = {m: (lambda a, b, m=m: scan.linear_recurrence(a, b, method=m))
           for m in ("sequential", "associative", "chunked")}
    lin = {m: (lambda q, k, v, m=m: la.linear_attention(q, k, v, causal=True, method=m))
           for m in ("parallel", "chunked", "recurrent")}
    lin["softmax-xla"] = lambda q, k, v: dot_product_attention(q, k, v, causal=True, impl="xla")
    sel = {m: (lambda *args, m=m: ssm.selective_scan(*args, delta_softplus=True, method=m))
           for m in ("sequential", "associative", "chunked")}
    dual = {m: (lambda *args, m=m: ssm.ssd(*args, method=m)) for m in ("chunked", "recurrent")}
    dual["sequential"] = lambda *args: ssm.ssd_reference(*args)
    del jax
    return {
        "linear_recurrence": (rec_inputs, rec, lambda L, grad: scan.auto_method(backend=backend)),
        "linear_attention": (la_inputs, lin, lambda L, grad: scan.auto_method("linear_attention", L, backend=backend,
                                                                              differentiated=grad)),
        "selective_scan": (ss_inputs, sel, lambda L, grad: scan.auto_method(backend=backend)),
        "ssd": (ssd_inputs, dual, lambda L, grad: scan.auto_method("ssd", backend=backend)),
    }


def main(argv=None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlab.experiments.flash_attention import temp_bytes, time_interleaved

    backend = jax.default_backend()
    repeats = args.repeats or (1 if args.quick else 3)
    lengths = tuple(args.lengths) if args.lengths else LENGTHS[args.quick]
    rng = np.random.default_rng(0)
    rows = []
    for op, (make_inputs, methods, _) in _ops(backend).items():
        if args.ops and op not in args.ops:
            continue
        for L in lengths:
            inputs = make_inputs(rng, L)
            specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
            calls, found = {}, {}
            for method, fn in methods.items():
                fwd = jax.jit(fn)
                out_spec = jax.eval_shape(fn, *inputs)
                ct = jnp.asarray(rng.standard_normal(out_spec.shape), out_spec.dtype)
                fwd_bwd = jax.jit(lambda *xs, fn=fn: jax.vjp(fn, *xs[:-1])[1](xs[-1]))
                c_fwd = fwd.lower(*specs).compile()
                c_bwd = fwd_bwd.lower(*specs, jax.ShapeDtypeStruct(ct.shape, ct.dtype)).compile()
                row = dict(op=op, method=method, seq_len=L, fwd_ms=None, fwd_bwd_ms=None,
                           temp_mib_fwd=temp_bytes(c_fwd) / 2**20, temp_mib_fwd_bwd=temp_bytes(c_bwd) / 2**20)
                found[method] = row
                if row["temp_mib_fwd"] <= 1024 * args.max_temp_gib:
                    calls[(method, "fwd")] = lambda c=c_fwd: c(*inputs)
                if row["temp_mib_fwd_bwd"] <= 1024 * args.max_temp_gib:
                    calls[(method, "fwd_bwd")] = lambda c=c_bwd, ct=ct: c(*inputs, ct)
            for (method, mode), seconds in time_interleaved(calls, repeats).items():
                found[method][f"{mode}_ms"] = 1e3 * seconds
            for row in found.values():
                print(_row_text(row), flush=True)
            rows.extend(found.values())

    autos = {op: spec[2] for op, spec in _ops(backend).items()}
    result = {"backend": backend, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "python": platform.python_version(), "quick": args.quick, "repeats": repeats, "sizes": SIZES,
              "rows": rows, "auto": _auto_checks(rows, autos), "targets": []}
    result["targets"] = _targets(result, backend)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"scans-{backend}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"scans-{backend}.md").write_text(_markdown(result))
    for t in result["targets"]:
        met = "n/a here" if t["met"] is None else "met" if t["met"] else "MISSED"
        print(f"target: {t['target']}: {t['value']} -> {met}")
    return 0


def _find(rows, op, method, L):
    return next((r for r in rows if r["op"] == op and r["method"] == method and r["seq_len"] == L), None)


def _auto_checks(rows, autos):
    """Per op, length and mode: the auto method's time over the fastest measured kernel method."""
    out = []
    for op, auto in autos.items():
        if auto is None:
            continue
        for L in sorted({r["seq_len"] for r in rows if r["op"] == op}):
            for mode in ("fwd_ms", "fwd_bwd_ms"):
                chosen = auto(L, mode == "fwd_bwd_ms")
                timed = {r["method"]: r[mode] for r in rows if r["op"] == op and r["seq_len"] == L and r[mode]
                         and r["method"] != "softmax-xla"}
                if chosen not in timed:
                    continue
                best = min(timed, key=timed.get)
                out.append(dict(op=op, seq_len=L, mode=mode[:-3], auto=chosen, fastest=best,
                                ratio=round(timed[chosen] / timed[best], 3)))
    return out


def _targets(result, backend):
    rows, out = result["rows"], []
    for mode in ("fwd_bwd", "fwd"):
        checks = [a for a in result["auto"] if a["mode"] == mode]
        if checks:
            worst = max(checks, key=lambda a: a["ratio"])
            out.append(dict(target=f"auto within 1.2x of the fastest method, {mode} (worst op/length)",
                            value=f"{worst['ratio']} ({worst['op']}, L={worst['seq_len']}: {worst['fastest']} "
                                  f"is fastest)", met=worst["ratio"] <= 1.2))
    if backend == "cpu":
        ours, dense = _find(rows, "linear_attention", "chunked", 8192), _find(rows, "linear_attention",
                                                                              "softmax-xla", 8192)
        for mode in ("fwd_ms", "fwd_bwd_ms"):
            if ours and dense and ours[mode] and dense[mode]:
                ratio = dense[mode] / ours[mode]
                out.append(dict(target=f"softmax-xla / chunked linear attention {mode[:-3]} time, L=8192 >= 20",
                                value=round(ratio, 1), met=ratio >= 20 if mode == "fwd_ms" else None))
    ours, seq = _find(rows, "ssd", "chunked", 8192), _find(rows, "ssd", "sequential", 8192)
    for mode in ("fwd_ms", "fwd_bwd_ms"):
        if ours and seq and ours[mode] and seq[mode]:
            ratio = seq[mode] / ours[mode]
            out.append(dict(target=f"ssd sequential / chunked {mode[:-3]} time, L=8192 (GPU goal >= 5)",
                            value=round(ratio, 2), met=(ratio >= 5) if backend == "gpu" else None))
    return out


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _row_text(r):
    return (f"{r['op']:>17} {r['method']:>11} L={r['seq_len']:>6} fwd {_fmt(r['fwd_ms'])} ms, fwd+bwd "
            f"{_fmt(r['fwd_bwd_ms'])} ms, temp fwd {_fmt(r['temp_mib_fwd'], '.1f')} MiB, fwd+bwd "
            f"{_fmt(r['temp_mib_fwd_bwd'], '.1f')} MiB")


def _markdown(result) -> str:
    s = result["sizes"]
    lines = [f"# Recurrent kernels on {result['backend']} ({result['device']})", "",
             f"fp32, B={s['batch']}; linear_recurrence width {s['width']}; linear_attention H={s['heads']}, "
             f"D={s['head_dim']} (causal, normalised, elu+1 features, chunk 64); selective_scan Dm={s['d_inner']}, "
             f"N={s['d_state']}; ssd H={s['ssd_heads']}, P={s['ssd_head_dim']}, N={s['d_state']}, one group, "
             f"chunk 64. jax {result['jax']}; best of {result['repeats']} interleaved repeats"
             f"{' (quick run)' if result['quick'] else ''}. `x fastest` = time over the fastest kernel method of "
             "the op at that length (fwd+bwd); temp = XLA memory_analysis temporary bytes; '-' = compiled only.",
             "", "| op | method | L | fwd ms | fwd+bwd ms | x fastest | temp fwd MiB | temp fwd+bwd MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        timed = [x["fwd_bwd_ms"] for x in result["rows"] if x["op"] == r["op"] and x["seq_len"] == r["seq_len"]
                 and x["fwd_bwd_ms"] and x["method"] != "softmax-xla"]
        rel = r["fwd_bwd_ms"] / min(timed) if r["fwd_bwd_ms"] and timed else None
        lines.append(f"| {r['op']} | {r['method']} | {r['seq_len']} | {_fmt(r['fwd_ms'])} | {_fmt(r['fwd_bwd_ms'])} | "
                     f"{_fmt(rel)} | {_fmt(r['temp_mib_fwd'], '.1f')} | {_fmt(r['temp_mib_fwd_bwd'], '.1f')} |")
    lines += ["", "`method=\"auto\"` on this backend against the fastest measured method:", "",
              "| op | L | mode | auto picks | fastest | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {a['op']} | {a['seq_len']} | {a['mode']} | {a['auto']} | {a['fastest']} | {a['ratio']} |"
              for a in result["auto"]]
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'-' if t['met'] is None else 'yes' if t['met'] else 'NO'} |"
              for t in result["targets"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
