"""Expert-parallel MoE (all_to_all dispatch over the ``expert`` mesh axis) against the single-device dense
reference: outputs and gradients for top-1 and top-2 routing with shared experts, skewed routing at the
dropless buffer's edge, capacity drops counted exactly, and the configuration errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlab.models.moe import MoE, expert_parallel_size, moe_dense_reference, moe_expert_parallel, route
from jaxlab.parallel.collectives import count_collectives
from jaxlab.xla_options import FAST_COMPILE

E, F, D = 8, 8, 16
B, L = 4, 6  # T = 24 tokens: 6 per device on expert=4, 3 on data=2 x expert=4
# (experts per token, router skew onto expert 0): top-1 where expert 0 takes nearly every token, so
# some device sends all its assignments to device 0 (the dropless buffer full), and unskewed top-2
ROUTINGS = ((1, 1.0), (2, 0.0))


def _mesh(**axes):
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def _inputs():
    x = jax.random.normal(jax.random.PRNGKey(0), (B, L, D)) + 0.5
    params = nn.unbox(MoE(E, 1, F, num_shared_experts=1).init(jax.random.PRNGKey(1), x)["params"])
    return x, params


def _skewed(params, skew):
    return {**params, "router": params["router"].at[:, 0].add(skew)}  # positive channel sums favour expert 0


def _outputs_and_grads(dispatch):
    """Every routing's output, aux and gradients (inputs, every parameter) in one program."""

    def run(params, x):
        outs = []
        for k, skew in ROUTINGS:
            moe = MoE(E, k, F, num_shared_experts=1, dispatch=dispatch)
            f = lambda p, x: moe.apply({"params": p}, x)  # noqa: E731,B023
            loss = lambda p, x: jnp.sum(jnp.sin(f(p, x)[0]))  # noqa: E731,B023
            p = _skewed(params, skew)
            outs.append((f(p, x), jax.grad(loss, argnums=(0, 1))(p, x)))
        return outs

    return jax.jit(run, compiler_options=FAST_COMPILE)


def _destinations(experts, shards, n):
    """[shards, n]: assignments each token shard sends to each expert device (E / n experts each)."""
    dest = np.asarray(experts).reshape(shards, -1) // (E // n)
    return np.stack([np.bincount(row, minlength=n) for row in dest])


def test_expert_parallel_equals_dense_reference():
    x, params = _inputs()
    ref = _outputs_and_grads("dense")(params, x)  # no mesh: one device's view
    k, skew = ROUTINGS[0]
    _, experts, _ = route(x.reshape(-1, D) @ _skewed(params, skew)["router"], k)
    sent = _destinations(experts, 4, 4)
    assert sent[:, 0].max() == (B * L // 4) * k, sent  # a device fills its whole dropless buffer
    for axes in ({"expert": 4}, {"data": 2, "expert": 4}):
        with jax.set_mesh(_mesh(**axes)):
            assert expert_parallel_size() == 4
            compiled = _outputs_and_grads("ragged").lower(params, x).compile()  # traced under the mesh
            out = compiled(params, x)
        assert count_collectives(compiled.as_text())["all-to-all"] > 0, axes
        for ((y, aux), grads), ((y_ref, aux_ref), grads_ref) in zip(out, ref, strict=True):
            np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5, err_msg=str(axes))
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4,  # noqa: B023
                                                                 err_msg=str(axes)), grads, grads_ref)
            for name in aux_ref:
                np.testing.assert_allclose(aux[name], aux_ref[name], rtol=1e-6, err_msg=name)
            assert float(aux["dropped_fraction"]) == 0.0  # dropless
    assert expert_parallel_size() == 1


def _expected_keep(experts, shards, n, capacity):
    """Per token shard and destination device, the first ``capacity`` assignments in (expert, token)
    order are kept."""
    flat = np.asarray(experts).reshape(shards, -1)
    keep = np.zeros(flat.shape, bool)
    for s, row in enumerate(flat):
        seen = np.zeros(n, int)
        for a in np.argsort(row, kind="stable"):
            dest = row[a] // (E // n)
            keep[s, a] = seen[dest] < capacity
            seen[dest] += 1
    return keep.reshape(np.shape(experts))


def test_capacity_factor_drops_and_counts_the_overflow():
    """capacity_factor=1: each device may send each device 3 of its 6 tokens x 2 experts, the balanced
    share, so the routing's imbalance overflows: the output equals the reference without the dropped
    assignments, and the dropped count is exact."""
    x, params = _inputs()
    k, n = 2, 4
    tokens = x.reshape(-1, D)
    weights, experts, _ = route(tokens @ params["router"], k)
    keep = _expected_keep(experts, n, n, capacity=3)
    assert 0 < (~keep).sum() < keep.size // 2, keep
    experts_params = (params["w_gate"], params["w_up"], params["w_down"])

    def both(tokens, weights):
        y, dropped = moe_expert_parallel(tokens, weights, experts, *experts_params, jax.sharding.get_abstract_mesh(),
                                         capacity_factor=1.0)
        return y, dropped, moe_dense_reference(tokens, weights * keep, experts, *experts_params)

    with jax.set_mesh(_mesh(expert=n)):
        y, dropped, y_ref = jax.jit(both, compiler_options=FAST_COMPILE)(tokens, weights)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    assert int(dropped) == (~keep).sum()


def test_batch_split_over_data_and_expert_needs_only_the_all_to_alls():
    """The layout without resharding: the batch split over (data, expert), experts over expert. The
    forward's collectives are the three all_to_all (tokens and expert ids out, results back); routing
    stays local (``jax.lax.top_k`` would all-gather the router scores of every token)."""
    x, params = _inputs()
    x = jnp.concatenate([x, x])  # B = 8: one row per device
    mesh = _mesh(data=2, expert=4)
    rows = NamedSharding(mesh, P(("data", "expert")))
    shardings = {name: NamedSharding(mesh, P("expert") if name.startswith("w_") else P()) for name in params}
    moe = MoE(E, 2, F, num_shared_experts=1)
    forward = jax.jit(lambda p, x: moe.apply({"params": p}, x), in_shardings=(shardings, rows),
                      out_shardings=(rows, NamedSharding(mesh, P())), compiler_options=FAST_COMPILE)
    with jax.set_mesh(mesh):
        counts = count_collectives(forward.lower(params, x).compile().as_text())
    assert counts["all-to-all"] == 3 and counts["all-gather"] == 0, counts


def test_expert_parallel_errors():
    """Bad configurations fail at trace time (no compile), naming the values."""
    x = jnp.zeros((B, L, D))
    init = lambda moe, x=x: jax.eval_shape(moe.init, jax.random.PRNGKey(0), x)  # noqa: E731
    with jax.set_mesh(_mesh(expert=4)):
        with pytest.raises(ValueError, match="num_experts=6 is not divisible by the mesh's 'expert' axis size 4"):
            init(MoE(6, 2, F))
        with pytest.raises(ValueError, match="22 tokens"):
            init(MoE(E, 2, F), jnp.zeros((2, 11, D)))
        with pytest.raises(ValueError, match="capacity_factor=0"):
            init(MoE(E, 2, F, capacity_factor=0))
        inner = lambda x: MoE(E, 2, F).init(jax.random.PRNGKey(0), x)  # noqa: E731
        with pytest.raises(ValueError, match="inside a shard_map manual over 'expert'"):
            jax.eval_shape(jax.shard_map(inner, in_specs=P("expert"), out_specs=P(), check_vma=False), x)
    init(MoE(6, 2, F))  # without the mesh: single-device dispatch, any expert count
