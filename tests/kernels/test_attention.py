"""Exact attention: every implementation against ``attention_reference``, forward and gradients.

The feature matrix (B, Lq, Lk, D, MHA/GQA/MQA, causal, segment ids, window, softcap, fp32/bf16,
tile sizes) is sampled by hand in ``CASES`` so that every feature and awkward size (lengths 1, 17,
200 that no tile divides; head dims 48, 72) appears at least once while the compile count stays
small. bf16 rule: the error against the fp32 reference may be at most twice the error of the naive
all-bf16 computation (plus a tiny floor for exactly-zero cases). Pallas runs in interpret mode here;
the ``gpu``-marked test runs it (and cuDNN) compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlab.kernels.attention import (_dense_attention, attention_reference, auto_tile, dot_product_attention,
                                     select_impl)
from jaxlab.kernels.attention_masks import MaskSpec, check_attention_args

warnings.filterwarnings("ignore", message=".*[Tt]riton.*", category=DeprecationWarning)


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    Lq: int
    Lk: int
    Hq: int
    Hkv: int
    D: int
    causal: bool = False
    segments: str | None = None  # None | "self" ([B, L] packed ids) | "pair" (q ids missing from kv ids)
    window: int | None = None  # W keys per query, its own included
    softcap: float | None = None
    dtype: str = "float32"
    blocks: tuple[int, int] | None = None  # (block_q, block_k) for blockwise/pallas
    impls: tuple[str, ...] = ("blockwise",)

    def __str__(self):
        opts = [f"B{self.B}", f"q{self.Lq}", f"k{self.Lk}", f"h{self.Hq}-{self.Hkv}", f"d{self.D}", self.dtype[:4]]
        opts += ["causal"] * self.causal + [f"seg-{self.segments}"] * bool(self.segments)
        opts += [f"win{self.window}"] * bool(self.window) + [f"cap{self.softcap}"] * bool(self.softcap)
        return "-".join(opts + [f"blk{self.blocks}"] * bool(self.blocks)).replace(" ", "")

    @property
    def options(self) -> dict:
        return dict(causal=self.causal, window=self.window, softcap=self.softcap)


X, BW, PL = "xla", "blockwise", "pallas"
CASES = [
    # causal self-attention over several tiles in both directions (also the split-loop test below)
    Case(1, 200, 200, 4, 2, 48, causal=True, blocks=(64, 32), impls=(BW, PL)),
    # causal with Lq > Lk: the first Lq - Lk rows see no key
    Case(1, 384, 17, 6, 2, 72, causal=True, blocks=(128, 16), impls=(BW, PL)),
    Case(1, 128, 200, 2, 2, 128, segments="pair", window=9, impls=(BW, PL)),
    # two-sided window with soft-capping: tiles skipped on both sides of the band
    Case(2, 384, 384, 4, 4, 32, window=33, softcap=20.0, blocks=(64, 64), impls=(BW, PL)),
    Case(2, 1, 384, 4, 1, 32, causal=True, blocks=(16, 64), impls=(BW,)),  # decoding one token, MQA
    Case(2, 1, 1, 2, 1, 48, impls=(X, BW, PL)),
    Case(1, 17, 17, 4, 2, 128, causal=True, window=5, softcap=5.0, dtype="bfloat16", impls=(X, BW, PL)),
    # two-sided window without causal and Lq > Lk: rows far from the keys see nothing
    Case(2, 200, 128, 6, 2, 32, window=51, softcap=30.0, blocks=(32, 32), impls=(BW,)),
    # every mask at once on packed sequences, in bf16
    Case(1, 384, 384, 2, 1, 48, causal=True, window=101, segments="self", dtype="bfloat16", blocks=(128, 64),
         impls=(X, BW, PL)),
    Case(2, 128, 128, 4, 1, 72, dtype="bfloat16", blocks=(32, 64), impls=(X, BW, PL)),  # no mask, several tiles
    # q ids 0..2 against kv ids 0..1: queries with id 2 see nothing
    Case(2, 17, 200, 4, 2, 64, segments="pair", causal=True, blocks=(16, 32), impls=(X, BW, PL)),
]
PARAMS = [pytest.param(c, impl, id=f"{impl}-{c}") for c in CASES for impl in c.impls]


@functools.lru_cache(maxsize=None)
def _inputs(case: Case):
    """numpy-drawn inputs (no per-shape RNG compiles): (q, k, v) and d_out in the case dtype, segment ids."""
    rng = np.random.default_rng(CASES.index(case) if case in CASES else 99)
    dtype = jnp.dtype(case.dtype)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))  # noqa: E731
    qkv = (draw(case.B, case.Lq, case.Hq, case.D), draw(case.B, case.Lk, case.Hkv, case.D),
           draw(case.B, case.Lk, case.Hkv, case.D))
    do = draw(case.B, case.Lq, case.Hq, case.D)
    seg = None
    if case.segments == "self":  # packed sequences: sorted ids with random boundaries
        seg = jnp.asarray(np.cumsum(rng.random((case.B, case.Lq)) < 8 / case.Lq, axis=1, dtype=np.int32))
    elif case.segments == "pair":  # q ids 0..2, kv ids 0..1: queries with id 2 see no key
        seg = tuple(jnp.asarray(rng.integers(0, n, (case.B, L), dtype=np.int32))
                    for n, L in ((3, case.Lq), (2, case.Lk)))
    return qkv, do, seg


def _compile(fn, *args):
    """``jax.jit(fn)`` compiled for ``args``; on CPU for compile speed rather than run speed.

    Every test here compiles fresh programs that then run once on tiny inputs, so compile time is
    the whole cost: without LLVM optimisation and with XLA:CPU's plain elemental emitters instead of
    the fusion emitters, compiling takes about a third of the time, and the program's semantics
    (what the tests check) stay the same.
    """
    options = None
    if jax.default_backend() == "cpu":
        options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    return jax.jit(fn).lower(*args).compile(compiler_options=options)


def _fwd_bwd(fn, qkv, do):
    """(out, dq, dk, dv) as fp32 numpy, forward and vjp compiled together."""

    def run(qkv, do):
        out, vjp = jax.vjp(fn, *qkv)
        return (out, *vjp(do))

    return tuple(np.asarray(x.astype(jnp.float32)) for x in _compile(run, qkv, do)(qkv, do))


def _upcast(xs):
    return tuple(jnp.asarray(np.asarray(x, np.float32)) for x in xs)


@functools.lru_cache(maxsize=None)
def _reference(case: Case):
    """fp32 reference (inputs already rounded to the case dtype) and, for bf16, the naive bf16 result."""
    qkv, do, seg = _inputs(case)
    ref = _fwd_bwd(lambda q, k, v: attention_reference(q, k, v, segment_ids=seg, **case.options), _upcast(qkv),
                   _upcast([do])[0])
    naive = None
    if case.dtype != "float32":
        args = check_attention_args(*qkv, segment_ids=seg, scale=None, impl="naive", **case.options)
        naive = _fwd_bwd(lambda q, k, v: _dense_attention(q, k, v, args, compute_dtype=qkv[0].dtype), qkv, do)
    return ref, naive


def _max_err(a, b) -> float:
    return float(np.max(np.abs(a - b)))


def _empty_rows(case: Case, seg) -> np.ndarray:
    """[B, Lq] True where a query sees no key (numpy, from the shared MaskSpec)."""
    band = None if case.window is None else (case.window - 1, case.window - 1)
    spec = MaskSpec(case.Lq, case.Lk, case.causal, band)
    q_idx, k_idx = np.arange(case.Lq)[None, :, None], np.arange(case.Lk)[None, None, :]
    if seg is None:
        vis = spec.visible(q_idx, k_idx)
    else:
        q_ids, kv_ids = (seg, seg) if not isinstance(seg, tuple) else seg
        vis = spec.visible(q_idx, k_idx, np.asarray(q_ids)[:, :, None], np.asarray(kv_ids)[:, None, :])
    return np.broadcast_to(~np.broadcast_to(vis, vis.shape[:2] + (case.Lk,)).any(-1), (case.B, case.Lq))


def _check_against_reference(case: Case, got):
    (ref, naive), names = _reference(case), ("out", "dq", "dk", "dv")
    for name, g, r, i in zip(names, got, ref, range(4)):
        assert np.all(np.isfinite(g)), f"{name} has non-finite values"
        scale = float(np.max(np.abs(r)))
        err = _max_err(g, r)
        if naive is None:  # fp32: rounding only (inputs are O(1), so 1 is the natural floor of the scale)
            assert err <= 2e-5 * max(scale, 1.0), f"{name}: max error {err:.2e} vs reference (max |ref| {scale:.2e})"
        else:
            bound = 2 * _max_err(naive[i], r) + 1e-4 * max(scale, 1e-2)
            assert err <= bound, f"{name}: bf16 error {err:.2e} > 2 x naive bf16 error ({bound:.2e})"
    empty = _empty_rows(case, _inputs(case)[2])  # rows that see no key: exactly zero output and dq
    for name, g in (("out", got[0]), ("dq", got[1])):
        assert not np.any(g[empty]), f"{name} is not zero on rows without visible keys"


@pytest.mark.parametrize("case,impl", PARAMS)
def test_matches_reference(case: Case, impl: str):
    qkv, do, seg = _inputs(case)
    blocks = dict(zip(("block_q", "block_k"), case.blocks or (None, None)))
    fn = lambda q, k, v: dot_product_attention(q, k, v, segment_ids=seg, impl=impl, **blocks, **case.options)  # noqa
    got = _fwd_bwd(fn, qkv, do)
    assert got[0].shape == (case.B, case.Lq, case.Hq, case.D)
    _check_against_reference(case, got)


def test_pallas_split_masked_tiles():
    """The compiled kernels' loop split (mask only on partly hidden tiles), run in the interpreter."""
    from jaxlab.kernels.flash_pallas import flash_attention
    case = CASES[0]
    qkv, do, seg = _inputs(case)
    args = check_attention_args(*qkv, segment_ids=seg, scale=None, impl="pallas", **case.options)
    got = _fwd_bwd(lambda q, k, v: flash_attention(q, k, v, args, block_q=32, block_k=16, interpret=True,
                                                   split_masked=True), qkv, do)
    _check_against_reference(case, got)


