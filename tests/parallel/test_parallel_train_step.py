"""Training steps under every strategy: equal to the spine's single-device step, and the compiled
programs contain the collectives each strategy promises.

Tolerance: parameters, losses and metrics after 3 fp32 AdamW steps agree with the spine's unsharded
``make_train_step(loss_fn, optimizer)`` to rtol 1e-5 / atol 1e-6 (the only difference is the
summation order of the gradient reduction across devices and microbatches).
"""

import _parallel_toy as toy
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxlab.parallel import TrainStep, make_mesh, shard_train_state, sharded_train_step
from jaxlab.parallel.collectives import hlo_collectives, jaxpr_collectives
from jaxlab.parallel.memory import compiled_memory
from jaxlab.parallel.strategies import STRATEGIES, leaf_spec
from jaxlab.train_state import create_train_state, make_train_step, step_key

N = 8
RTOL, ATOL = 1e-5, 1e-6

# bytes of the toy's parameters: w1, b1, w2 split over 8 devices; b2 (6 entries) cannot be
PARAM_BYTES = 4 * (toy.D_IN * toy.D_HIDDEN + toy.D_HIDDEN + toy.D_HIDDEN * toy.D_OUT + toy.D_OUT)
SPLIT_BYTES = PARAM_BYTES - 4 * toy.D_OUT


@pytest.fixture(scope="module")
def reference():
    """The spine's single-device step on the same batches (final state, every step's metrics)."""
    return toy.reference_train(toy.make_state(), toy.batches())


def _step(mesh, strategy, **kwargs):
    return make_train_step(toy.loss_fn, toy.TX, mesh=mesh, strategy=strategy, **kwargs)


def _bytes(ops, kind):
    return sum(op.result_bytes for op in ops if op.kind == kind)


def _check_collectives(impl: str, strategy: str, ops) -> None:
    """What each strategy promises to move (see parallel/train_step.py, shard_map_step.py)."""
    s = STRATEGIES[strategy]
    ar, rs, ag = (_bytes(ops, k) for k in ("all-reduce", "reduce-scatter", "all-gather"))
    # Whole gradients are all-reduced (DDP, ZeRO-1), or reduce-scattered into 1/N shards
    # (ZeRO-2/3). XLA:CPU lowers the jit path's reduce-scatter as all-reduce + slice.
    if not s.shard_gradients:
        assert ar >= PARAM_BYTES and rs == 0
    elif impl == "shard_map":
        assert rs == SPLIT_BYTES // N and ar < PARAM_BYTES // 2
    else:
        assert rs == SPLIT_BYTES // N or ar >= PARAM_BYTES
    if s.shard_parameters:  # ZeRO-3: parameters all-gathered where the loss uses them
        assert ag >= SPLIT_BYTES
    elif s.shard_optimizer:  # ZeRO-1/2: the updated shards all-gathered back into parameters
        assert ag == SPLIT_BYTES
    else:
        assert ag == 0


def _run(mesh, strategy, impl, param_axes=None, **kwargs):
    state = shard_train_state(toy.make_state(), mesh, strategy, param_axes=param_axes)
    step = _step(mesh, strategy, impl=impl, param_axes=param_axes, **kwargs)
    data = toy.batches()
    compiled = step.lower(state, data[0], step_key(state)).compile()
    metrics = []
    for batch in data:
        old = state
        state, m = step(state, batch, step_key(state))
        metrics.append(m)
    assert old.params["w1"].is_deleted()  # donated
    return state, metrics, compiled


def _check_compiled_memory(strategy, mem):
    """XLA's own accounting of the step: the state arguments shrink with each ZeRO stage."""
    s = STRATEGIES[strategy]
    state_bytes = 3 * PARAM_BYTES  # params + Adam mu + nu (the scalars are a few bytes)
    batch_bytes = 4 * toy.BATCH * (toy.D_IN + toy.D_OUT) // N
    if s.shard_parameters:
        assert mem["argument"] < state_bytes // 2
    elif s.shard_optimizer:
        assert PARAM_BYTES < mem["argument"] < 2 * PARAM_BYTES
    else:
        assert mem["argument"] >= state_bytes + batch_bytes
    assert mem["alias"] >= mem["argument"] - batch_bytes - 64  # the donated state is reused
    assert mem["peak"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]


