"""The LM on the mesh's other axes, through the spine's sharded step: context parallel on ``seq`` (ring
attention over packed rows, scanned layers) and expert parallel on ``expert`` (``ffn="moe"``, all-to-all)
give the single-device losses over 3 steps, and the compiled step moves K/V with collective-permutes
(``ppermute`` in the step's jaxpr: GSPMD's own halo exchanges for the shifted targets are
collective-permutes too, so the compiled HLO alone would not tell) or tokens with all-to-alls.

Tolerance as in test_tensor_parallel.py: losses rtol 1e-5 (summation order differs across devices).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxlab.models.lm import LM, NO_DECAY_PARAMS, LMConfig, init_params, lm_loss, param_logical_axes
from jaxlab.optim import OptimizerConfig, make_optimizer
from jaxlab.parallel import shard_train_state
from jaxlab.train_state import create_train_state, make_train_step, step_key
from jaxlab.xla_options import FAST_COMPILE

B, L, STEPS = 4, 16, 3
TX = make_optimizer(OptimizerConfig(lr=3e-3, weight_decay=0.1, eps=1e-6), no_decay=NO_DECAY_PARAMS)


def _mesh(**axes):
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                         devices=jax.devices()[:int(np.prod(list(axes.values())))])


def _batches():
    rng = np.random.default_rng(0)
    # two documents per row, the boundary inside a device's block for every seq size used (7 of 16)
    segment_ids = np.repeat(np.array([[1] * 7 + [2] * 9]), B, axis=0).astype(np.int32)
    return [{"tokens": rng.integers(0, 64, (B, L)).astype(np.int32), "segment_ids": segment_ids}
            for _ in range(STEPS)]


def _loss_fn(model):
    return lambda params, batch, key: lm_loss(model, params, batch["tokens"], batch["segment_ids"])


def _run(model, batches, mesh=None, strategy="ddp"):
    state = create_train_state(init_params(model, jax.random.PRNGKey(0), batches[0]["tokens"]), TX,
                               jax.random.PRNGKey(1))
    if mesh is None:
        step, jaxpr = jax.jit(make_train_step(_loss_fn(model), TX), compiler_options=FAST_COMPILE), ""
    else:
        axes = param_logical_axes(model)
        state = shard_train_state(state, mesh, strategy, param_axes=axes)
        step = make_train_step(_loss_fn(model), TX, mesh=mesh, strategy=strategy, param_axes=axes,
                               compiler_options=FAST_COMPILE)
        traced = make_train_step(_loss_fn(model), TX, mesh=mesh, strategy=strategy, param_axes=axes)
        jaxpr = str(jax.make_jaxpr(traced.jitted(state, batches[0]))(state, batches[0], state.key))
    losses = []
    for batch in batches:
        state, metrics = step(state, batch, step_key(state))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jaxpr


@pytest.mark.parametrize("axes, strategy", [(dict(data=2, seq=4), "ddp"),
                                            (dict(data=2, model=2, seq=2), "zero3")])
def test_context_parallel_lm_equals_single_device(axes, strategy):
    model = LM(LMConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_len=L, scan_layers=True))
    batches = _batches()
    reference, _ = _run(model, batches)
    losses, jaxpr = _run(model, batches, _mesh(**axes), strategy)
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    assert reference[-1] < reference[0]
    assert "ppermute" in jaxpr  # K/V blocks around the ring


def test_expert_parallel_lm_equals_single_device():
    model = LM(LMConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_len=L, ffn="moe",
                        num_experts=4, experts_per_token=2))
    batches = _batches()
    reference, _ = _run(model, batches)
    losses, jaxpr = _run(model, batches, _mesh(data=2, expert=4), "zero1")
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    assert "all_to_all" in jaxpr  # tokens to the devices holding their experts


def test_attention_outside_a_seq_mesh_is_not_ring_attention():
    """No mesh, or a mesh without a seq axis: the ordinary kernel (no shard_map in the jaxpr)."""
    model = LM(LMConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, max_len=L))
    tokens = jnp.zeros((2, L), jnp.int32)
    params = init_params(model, jax.random.PRNGKey(0), tokens)
    assert "shard_map" not in str(jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens))(params))
    with jax.set_mesh(_mesh(data=2, seq=4)):
        assert "shard_map" in str(jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens))(params))