@pytest.mark.parametrize("impl", ["xla", "blockwise", "pallas"])
def test_causality_by_gradients(impl):
    """d out[i] / d (q, k, v)[j] is non-zero exactly where query i sees key j (bottom-right causal)."""
    B, Lq, Lk, H, D = 1, 20, 36, 2, 16
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, H, D), np.float32)) for L in (Lq, Lk, Lk))
    fn = lambda q, k, v: dot_product_attention(q, k, v, causal=True, window=10, impl=impl,  # noqa: E731
                                               block_q=16, block_k=16)
    grads = _compile(lambda ct: jax.vjp(fn, q, k, v)[1](ct), q)  # one compile; the cotangent picks the row
    per_row = [grads(jnp.asarray(np.eye(Lq, dtype=np.float32)[i][None, :, None, None] * np.ones((B, Lq, H, D),
                                                                                              np.float32)))
               for i in range(Lq)]
    dq, dk, dv = (np.stack([np.abs(np.asarray(g[n])).sum(axis=(0, 2, 3)) for g in per_row]) for n in range(3))
    i, j = np.arange(Lq)[:, None], np.arange(Lk)[None, :]
    p = i + Lk - Lq
    visible = (j <= p) & (j >= p - 9)
    np.testing.assert_array_equal(dk > 0, visible)
    np.testing.assert_array_equal(dv > 0, visible)
    np.testing.assert_array_equal(dq > 0, np.eye(Lq, dtype=bool))  # row i depends on query i only