def _assert_matches(state, metrics, reference, names=("loss", "grad_norm", "nonfinite", "abs_err", "draw")):
    """Final parameters, optimizer state and the metrics ``names`` of every step equal the reference's."""
    ref_state, ref_metrics = reference
    for name in ref_state.params:
        np.testing.assert_allclose(np.asarray(state.params[name]), np.asarray(ref_state.params[name]),
                                   rtol=RTOL, atol=ATOL, err_msg=name)
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(ref_state.opt_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)
    assert set(metrics[0]) == set(ref_metrics[0])
    for name in names:
        np.testing.assert_allclose([float(m[name]) for m in metrics], [m[name] for m in ref_metrics],
                                   rtol=RTOL, err_msg=name)
    assert int(state.step) == toy.STEPS


@pytest.mark.parametrize("impl", ["jit", "shard_map"])
@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
def test_strategy_equals_single_device(reference, impl, strategy):
    mesh = make_mesh(data=N)
    state, metrics, compiled = _run(mesh, strategy, impl)
    _assert_matches(state, metrics, reference)
    _check_collectives(impl, strategy, hlo_collectives(compiled.as_text()))
    _check_compiled_memory(strategy, compiled_memory(compiled))
    # the state leaves the step laid out as it came in
    s = STRATEGIES[strategy]
    w1 = state.params["w1"]
    assert w1.sharding.spec == (leaf_spec(w1.shape, mesh, shard_data=True) if s.shard_parameters
                                else P(None, None))
    assert metrics[0]["loss"].sharding.is_fully_replicated


@pytest.mark.parametrize("strategy", ["zero3", "zero1"])
def test_2d_mesh_data_and_model_axes(reference, strategy):
    """The toy MLP's hidden layer split over model=4 (w1 by columns, w2 by rows), ZeRO over data=2."""
    mesh = make_mesh(data=2, model=4)
    state, metrics, _ = _run(mesh, strategy, "jit", param_axes=toy.PARAM_AXES)
    _assert_matches(state, metrics, reference)
    assert state.params["w1"].sharding.spec == (P("data", "model") if strategy == "zero3"
                                                else P(None, "model"))
    assert state.params["w2"].sharding.spec == (P("model", "data") if strategy == "zero3"  # rows taken
                                                else P("model", None))
    assert state.opt_state[0].mu["w1"].sharding.spec == P("data", "model")  # ZeRO-1 and 3 alike


def test_ring_allreduce_ddp(reference):
    state, metrics, compiled = _run(make_mesh(data=N), "ddp", "shard_map", allreduce="ring")
    _assert_matches(state, metrics, reference)
    ops = hlo_collectives(compiled.as_text())
    assert sum(op.kind == "collective-permute" for op in ops) == 2 * (N - 1)
    assert _bytes(ops, "all-reduce") < PARAM_BYTES // 2  # only the loss/norm scalars


@pytest.mark.parametrize("impl, strategy", [("jit", "zero3"), ("shard_map", "zero2"),
                                            ("shard_map", "zero3")])
def test_grad_accum_equals_one_batch(reference, impl, strategy):
    """grad_accum=2 (each device runs its 4 rows as 2 microbatches of 2) trains like grad_accum=1 on
    the same global batch. (``draw`` differs by design: microbatch i draws fold_in(key, i).)"""
    state, metrics, _ = _run(make_mesh(data=N), strategy, impl, grad_accum=2)
    _assert_matches(state, metrics, reference, names=("loss", "grad_norm", "nonfinite", "abs_err"))


