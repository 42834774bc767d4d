"""Ring attention (context parallelism over a ``seq`` mesh axis) against exact attention on the unsplit
arrays: outputs and gradients for causal, non-causal, windowed and packed (documents crossing device
boundaries) inputs with GQA on rings of 2, 4 and 8 devices and on data x seq (x model) meshes; the
compiled program communicates by collective-permutes only; bad input fails before tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxlab.kernels.ring_attention import context_parallel_attention, ring_attention, ring_attention_reference
from jaxlab.parallel.collectives import count_collectives
from jaxlab.xla_options import FAST_COMPILE

B, H, HKV = 2, 4, 2
# (causal, packed, window): one program holds every case of a ring size
CASES = ((True, True, None), (False, True, None), (True, False, None), (True, True, 10))


def _mesh(**axes):
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def _inputs(L, D):
    kq, kk, kv, ko = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(kq, (B, L, H, D))
    k = jax.random.normal(kk, (B, L, HKV, D))
    v = jax.random.normal(kv, (B, L, HKV, D))
    d_out = jax.random.normal(ko, (B, L, H, D))
    # documents of lengths that are not multiples of any block L/n, so they cross device boundaries
    lengths = ([L // 3 + 1, L // 2, L - L // 3 - 1 - L // 2], [L // 4 + 3, L - L // 4 - 3])
    ids = jnp.asarray(np.stack([np.repeat(np.arange(len(n)) * 3 + 1, n) for n in lengths]), jnp.int32)
    return q, k, v, d_out, ids


def _outputs_and_grads(attn, cases, ids, d_out):
    """Every case's output and (dq, dk, dv) for the cotangent ``d_out``, in one jitted program."""

    def run(q, k, v):
        results = []
        for causal, packed, window in cases:
            f = lambda q, k, v: attn(q, k, v, causal=causal, segment_ids=ids if packed else None,  # noqa: E731,B023
                                     window=window)  # noqa: B023
            out, vjp = jax.vjp(f, q, k, v)
            results.append((out, vjp(d_out)))
        return results

    return jax.jit(run, compiler_options=FAST_COMPILE)


def _assert_close(got, want, cases):
    for case, (out, grads), (out_ref, grads_ref) in zip(cases, got, want, strict=True):
        np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5, err_msg=f"output {case}")
        for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
            np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5, err_msg=f"d{name} {case}")


@pytest.mark.parametrize(("ring", "L", "D"), [(2, 48, 12), (4, 48, 8), (8, 32, 8)])
def test_ring_attention_equals_exact_attention(ring, L, D):
    q, k, v, d_out, ids = _inputs(L, D)
    mesh = _mesh(seq=ring)
    cases = CASES if ring == 4 else CASES[:3]
    got = _outputs_and_grads(lambda *a, **kw: context_parallel_attention(*a, mesh, **kw), cases, ids, d_out)(q, k, v)
    want = _outputs_and_grads(ring_attention_reference, cases, ids, d_out)(q, k, v)
    _assert_close(got, want, cases)


def test_context_parallel_on_data_seq_meshes_communicates_by_permutes():
    L, D = 32, 8
    q, k, v, d_out, ids = _inputs(L, D)
    cases = CASES[:1]  # causal, packed
    want = _outputs_and_grads(ring_attention_reference, cases, ids, d_out)(q, k, v)
    for axes in ({"data": 2, "seq": 4}, {"data": 2, "seq": 2, "model": 2}):
        mesh = _mesh(**axes)
        attn = lambda *a, **kw: context_parallel_attention(*a, mesh, **kw)  # noqa: E731,B023
        compiled = _outputs_and_grads(attn, cases, ids, d_out).lower(q, k, v).compile()
        _assert_close(compiled(q, k, v), want, cases)
        counts = count_collectives(compiled.as_text())
        assert counts["collective-permute"] > 0, (axes, counts)
        # K/V travel around the ring: never gathered, no reduction of the gradients either
        assert counts["all-gather"] == counts["all-reduce"] == counts["all-to-all"] == 0, (axes, counts)


def test_bad_input_is_rejected_before_tracing():
    q, k = np.ones((B, 12, H, 8), np.float32), np.ones((B, 12, HKV, 8), np.float32)
    v = k
    ids = np.zeros((B, 12), np.int32)
    with pytest.raises(ValueError, match=r"L=12 must be a multiple of the 'seq' axis size 8"):
        context_parallel_attention(q, k, v, _mesh(seq=8))
    with pytest.raises(ValueError, match=r"no axis seq_axis='seq'.*'data': 8"):
        context_parallel_attention(q, k, v, _mesh(data=8))
    with pytest.raises(ValueError, match=r"segment_ids \(q ids\) must have shape \(2, 12\)"):
        context_parallel_attention(q, k, v, _mesh(seq=4), segment_ids=ids[:, :8])
    with pytest.raises(ValueError, match=r"q and k need one length L"):
        context_parallel_attention(q, k[:, :8], v[:, :8], _mesh(seq=4))
    with pytest.raises(ValueError, match=r"head count Hq=4 must be a multiple of key/value heads Hkv=3"):
        context_parallel_attention(q, np.ones((B, 12, 3, 8), np.float32), np.ones((B, 12, 3, 8), np.float32),
                                   _mesh(seq=4))
    with pytest.raises(ValueError, match=r"inside jax.shard_map over a mesh with axis 'seq'"):
        ring_attention(q, k, v, axis_name="seq")
    with pytest.raises(ValueError, match=r"axis_name must be the name"):
        ring_attention(q, k, v, axis_name=("data", "seq"))
    with pytest.raises(ValueError, match=r"must hold the same positions"):
        ring_attention(q, k[:, :8], v[:, :8], axis_name="seq")