@functools.partial(jax.jit, static_argnames=("causal", "window"))
def _impls_and_reference(q, k, v, *, causal, window):
    kw = dict(causal=causal, window=window)
    return (attention_reference(q, k, v, **kw),
            {impl: dot_product_attention(q, k, v, impl=impl, block_q=16, block_k=16, **kw) for impl in (X, BW)})


@settings(max_examples=5, deadline=None)
@given(Lq=st.integers(1, 40), Lk=st.integers(1, 40), Hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
       causal=st.booleans(), window=st.sampled_from([None, 1, 6]), seed=st.integers(0, 99))
def test_impls_agree_for_sampled_shapes(Lq, Lk, Hkv, group, causal, window, seed):
    """Shape fuzzing: xla and blockwise (partial tiles, GQA/MQA, Lq != Lk, empty rows) equal the reference."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((1, Lq, Hkv * group, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, Lk, Hkv, 8)), jnp.float32) for _ in range(2))
    ref, outs = _impls_and_reference(q, k, v, causal=causal, window=window)
    for impl, out in outs.items():
        assert out.shape == q.shape
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("causal,band,Lq,Lk", [
    (False, None, 200, 200), (True, None, 200, 200), (True, None, 17, 200), (True, None, 200, 17),
    (False, (5, 9), 100, 150), (True, (40, 3), 150, 100), (False, (0, 0), 64, 64), (True, (0, 100), 50, 50),
])
def test_block_ranges_are_sound(causal, band, Lq, Lk):
    """Skipped tiles hide every pair, 'full' tiles show every pair (padding rows included)."""
    spec = MaskSpec(Lq, Lk, causal, band)
    for bq, bk in ((16, 32), (32, 16), (64, 64)):
        nq, nk = -(-Lq // bq), -(-Lk // bk)
        vis = spec.visible(np.arange(nq * bq)[:, None], np.arange(nk * bk)[None, :])
        vis = np.broadcast_to(vis, (nq * bq, nk * bk))
        tiles = vis.reshape(nq, bq, nk, bk)
        any_vis, all_vis = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))  # [nq, nk]
        kv = np.array([[int(x) for x in spec.kv_blocks(i * bq, bq, bk, nk, segments=False)] for i in range(nq)])
        qb = np.array([[int(x) for x in spec.q_blocks(j * bk, bk, bq, nq, segments=False)] for j in range(nk)])
        for ranges, any_t, all_t in ((kv, any_vis, all_vis), (qb, any_vis.T, all_vis.T)):
            lo, full_lo, full_hi, hi = ranges.T
            assert np.all((lo <= full_lo) & (full_lo <= full_hi) & (full_hi <= hi))
            idx = np.arange(any_t.shape[1])[None, :]
            outside = (idx < lo[:, None]) | (idx >= hi[:, None])
            assert not np.any(any_t & outside), "a skipped tile holds a visible pair"
            full = (idx >= full_lo[:, None]) & (idx < full_hi[:, None])
            assert np.all(all_t[full]), "a tile run without mask hides a pair"


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))), "multiple of key/value heads"),
    (dict(k=jnp.zeros((2, 8, 2, 8)), v=jnp.zeros((2, 8, 2, 8))), "head dim"),
    (dict(v=jnp.zeros((2, 9, 2, 16))), "same shape"),
    (dict(q=jnp.zeros((2, 8, 16))), "4-D"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), "segment_ids"),
    (dict(segment_ids=jnp.zeros((2, 8))), "integers"),
    (dict(segment_ids=(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 9), jnp.int32))), "segment_ids"),
    (dict(window=0), "window"),
    (dict(window=(4, 0)), "window"),
    (dict(window=2.5), "window"),
    (dict(softcap=0.0), "softcap"),
    (dict(scale=float("nan")), "scale"),
    (dict(impl="flash"), "impl"),
    (dict(impl="cudnn"), "impl='cudnn'"),
    (dict(impl="pallas", block_q=24), "block_q"),
    (dict(impl="pallas", interpret=False), "interpret"),
    (dict(impl="blockwise", block_k=0), "block_k"),
])
def test_bad_arguments_raise(kwargs, match):
    args = dict(q=jnp.zeros((2, 8, 4, 16)), k=jnp.zeros((2, 8, 2, 16)), v=jnp.zeros((2, 8, 2, 16)))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, v, **args)


def test_self_segment_ids_need_equal_lengths():
    q, kv = jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 6, 2, 8))
    with pytest.raises(ValueError, match="pair"):
        attention_reference(q, kv, kv, segment_ids=jnp.zeros((1, 4), jnp.int32))


def test_auto_dispatch_on_cpu(monkeypatch):
    """Off GPU, auto runs the dense "xla" path while the scores fit AUTO_DENSE_SCORE_BYTES and the tiled
    "blockwise" path beyond: checked on the implementation actually called, against the reference."""
    import jaxlab.kernels.attention as attention

    if jax.default_backend() == "gpu":
        pytest.skip("the dense/tiled policy is the one off GPU")
    small, big = jnp.zeros((1, 128, 4, 64)), jax.ShapeDtypeStruct((4, 8192, 16, 64), jnp.float32)
    args = check_attention_args(small, small, small, causal=False, segment_ids=None, window=None, softcap=None,
                                scale=None, impl="auto")
    assert select_impl(small, small, args) == "xla"
    big_args = dataclasses.replace(args, mask=MaskSpec(8192, 8192))
    assert select_impl(big, big, big_args) == "blockwise"

    called = []
    dense, tiled = attention._dense_attention, attention.blockwise_attention
    monkeypatch.setattr(attention, "_dense_attention", lambda *a, compute_dtype=None: (
        called.append("reference" if compute_dtype is not None else "xla"), dense(*a, compute_dtype=compute_dtype))[1])
    monkeypatch.setattr(attention, "blockwise_attention", lambda *a, **kw: (called.append("blockwise"),
                                                                             tiled(*a, **kw))[1])
    # scores of the [1, 40, 4, 16] call (4 B * 4 heads * 40 * 40) fit, those of [1, 48, 4, 16] do not
    monkeypatch.setattr(attention, "AUTO_DENSE_SCORE_BYTES", 4 * 4 * 40 * 40)
    rng = np.random.default_rng(2)
    for L, expected in ((40, "xla"), (48, "blockwise")):
        q = jnp.asarray(rng.standard_normal((1, L, 4, 16)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((1, L, 2, 16)), jnp.float32) for _ in range(2))  # GQA
        called.clear()
        out = dot_product_attention(q, k, v, causal=True, window=7, impl="auto", block_q=16, block_k=16)
        assert called == [expected], (L, called)
        ref = attention_reference(q, k, v, causal=True, window=7)
        assert called[-1] == "reference"
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=expected)


def test_auto_tile_size_off_gpu(monkeypatch):
    """auto's tiled pass off GPU uses tiles whose [B, H, b, b] scores are closest to AUTO_TILE_SCORE_BYTES,
    one tile for a length of at most two, and the tiles given explicitly when there are."""
    import jaxlab.kernels.attention as attention

    if jax.default_backend() == "gpu":
        pytest.skip("the tile policy is the one off GPU")
    assert attention.AUTO_TILE_SCORE_BYTES == 2**20
    assert auto_tile(16, 4, 256) == 64  # 1 MiB / (4 B * 64 rows of heads) = 64^2
    assert auto_tile(16, 4, 128) == 128  # two tiles of 64 -> one tile
    assert auto_tile(8, 6, 512) == 64  # edge 74 -> 64
    assert auto_tile(4, 4, 1024) == 128
    assert auto_tile(1, 1, 4096) == 256  # edge 512, capped
    blocks = []
    tiled = attention.blockwise_attention
    monkeypatch.setattr(attention, "blockwise_attention", lambda *a, block_q, block_k: (
        blocks.append((block_q, block_k)), tiled(*a, block_q=block_q, block_k=block_k))[1])
    monkeypatch.setattr(attention, "AUTO_DENSE_SCORE_BYTES", 0)
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((16, 200, 4, 8)), jnp.float32) for _ in range(3))
    out = dot_product_attention(q, k, v, causal=True, impl="auto")
    assert blocks == [(64, 64)]
    np.testing.assert_allclose(out, attention_reference(q, k, v, causal=True), rtol=1e-5, atol=1e-5)
    dot_product_attention(q, k, v, causal=True, impl="auto", block_q=32)
    assert blocks[-1] == (32, 64)


@pytest.mark.parametrize("kwargs,reason", [
    (dict(), None),
    (dict(causal=True, window=65), None),
    (dict(window=1), None),  # the query's own key only: a band with no right side, cuDNN's sliding window
    (dict(dtype=jnp.float32), "dtype"),
    (dict(D=60), "head dim"),
    (dict(softcap=30.0), "softcap"),
    (dict(segment_ids=True), "segment_ids"),
    (dict(causal=True, Lq=64), "causal"),
    (dict(window=9), "window"),
])
def test_cudnn_declines_what_it_cannot_match(monkeypatch, kwargs, reason):
    """With a GPU backend, 'auto' takes cuDNN only where its masks mean what ours mean, else Pallas."""
    import jaxlab.kernels.attention as attention

    monkeypatch.setattr(attention, "_backend", lambda: "gpu")
    kwargs = dict(kwargs)
    dtype, D, Lq = kwargs.pop("dtype", jnp.bfloat16), kwargs.pop("D", 64), kwargs.pop("Lq", 128)
    q, kv = jnp.zeros((2, Lq, 4, D), dtype), jnp.zeros((2, 128, 2, D), dtype)
    if kwargs.pop("segment_ids", False):
        kwargs["segment_ids"] = jnp.zeros((2, 128), jnp.int32)
    args = check_attention_args(q, kv, kv, **{"causal": False, "window": None, "softcap": None, "segment_ids": None,
                                              "scale": None, **kwargs}, impl="cudnn")
    why = attention.cudnn_unsupported(q, args)
    if reason is None:
        assert why is None and select_impl(q, kv, args) == "cudnn"
    else:
        assert reason in why and select_impl(q, kv, args) == "pallas"
        with pytest.raises(ValueError, match=f"impl='cudnn' does not support .*{reason}"):
            dot_product_attention(q, kv, kv, impl="cudnn", **kwargs)


def test_flash_attention_experiment_smoke(tmp_path):
    # The registered function itself: the registry's lookup would import every experiment module.
    from jaxlab.context import RunContext
    from jaxlab.experiments.flash_attention import FlashAttentionConfig, flash_attention
    from jaxlab.registry import Claim

    cfg = FlashAttentionConfig(seq_lens=(128,), memory_lens=(512,), batch=1, heads=2, head_dim=16, repeats=1)
    result = flash_attention(cfg, RunContext("flash-attention", tmp_path, quick=True, show_progress=False))
    rows = {(r["impl"], r["seq_len"]): r for r in result.metrics["rows"]}
    assert set(rows) == {(i, L) for i in ("xla", "blockwise") for L in (128, 512)}
    assert rows[("xla", 128)]["fwd_bwd_ms"] > 0 and rows[("xla", 512)]["fwd_bwd_ms"] is None  # 512: compiled only
    growth = result.metrics["memory_growth_exponent"]
    assert growth["xla"] > 1.5 > growth["blockwise"], growth  # quadratic vs linear memory
    assert result.metrics["memory_saving"][512] > 1
    assert (tmp_path / "flash-attention.png").exists() and result.summary
    assert result.claims and all(isinstance(c, Claim) for c in result.claims)


def test_pallas_lowers_to_triton_for_cuda(monkeypatch):
    """Cross-platform lowering on CPU: the kernels (fwd, dQ, dK/dV) pass Pallas' Triton lowering."""
    import jaxlab.kernels.flash_pallas as flash_pallas

    monkeypatch.setattr(flash_pallas, "_backend", lambda: "gpu")  # lower as if compiling for a GPU
    B, Lq, Lk, Hq, Hkv, D = 1, 80, 100, 4, 2, 72
    q = jax.ShapeDtypeStruct((B, Lq, Hq, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, Lk, Hkv, D), jnp.bfloat16)
    ids = (jax.ShapeDtypeStruct((B, Lq), jnp.int32), jax.ShapeDtypeStruct((B, Lk), jnp.int32))

    def loss(q, k, v, q_ids, kv_ids):
        out = dot_product_attention(q, k, v, causal=True, window=33, softcap=30.0, segment_ids=(q_ids, kv_ids),
                                    impl="pallas", interpret=False)
        return out.astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, *ids).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3, "expected the forward, dQ and dK/dV Triton kernels"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas", "cudnn", "auto"])
def test_compiled_on_gpu(impl):
    case = Case(2, 1024, 1024, 8, 2, 128, causal=True, dtype="bfloat16")
    qkv, do, _ = _inputs(case)
    got = _fwd_bwd(lambda q, k, v: dot_product_attention(q, k, v, causal=True, impl=impl), qkv, do)
    ref = _fwd_bwd(lambda q, k, v: attention_reference(q, k, v, causal=True), _upcast(qkv), _upcast([do])[0])
    args = check_attention_args(*qkv, causal=True, segment_ids=None, window=None, softcap=None, scale=None, impl="x")
    naive = _fwd_bwd(lambda q, k, v: _dense_attention(q, k, v, args, compute_dtype=jnp.bfloat16), qkv, do)
    for g, r, n in zip(got, ref, naive):
        assert _max_err(g, r) <= 2 * _max_err(n, r) + 1e-4 * np.max(np.abs(r))