@pytest.mark.parametrize("impl, strategy", [("jit", "zero3"), ("shard_map", "zero2"), ("shard_map", "ddp")])
def test_nonfinite_loss_leaves_the_state_unchanged(impl, strategy):
    """An inf target on the last device's rows only: every device skips the update alike."""
    mesh = make_mesh(data=N)
    state = shard_train_state(toy.make_state(), mesh, strategy)
    before = jax.device_get(state)
    x, y = toy.batches(steps=1)[0]
    y = y.copy()
    y[-1, 0] = np.inf
    new, metrics = _step(mesh, strategy, impl=impl)(state, (x, y), step_key(state))
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(new.step) == 1
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((before.params,
                                                                                   before.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_spine_builds_the_sharded_step():
    mesh = make_mesh(data=N)
    step = make_train_step(toy.loss_fn, toy.TX, mesh=mesh, strategy="zero2", grad_accum=2,
                           impl="shard_map")
    assert isinstance(step, TrainStep)
    assert repr(step) == "TrainStep(strategy='zero2', impl='shard_map', grad_accum=2, mesh={'data': 8})"
    assert make_train_step(toy.loss_fn, toy.TX, mesh=mesh).strategy.name == "ddp"


def test_errors():
    mesh = make_mesh(data=N)
    state = toy.make_state()
    step = _step(mesh, "zero1")
    x, y = toy.batches()[0]
    key = state.key
    with pytest.raises(ValueError, match="shard_train_state"):
        step(state, (x, y), key)
    sharded = shard_train_state(state, mesh, "zero1")
    with pytest.raises(ValueError, match=r"batch size 12 .* not divisible by the mesh's data axis size 8"):
        step(sharded, (x[:12], y[:12]), key)
    with pytest.raises(ValueError, match=r"grad_accum=3 must divide the rows each device gets: .* 32 rows, "
                                         r"4 per device"):
        _step(mesh, "zero1", grad_accum=3)(sharded, (x, y), key)
    with pytest.raises(ValueError, match="sharded for strategy='zero1' but the step runs 'zero3'"):
        _step(mesh, "zero3")(sharded, (x, y), key)
    with pytest.raises(ValueError, match=r"state lives on mesh \{'data': 2\}"):
        step(shard_train_state(state, make_mesh(data=2), "zero1"), (x, y), key)
    with pytest.raises(ValueError, match="state.tx is not the optimizer this step was built with"):
        sharded_train_step(toy.loss_fn, optax.sgd(0.1), mesh, "zero1")(sharded, (x, y), key)
    with pytest.raises(ValueError, match="unknown strategy='zero9'"):
        _step(mesh, "zero9")
    with pytest.raises(ValueError, match="impl='pmap'"):
        _step(mesh, "ddp", impl="pmap")
    with pytest.raises(ValueError, match="needs impl='shard_map'"):
        _step(mesh, "ddp", allreduce="ring")
    with pytest.raises(ValueError, match="grad_accum=0"):
        sharded_train_step(toy.loss_fn, toy.TX, mesh, grad_accum=0)
    with pytest.raises(ValueError, match=r"impl='shard_map' is data parallel only, but the mesh also splits "
                                         r"\{'model': 4\}"):
        _step(make_mesh(data=2, model=4), "zero2", impl="shard_map", param_axes=toy.PARAM_AXES)
    with pytest.raises(ValueError, match=r"laid out as .* but the step expects .*param_axes=given"):
        _step(make_mesh(data=2, model=4), "zero1", param_axes=toy.PARAM_AXES)(
            shard_train_state(state, make_mesh(data=2, model=4), "zero1",
                              param_axes={**toy.PARAM_AXES, "w1": P("mlp", None)}), (x, y), key)
    with pytest.raises(ValueError, match="must return a scalar loss"):
        per_example = make_train_step(lambda p, b, k: ((b[0] @ p["w1"]).sum(-1), {}), toy.TX, mesh=mesh)
        per_example(shard_train_state(state, mesh, "ddp"), (x, y), key)


def test_shard_map_rejects_non_elementwise_optimizer():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    clipped = jax.device_get(jax.jit(lambda p: create_train_state(p, tx, jax.random.PRNGKey(0)))(
        toy.init_params()))
    mesh = make_mesh(data=N)
    step = make_train_step(toy.loss_fn, tx, mesh=mesh, strategy="zero2", impl="shard_map")
    with pytest.raises(ValueError, match="reduce_sum.*impl='jit'"):
        step(shard_train_state(clipped, mesh, "zero2"), toy.batches()[0], clipped.key)


@pytest.mark.parametrize("regather", [True, False])
def test_zero3_regathers_weights_in_the_backward_pass(regather):
    """As written (before XLA), ZeRO-3 all-gathers every split parameter for the forward pass and,
    with regather, again the weights the backward pass needs: only w2 (dh = dout @ w2^T); w1's
    gradient needs the input, not w1, and biases are not needed at all."""
    mesh = make_mesh(data=N)
    state = shard_train_state(toy.make_state(), mesh, "zero3")
    step = _step(mesh, "zero3", impl="shard_map", regather=regather)
    ops = jaxpr_collectives(jax.make_jaxpr(step.jitted(state, toy.batches()[0]))(state, toy.batches()[0], state.key),
                            dict(mesh.shape))
    w2_bytes = 4 * toy.D_HIDDEN * toy.D_OUT
    assert _bytes(ops, "all-gather") == SPLIT_BYTES + (w2_bytes if regather else 0)
    assert _bytes(ops, "reduce-scatter") == SPLIT_BYTES // N
