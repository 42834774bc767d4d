"""``jaxlab train lm --optimizer muon`` and ``--ffn moe --num-experts E --top-k K --shared-experts S
--moe-balance bias``: the flags reach the model and the optimizer, Muon takes the LM's hidden matrices
(not the embedding, norms or router bias), and DeepSeek-V3's balancing bias moves by sign descent against
the load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax.contrib import MuonDimensionNumbers

from jaxlab.models.lm import LM, LMConfig, init_params, param_logical_axes
from jaxlab.models.lm_training import LMTrainConfig, make_lm_optimizer, make_loss_fn
from jaxlab.models.moe import route
from jaxlab.optim import OptimizerConfig, muon_dimensions
from jaxlab.train_state import create_train_state, make_train_step


def _batch(key, B=4, L=16, V=64):
    tokens = jax.random.randint(key, (B, L + 1), 0, V)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": jnp.ones((B, L), jnp.float32)}


def test_flags_reach_the_model_and_are_validated():
    mc = LMTrainConfig(ffn="moe", num_experts=6, top_k=3, shared_experts=0, moe_balance="bias",
                       optimizer="muon").model_config()
    assert (mc.num_experts, mc.experts_per_token, mc.num_shared_experts, mc.moe_balance) == (6, 3, 0, "bias")
    assert LMTrainConfig(optimizer="muon").optimizer_config().algorithm == "muon"
    with pytest.raises(ValueError, match="experts_per_token=9"):
        LMTrainConfig(ffn="moe", num_experts=4, top_k=9)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        LMTrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="moe_balance='none'"):
        LMTrainConfig(ffn="moe", moe_balance="none")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_muon_takes_the_hidden_matrices_of_the_lm(scan_layers):
    model = LM(LMConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, ffn="moe", num_experts=4,
                        moe_balance="bias", scan_layers=scan_layers))
    dims = muon_dimensions(param_logical_axes(model))
    flat = {jax.tree_util.keystr(p): d for p, d in jax.tree_util.tree_leaves_with_path(
        dims, is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))}
    lead = 1 if scan_layers else 0  # the scanned stack's layer axis is a batch axis
    query = next(d for k, d in flat.items() if k.endswith("['query']['kernel']"))
    out = next(d for k, d in flat.items() if k.endswith("['out']['kernel']"))
    w_down = next(d for k, d in flat.items() if k.endswith("['w_down']"))
    assert query == MuonDimensionNumbers(lead, (lead + 1, lead + 2))
    assert out == MuonDimensionNumbers((lead, lead + 1), lead + 2)
    assert w_down == MuonDimensionNumbers((lead + 1,), lead + 2)  # [(layers,) experts, mlp, embed]
    for k, d in flat.items():
        if any(name in k for name in ("embedding", "scale", "router_bias")):
            assert d is None, k
    # one Muon step of the whole LM runs and moves every parameter (the router bias by sign descent)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    tx = make_lm_optimizer(OptimizerConfig(lr=1e-2, algorithm="muon", weight_decay=0.1), model)
    step = jax.jit(make_train_step(make_loss_fn(model), tx))
    state, metrics = step(create_train_state(params, tx, jax.random.PRNGKey(1)), _batch(jax.random.key(2)),
                          jax.random.key(3))
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, state.params)
    assert all(jax.tree.leaves(moved))


def test_route_bias_chooses_but_does_not_weigh():
    """DeepSeek-V3 eq. 16-18: the bias picks the experts; the gates are the unbiased scores."""
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    w0, e0, p0 = route(logits, 2)
    w1, e1, p1 = route(logits, 2, bias=jnp.array([0.0, 0.0, 0.0, 10.0]))
    assert e0.tolist() == [[0, 1]] and e1.tolist() == [[3, 0]]
    scores = jax.nn.softmax(logits[0])
    np.testing.assert_allclose(w1[0], scores[jnp.array([3, 0])] / (scores[3] + scores[0]), rtol=1e-6)
    np.testing.assert_allclose(p1, p0)


def test_balancing_bias_moves_against_the_load_by_sign_descent():
    """After one step each layer's router_bias is -rate * sign(load_e - mean load): the overloaded experts'
    biases fall and the underloaded ones' rise, by exactly the rate (no schedule, decay or clipping)."""
    rate = 0.01
    model = LM(LMConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, ffn="moe", num_experts=4,
                        experts_per_token=1, moe_balance="bias", moe_bias_rate=rate))
    assert LMTrainConfig(ffn="moe", moe_balance="bias", moe_bias_rate=rate).model_config().moe_bias_rate == rate
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    batch = _batch(jax.random.key(5))
    _, aux = model.apply({"params": params}, batch["inputs"])
    load = np.asarray(aux["expert_load"])  # [num_layers, E]
    assert np.all(load.std(-1) > 0)
    tx = make_lm_optimizer(OptimizerConfig(lr=1e-3, weight_decay=0.1, warmup_steps=5, decay_steps=10), model)
    state, _ = make_train_step(make_loss_fn(model), tx)(create_train_state(params, tx, jax.random.PRNGKey(1)),
                                                         batch, jax.random.key(2))
    for layer in range(2):
        bias = np.asarray(state.params[f"block_{layer}"]["moe"]["router_bias"])
        np.testing.assert_allclose(bias, -rate * np.sign(load[layer] - load[layer].mean()), atol=1e-7)
    # the balancing term adds nothing to the loss value
    _, aux = model.apply({"params": state.params}, batch["inputs"])
    assert float(aux["aux_loss"]) == pytest.approx(1e-3 * float(aux["router_z_loss"]), rel=1e-5)
