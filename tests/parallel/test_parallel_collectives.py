"""ring_allreduce against lax.psum, and the HLO collective accounting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxlab.parallel import make_mesh, ring_allreduce
from jaxlab.parallel.collectives import (
    CollectiveOp,
    count_collectives,
    hlo_collectives,
    jaxpr_collectives,
    ring_allreduce_reference,
    zero_comm_bytes,
)


@pytest.mark.parametrize("n", [8, 3])
def test_ring_allreduce_equals_psum(n):
    """A pytree whose sizes are not multiples of n (13 and 5x3 entries per device)."""
    mesh = make_mesh(data=n)
    rng = np.random.default_rng(n)
    tree = {"a": rng.normal(size=(n * 13,)).astype(np.float32),
            "b": rng.normal(size=(n * 5, 3)).astype(np.float32)}

    def both(t):
        return ring_allreduce(t, "data"), ring_allreduce_reference(t, "data")

    ring, ref = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                                      check_vma=False))(tree)
    for name in tree:
        np.testing.assert_allclose(np.asarray(ring[name]), np.asarray(ref[name]), rtol=1e-6, atol=1e-6)
        per_device = tree[name].reshape(n, -1, *tree[name].shape[1:])
        expected = np.broadcast_to(per_device.sum(0), per_device.shape).reshape(tree[name].shape)
        np.testing.assert_allclose(np.asarray(ring[name]), expected, rtol=1e-5, atol=1e-5)


def test_ring_allreduce_uses_only_ppermute():
    mesh = make_mesh(data=4)
    f = jax.jit(jax.shard_map(lambda x: ring_allreduce(x, "data"), mesh=mesh, in_specs=P("data"),
                              out_specs=P("data"), check_vma=False))
    x = jnp.ones((4 * 8,))
    counts = count_collectives(f.lower(x).compile().as_text())
    assert counts["collective-permute"] == 2 * (4 - 1)
    assert counts["all-reduce"] == counts["all-gather"] == counts["reduce-scatter"] == 0
    np.testing.assert_array_equal(np.asarray(f(x)), 4.0)


def test_jaxpr_collectives_counts_loop_iterations():
    """As written, the ring is two 3-step loops of ppermute (a scan body counts per iteration)."""
    mesh = make_mesh(data=4)
    f = jax.shard_map(lambda x: (ring_allreduce(x, "data"), lax.psum(x, "data")), mesh=mesh,
                      in_specs=P("data"), out_specs=P("data"), check_vma=False)
    ops = jaxpr_collectives(jax.make_jaxpr(f)(jnp.ones((4 * 8,))), dict(mesh.shape))
    assert ops.count(CollectiveOp("collective-permute", 8, 4)) == 2 * 3  # 2-float chunks
    assert ops[-1] == CollectiveOp("all-reduce", 32, 4)


def test_ring_allreduce_single_device_is_identity():
    mesh = make_mesh(data=1)
    x = jnp.arange(5.0)
    out = jax.shard_map(lambda v: ring_allreduce(v, "data"), mesh=mesh, in_specs=P(),
                        out_specs=P(), check_vma=False)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_hlo_collectives_parses_replica_group_formats():
    hlo = "\n".join([
        "%ar = (f32[32]{0}, f32[]) all-reduce(%a, %b), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%sum",
        "%ag = f32[16,32]{0,1} all-gather(%c), channel_id=2, replica_groups=[2,4]<=[8], dimensions={1}",
        "%rs = bf16[4,8]{1,0} reduce-scatter(%d), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}",
        "%ags = (f32[4]{0}, f32[32]{0}) all-gather-start(%e), replica_groups={{0,1,2,3,4,5,6,7}}",
        "%agd = f32[32]{0} all-gather-done(%ags)",
        "%cp = f32[10]{0} collective-permute(%f), source_target_pairs={{0,1},{1,0}}",
        "%add = f32[10]{0} add(%x, %y)",
    ])
    ops = hlo_collectives(hlo, default_group_size=2)
    assert ops == [CollectiveOp("all-reduce", 132, 4), CollectiveOp("all-gather", 2048, 4),
                   CollectiveOp("reduce-scatter", 64, 4), CollectiveOp("all-gather", 128, 8),
                   CollectiveOp("collective-permute", 40, 2)]
    assert ops[0].sent_bytes == pytest.approx(2 * 3 / 4 * 132)
    assert ops[1].sent_bytes == pytest.approx(3 / 4 * 2048)
    assert ops[2].sent_bytes == pytest.approx(3 * 64)  # (n-1)/n of the n * 64-byte input
    assert count_collectives(hlo) == {"all-reduce": 1, "reduce-scatter": 1, "all-gather": 2,
                                      "all-to-all": 0, "collective-permute": 1}


def test_psum_compiles_to_all_reduce():
    mesh = make_mesh(data=8)
    f = jax.jit(jax.shard_map(lambda x: lax.psum(x, "data"), mesh=mesh, in_specs=P("data"),
                              out_specs=P()))
    (op,) = hlo_collectives(f.lower(jnp.ones((8 * 16,))).compile().as_text())
    assert op == CollectiveOp("all-reduce", 64, 8)


def test_hlo_collectives_counts_loop_iterations():
    """A psum inside a scan of 3 steps is one op in the text and 3 executions."""
    mesh = make_mesh(data=8)

    def body(c, x):  # c, x [16]
        return c + lax.psum(jnp.sin(c * x), "data"), None

    def f(c, xs):  # xs [3, 16]
        return lax.scan(body, c, xs)[0]

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False))
    hlo = g.lower(jnp.ones(16), jnp.ones((3, 16))).compile().as_text()
    assert " while(" in hlo and '"known_trip_count":{"n":"3"}' in hlo
    assert count_collectives(hlo)["all-reduce"] == 1
    assert hlo_collectives(hlo) == [CollectiveOp("all-reduce", 64, 8)] * 3


def test_zero_comm_bytes():
    """ZeRO paper Sec. 7: DP and ZeRO-1/2 move 2 Psi per device, ZeRO-3 3 Psi (1.5x)."""
    psi = 1e9
    dp, z1, z2, z3 = (zero_comm_bytes(psi, 64, s, grad_bytes=2) for s in range(4))
    assert dp == z1 == z2 == pytest.approx(2 * 63 / 64 * psi * 2)
    assert z3 / dp == pytest.approx(1.5)
    with pytest.raises(ValueError, match="stage=5"):
        zero_comm_bytes(psi, 8, 5)
