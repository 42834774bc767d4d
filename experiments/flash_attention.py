"""``flash-attention``: memory and time of exact attention against sequence length (Dao et al. 2022, Fig. 3).

Standard attention materialises the [L, L] score matrix, so its memory grows quadratically with the
sequence length; FlashAttention tiles Q, K and V, keeps a running max and sum (online softmax) and
recomputes the scores in the backward pass, so its memory grows linearly and, on a GPU, it also runs
faster because the scores never travel through HBM. This experiment sweeps L for every
implementation of ``jaxlab.kernels.attention`` that the backend offers (``xla`` = dense,
``blockwise`` = tiled online softmax in pure JAX; ``pallas`` and ``cudnn`` on a GPU), times the
forward + backward pass and reads the compiled program's temporary buffers from XLA's
``memory_analysis`` (lengths in ``memory_lens`` are compiled but not run).

The measuring helpers here (``attention_fns``, ``temp_bytes``, ``time_interleaved``,
``attention_flops``) are shared with ``benchmarks/attention.py``; ``fit_exponent`` and ``time_interleaved``
also with ``linear-scaling``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.kernels.attention import dot_product_attention
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.validation import check_positive

__all__ = ["FlashAttentionConfig", "attention_flops", "attention_fns", "backend_impls", "fit_exponent", "random_qkv",
           "temp_bytes", "time_interleaved"]

# FlashAttention repository README, memory figure (A100, against PyTorch standard attention).
FA_MEMORY_SAVINGS = {2048: 10.0, 4096: 20.0}
FA_MEMORY_SOURCE = ("FlashAttention repository README, memory figure (A100): '10X memory savings at sequence "
                    "length 2K, and 20X at 4K'")
# FlashAttention-2 repository benchmark charts, H100, fwd+bwd, non-causal, L = 512 ... 16k (TFLOP/s).
FA2_H100_FWD_BWD = {64: "215-296", 128: "248-338"}
FA2_H100_SOURCE = "FlashAttention-2 repository benchmark charts, H100"


# ---- measuring helpers (shared with benchmarks/attention.py) ---------------------------------------------
def backend_impls(backend: str | None = None) -> tuple[str, ...]:
    """Implementations worth timing on a backend (the Pallas interpreter is a test path, not a fast one)."""
    backend = backend or jax.default_backend()
    return ("xla", "blockwise", "pallas", "cudnn") if backend == "gpu" else ("xla", "blockwise")


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, *, causal: bool, mode: str) -> float:
    """Matmul FLOPs as FlashAttention-2 counts them: fwd = 4 B H L^2 D (halved if causal), fwd+bwd = 3.5 x fwd."""
    fwd = 4.0 * batch * heads * seq_len**2 * head_dim / (2 if causal else 1)
    return {"fwd": fwd, "fwd_bwd": 3.5 * fwd}[mode]


def attention_fns(impl: str, *, causal: bool, **blocks) -> tuple[Callable, Callable]:
    """Jitted ``fwd(q, k, v) -> out`` and ``fwd_bwd(q, k, v, do) -> (dq, dk, dv)``.

    ``impl`` is a ``dot_product_attention`` impl or ``"jax-mha"``, JAX's own Pallas GPU kernel;
    ``blocks`` (``block_q``, ``block_k``) go to the tiled impls.
    """
    if impl == "jax-mha":
        from jax.experimental.pallas.ops.gpu import attention as jax_attention

        def attn(q, k, v):
            return jax_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal)
    else:
        def attn(q, k, v):
            return dot_product_attention(q, k, v, causal=causal, impl=impl, **blocks)

    return jax.jit(attn), jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))


def temp_bytes(compiled) -> int | None:
    """Temporary buffer bytes of a compiled program (XLA ``memory_analysis``), None if unavailable."""
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int, stat: str = "min") -> dict[str, float]:
    """Wall-clock seconds of each zero-argument call, the best (``stat="min"``) or the median of ``repeats``;
    calls alternate so load spikes hit all alike."""
    if stat not in ("min", "median"):
        raise ValueError(f"stat={stat!r} must be 'min' or 'median'")
    for fn in calls.values():
        jax.block_until_ready(fn())  # warm-up
    seconds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            seconds[name].append(time.perf_counter() - start)
    reduce = min if stat == "min" else lambda ts: float(np.median(ts))
    return {name: reduce(ts) for name, ts in seconds.items()}


def fit_exponent(lengths, values) -> float | None:
    """Least-squares slope of log(value) against log(L): ~2 for quadratic costs, ~1 for linear ones."""
    pts = [(math.log(L), math.log(v)) for L, v in zip(lengths, values) if v]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def random_qkv(seed: int, batch: int, seq_len: int, heads: int, head_dim: int, dtype) -> tuple[jax.Array, ...]:
    """(q, k, v, do), standard normal, each [B, L, H, D]; drawn on the host so no RNG program is compiled."""
    rng = np.random.default_rng(seed)
    shape = (batch, seq_len, heads, head_dim)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32).astype(jnp.dtype(dtype))) for _ in range(4))


# ---- the experiment -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FlashAttentionConfig:
    """Sizes of the memory/time sweep."""

    seq_lens: tuple[int, ...] = (512, 1024, 2048, 4096)
    """Sequence lengths that are compiled and timed (forward + backward)."""
    memory_lens: tuple[int, ...] = (8192, 16384)
    """Further lengths that are only compiled, for the memory curve."""
    batch: int = 1
    """Batch size B."""
    heads: int = 8
    """Attention heads H (MHA)."""
    head_dim: int = 64
    """Head dimension D."""
    causal: bool = False
    """Causal masking."""
    dtype: str = "float32"
    """Input dtype (bfloat16 on GPUs, where cuDNN needs it)."""
    repeats: int = 3
    """Timed repetitions (best one counts)."""
    max_dense_mib: float = 3072.0
    """The dense impl is not run where its temporary memory would exceed this (MiB)."""

    def __post_init__(self):
        if not self.seq_lens or min(self.seq_lens + self.memory_lens) < 1:
            raise ValueError(f"seq_lens={self.seq_lens} must be non-empty and lengths positive ({self.memory_lens=})")
        check_positive(self, "batch", "heads", "head_dim", "repeats")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} must be float32, bfloat16 or float16")
        if self.max_dense_mib <= 0:
            raise ValueError(f"max_dense_mib={self.max_dense_mib} must be > 0")


def _sweep(cfg: FlashAttentionConfig, ctx: RunContext) -> list[dict]:
    impls, dtype, rows = backend_impls(), jnp.dtype(cfg.dtype), []
    lengths = sorted(set(cfg.seq_lens) | set(cfg.memory_lens))
    for L in ctx.progress(lengths, desc="sequence length"):
        shapes = [jax.ShapeDtypeStruct((cfg.batch, L, cfg.heads, cfg.head_dim), dtype)] * 4
        arrays = random_qkv(1000 * ctx.seed + L, cfg.batch, L, cfg.heads, cfg.head_dim, cfg.dtype) \
            if L in cfg.seq_lens else None
        calls, found = {}, {}
        for impl in impls:
            try:
                compiled = attention_fns(impl, causal=cfg.causal)[1].lower(*shapes).compile()
            except ValueError as e:  # an impl that declines this call (e.g. cuDNN with fp32)
                ctx.log(f"{impl} skipped at L={L}: {e}")
                continue
            mib = temp_bytes(compiled) / 2**20
            found[impl] = {"impl": impl, "seq_len": L, "temp_mib": mib, "fwd_bwd_ms": None, "tflops": None}
            if arrays is not None and not (impl == "xla" and mib > cfg.max_dense_mib):
                calls[impl] = lambda c=compiled: c(*arrays)
        for impl, seconds in time_interleaved(calls, cfg.repeats).items():
            flops = attention_flops(cfg.batch, cfg.heads, L, cfg.head_dim, causal=cfg.causal, mode="fwd_bwd")
            found[impl].update(fwd_bwd_ms=1e3 * seconds, tflops=flops / seconds / 1e12)
        rows.extend(found.values())
    return rows


def _plot(rows: list[dict], cfg: FlashAttentionConfig, path) -> None:
    fig = Figure(figsize=(11, 4))
    (ax_t, ax_m) = fig.subplots(1, 2)
    for i, impl in enumerate(dict.fromkeys(r["impl"] for r in rows)):
        mine = [r for r in rows if r["impl"] == impl]
        timed = [r for r in mine if r["fwd_bwd_ms"] is not None]
        ax_t.loglog([r["seq_len"] for r in timed], [r["fwd_bwd_ms"] for r in timed], "o-", color=f"C{i}", label=impl)
        ax_m.loglog([r["seq_len"] for r in mine], [r["temp_mib"] for r in mine], "s-", color=f"C{i}", label=impl)
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    what = f"B={cfg.batch}, H={cfg.heads}, D={cfg.head_dim}, {cfg.dtype}{', causal' if cfg.causal else ''}"
    ax_t.set(ylabel="forward + backward time (ms)", title=f"Runtime ({jax.default_backend()}, {what})")
    ax_m.set(ylabel="temporary memory, fwd + bwd (MiB)", title="Memory (XLA memory_analysis)")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.9, wspace=0.25)
    fig.savefig(path, dpi=120)


@register_experiment(
    "flash-attention",
    description="Memory and time of dense vs tiled (FlashAttention) exact attention against sequence length",
    paper="Dao et al. 2022, FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness, Figure 3",
    quick_seconds=7.8,
    quick=FlashAttentionConfig(seq_lens=(256, 512, 1024), memory_lens=(2048, 4096, 8192), repeats=2),
)
def flash_attention(cfg: FlashAttentionConfig, ctx: RunContext) -> ExperimentResult:
    rows = _sweep(cfg, ctx)
    _plot(rows, cfg, ctx.figure_path)
    by = {(r["impl"], r["seq_len"]): r for r in rows}
    lengths = sorted({r["seq_len"] for r in rows})
    savings = {L: by[("xla", L)]["temp_mib"] / by[("blockwise", L)]["temp_mib"] for L in lengths
               if ("xla", L) in by and ("blockwise", L) in by}
    speedups = {L: by[("xla", L)]["fwd_bwd_ms"] / by[("blockwise", L)]["fwd_bwd_ms"] for L in lengths
                if by.get(("xla", L), {}).get("fwd_bwd_ms") and by.get(("blockwise", L), {}).get("fwd_bwd_ms")}
    backend = jax.default_backend()
    comparisons = [Comparison(quantity=f"memory saving dense/blockwise (fwd+bwd temp), L={L}",
                              ours=round(savings[L], 1), published=FA_MEMORY_SAVINGS[L],
                              source=FA_MEMORY_SOURCE + f"; ours on {backend}")
                   for L in FA_MEMORY_SAVINGS if L in savings]
    if backend == "gpu" and cfg.head_dim in FA2_H100_FWD_BWD and not cfg.causal:
        comparisons += [Comparison(quantity=f"pallas fwd+bwd TFLOP/s, L={r['seq_len']}, D={cfg.head_dim}",
                                   ours=round(r["tflops"], 1), published=FA2_H100_FWD_BWD[cfg.head_dim],
                                   source=FA2_H100_SOURCE) for r in rows if r["impl"] == "pallas" and r["tflops"]]
    slope, fitted = {}, {}
    for impl in ("xla", "blockwise"):  # growth exponent of memory: the two longest lengths, and fitted over all
        pts = [(L, by[(impl, L)]["temp_mib"]) for L in lengths if (impl, L) in by]
        if len(pts) >= 2:
            (l0, m0), (l1, m1) = pts[-2], pts[-1]
            slope[impl] = math.log(m1 / m0) / math.log(l1 / l0)
            fitted[impl] = fit_exponent(*zip(*pts))
    longest = max(savings) if savings else None
    nan = float("nan")
    span = f"L={lengths[0]}..{lengths[-1]}"
    claims = (
        Claim(claim="dense attention's fwd+bwd temporary memory grows ~L^2: fitted log-log exponent >= 1.8",
              holds=fitted.get("xla", -math.inf) >= 1.8,
              evidence=f"dense exponent {fitted.get('xla', nan):.3f} fitted over {span}"),
        Claim(claim="tiled (FlashAttention) fwd+bwd temporary memory grows ~L: fitted log-log exponent <= 1.2",
              holds=fitted.get("blockwise", math.inf) <= 1.2,
              evidence=f"tiled exponent {fitted.get('blockwise', nan):.3f} fitted over {span}"),
        *(Claim(claim=f"memory saving of tiled vs dense >= {FA_MEMORY_SAVINGS[L]:g}x at L={L}",
                holds=savings.get(L, -math.inf) >= FA_MEMORY_SAVINGS[L],
                evidence=(f"{by[('xla', L)]['temp_mib']:.1f} MiB / {by[('blockwise', L)]['temp_mib']:.1f} MiB = "
                          f"{savings[L]:.1f}x" if L in savings else f"L={L} not in the sweep"))
          for L in FA_MEMORY_SAVINGS),
    )
    summary = (
        f"On {backend}, dense attention's fwd+bwd temporary memory grows like L^{fitted.get('xla', nan):.2f} and "
        f"the tiled online-softmax (blockwise) like L^{fitted.get('blockwise', nan):.2f} (least-squares fits over "
        f"{span}; L^{slope.get('xla', nan):.2f} against L^{slope.get('blockwise', nan):.2f} between the two longest "
        "lengths): quadratic against linear, as in FlashAttention's Figure 3. "
        + "".join(f"At L={L} the tiled version needs {savings[L]:.0f}x less memory "
                  f"(published {FA_MEMORY_SAVINGS[L]:g}x). " for L in FA_MEMORY_SAVINGS if L in savings)
        + (f"At L={longest}, {savings[longest]:.0f}x. " if longest and longest not in FA_MEMORY_SAVINGS else "")
        + (f"Fwd+bwd runs {speedups[max(speedups)]:.2f}x as fast as dense at L={max(speedups)}. " if speedups else "")
        + "The published savings were measured on an A100 against PyTorch; "
        + ("on a CPU only the memory ratios are comparable, not the times." if backend != "gpu" else
           "GPU TFLOP/s are compared with FlashAttention-2's H100 charts.")
    )
    metrics = {"rows": rows, "memory_saving": savings, "speedup_vs_dense": speedups, "memory_growth_exponent": slope,
               "memory_fitted_exponent": fitted, "backend": backend, "config": dataclasses.asdict(cfg)}
    return ExperimentResult(metrics=metrics, comparisons=tuple(comparisons), summary=summary, claims=claims)
