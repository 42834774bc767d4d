"""MoE: dropless grouped dispatch equals the dense reference (outputs and gradients, even when the
routing is badly skewed), routing, load-balancing and z losses, the parameters' logical axis names.
The expert-parallel dispatch is tested in tests/parallel/test_expert_parallel.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlab.models.moe import MoE, expert_load, load_balance_loss, route, router_z_loss
from jaxlab.xla_options import FAST_COMPILE

E, K, F, D = 6, 2, 8, 16


def test_ragged_dispatch_equals_dense_reference(key):
    """Same parameters through both dispatches: equal outputs, input and parameter gradients. The
    router is biased so that two experts receive most tokens and some receive none (no capacity:
    nothing may be dropped). Dispatch does not depend on the gate (``route`` is tested below)."""
    gate = "sigmoid"
    x = jax.random.normal(key, (2, 9, D)) + 0.5  # T = 18 tokens, awkward length
    make = lambda dispatch: MoE(E, K, F, num_shared_experts=1, gate=gate, dispatch=dispatch)  # noqa: E731
    params = nn.unbox(jax.jit(make("ragged").init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(1), x)["params"])
    skew = jnp.zeros((D, E)).at[:, :2].set(1.0)  # tokens with positive channel sums favour experts 0, 1
    params = {**params, "router": params["router"] + skew}

    def run(params, x):
        outs = []
        for dispatch in ("ragged", "dense"):
            f = lambda p, x: make(dispatch).apply({"params": p}, x)  # noqa: E731,B023
            (y, aux) = f(params, x)
            grads = jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x)[0])), argnums=(0, 1))(params, x)  # noqa: B023
            outs.append((y, aux, grads))
        return outs

    (y_r, aux_r, g_r), (y_d, aux_d, g_d) = jax.jit(run, compiler_options=FAST_COMPILE)(params, x)
    np.testing.assert_allclose(y_r, y_d, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_r, g_d)
    load = np.asarray(aux_r["expert_load"])
    np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-6)
    assert load[:2].sum() > 0.6 and load.min() < 1 / E, load  # skewed: dropless must still be exact
    assert float(aux_r["load_balance_loss"]) > 1.0  # imbalance is penalised
    for name in aux_r:
        np.testing.assert_allclose(aux_r[name], aux_d[name], rtol=1e-6)


def test_route_picks_top_experts_and_gate_normalisation():
    logits = jnp.array([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 2.5]])
    routes = jax.jit(lambda x: (route(x, 2, "softmax"), route(x, 2, "softmax", normalize_gates=False),
                                route(x, 2, "sigmoid")), compiler_options=FAST_COMPILE)(logits)
    (w, e, p), (w_un, _, _), (w_s, e_s, p_s) = routes
    np.testing.assert_array_equal(e, [[1, 2], [0, 3]])
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    logits = np.asarray(logits)
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(p, softmax, rtol=1e-6)
    np.testing.assert_allclose(w_un, np.take_along_axis(softmax, np.asarray(e), axis=1), rtol=1e-6)
    np.testing.assert_array_equal(e_s, e)
    chosen = np.take_along_axis(1 / (1 + np.exp(-logits)), np.asarray(e), 1)
    np.testing.assert_allclose(w_s, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(p_s.sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="gate='relu'"):
        route(jnp.zeros((2, 4)), 2, "relu")


def _balancing_values(T=48, n=4):
    def lb(logits):
        _, e, p = route(logits, 1)
        return load_balance_loss(p, e, n), expert_load(e, n)

    uniform = jnp.zeros((T, n))
    balanced = 20.0 * jax.nn.one_hot(jnp.arange(T) % n, n)  # confident, but each expert gets T/n tokens
    collapsed = 20.0 * jax.nn.one_hot(jnp.zeros(T, jnp.int32), n)
    # a growing share of tokens collapses onto expert 0
    partial = [20.0 * jax.nn.one_hot(jnp.where(jnp.arange(T) < f * T, 0, jnp.arange(T) % n), n)
               for f in (0.25, 0.5, 0.75)]
    return {"uniform": lb(uniform)[0], "balanced": lb(balanced), "collapsed": lb(collapsed)[0],
            "partial": jnp.stack([lb(a)[0] for a in partial]),
            "z_uniform": router_z_loss(uniform), "z_collapsed": router_z_loss(collapsed)}


def test_balancing_loss_is_minimal_for_uniform_routing():
    """E * sum_e f_e P_e: exactly 1 for a uniform router and for a router spreading tokens evenly,
    E when every token goes to one expert, in between for partial collapse; z-loss = log(E)^2 at 0."""
    n = 4
    v = jax.jit(_balancing_values, static_argnums=(0, 1), compiler_options=FAST_COMPILE)(48, n)
    np.testing.assert_allclose(v["uniform"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(v["balanced"][1], 1 / n, rtol=1e-6)
    np.testing.assert_allclose(v["balanced"][0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(v["collapsed"], n, rtol=1e-6)
    losses = v["partial"].tolist()
    assert 1.0 < losses[0] < losses[1] < losses[2] < n, losses
    np.testing.assert_allclose(v["z_uniform"], np.log(n) ** 2, rtol=1e-6)
    assert float(v["z_collapsed"]) > float(v["z_uniform"])


def test_parameters_carry_logical_axis_names():
    """Routed experts split on ``experts``, the router replicated, the shared experts as the dense FFN."""
    boxed = jax.eval_shape(MoE(E, K, F, num_shared_experts=1).init, jax.random.PRNGKey(0), jnp.zeros((1, 3, D)))
    specs = nn.get_partition_spec(boxed)["params"]
    assert specs["router"] == P("embed", None)
    assert specs["w_gate"] == specs["w_up"] == P("experts", "embed", "mlp")
    assert specs["w_down"] == P("experts", "mlp", "embed")
    assert specs["shared"]["gate"]["kernel"] == P("embed", "mlp")
    assert specs["shared"]["down"]["kernel"] == P("mlp", "embed")
    shapes = nn.unbox(boxed)["params"]
    assert shapes["w_gate"].shape == (E, D, F) and shapes["w_down"].shape == (E, F, D)


def test_moe_module_errors():
    x = jnp.zeros((1, 3, D))
    with pytest.raises(ValueError, match="experts_per_token=7"):
        MoE(E, 7, F).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="dispatch='sorted'"):
        MoE(E, K, F, dispatch="sorted").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="capacity_factor=-1"):
        MoE(E, K, F, capacity_factor=-1.0).init(jax.random.PRNGKey(0), x)
