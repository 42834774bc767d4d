"""Meshes, the strategies' shardings, and memory accounting (no compiled training steps here)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from flax.training.train_state import TrainState
from jax.sharding import PartitionSpec as P

from jaxlab.parallel import make_mesh, memory_report, shard_train_state, zero_memory_bytes
from jaxlab.parallel.memory import zero_memory_breakdown
from jaxlab.parallel.mesh import shard_batch
from jaxlab.parallel.strategies import (
    STRATEGIES,
    ShardedTrainState,
    abstract_train_state,
    get_strategy,
    leaf_spec,
    zero_dim,
)

N = 8
STRATEGY_NAMES = ("ddp", "zero1", "zero2", "zero3")


@pytest.fixture(scope="module")
def divisible_state():
    """Every parameter has a dimension divisible by 8, so ZeRO's 1/N is exact."""
    params = {"w1": jnp.ones((24, 64)), "b1": jnp.ones((64,)), "w2": jnp.ones((64, 16)),
              "b2": jnp.ones((16,))}
    # host arrays: placing them on a mesh needs no compiled resharding program
    return jax.device_get(TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3)))


def _spec(x):
    return x.sharding.spec


def test_make_mesh_shapes_and_submesh():
    assert dict(make_mesh(data=8).shape) == {"data": 8}
    assert dict(make_mesh(data=2, model=4).shape) == {"data": 2, "model": 4}
    assert dict(make_mesh().shape) == {"data": jax.device_count()}
    sub = make_mesh(data=2)
    assert sub.devices.size == 2 and set(sub.devices.flat) <= set(jax.devices())
    assert all(t == jax.sharding.AxisType.Auto for t in make_mesh(data=4).axis_types)


@pytest.mark.parametrize("kwargs, match", [
    (dict(data=16), "needs 16 devices but only 8"),
    (dict(data=4, model=4), "needs 16 devices"),
    (dict(data=0), "data=0"),
    (dict(model=3), "model=3 does not divide"),
])
def test_make_mesh_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(**kwargs)


def test_unknown_strategy_error(divisible_state):
    with pytest.raises(ValueError, match="unknown strategy='zero4'"):
        shard_train_state(divisible_state, make_mesh(data=N), "zero4")
    assert [get_strategy(s).stage for s in STRATEGY_NAMES] == [0, 1, 2, 3]


def test_leaf_rules():
    mesh, mesh2d = make_mesh(data=8), make_mesh(data=2, model=4)
    assert zero_dim((24, 64), mesh) == 1  # the largest divisible dimension
    assert zero_dim((64, 64), mesh) == 0  # first on ties
    assert zero_dim((6,), mesh) is None and zero_dim((), mesh) is None
    assert zero_dim((64, 24), mesh, P("model", None)) == 1  # not the dimension the compute layout splits
    assert leaf_spec((24, 64), mesh, shard_data=False) == P(None, None)
    assert leaf_spec((16, 8), mesh2d, P(None, "model"), shard_data=True) == P("data", "model")
    assert leaf_spec((16, 8), mesh2d, P(None, "model"), shard_data=False) == P(None, "model")
    assert leaf_spec((16, 8), mesh2d, shard_data=True) == P("data", None)  # no logical axes: data only
    assert leaf_spec((6,), mesh2d, shard_data=True) == P("data")  # 6 % 2 == 0
    assert leaf_spec((5,), mesh2d, shard_data=True) == P(None)


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_shardings_are_the_promised_ones(divisible_state, strategy):
    s = STRATEGIES[strategy]
    state = shard_train_state(divisible_state, make_mesh(data=N), strategy)
    assert isinstance(state, ShardedTrainState) and state.strategy == strategy
    assert _spec(state.step) == P()
    mu = state.opt_state[0].mu
    for name, param in state.params.items():
        want = leaf_spec(param.shape, make_mesh(data=N), shard_data=True)
        assert _spec(param) == (want if s.shard_parameters else P(*[None] * param.ndim))
        assert _spec(mu[name]) == (want if s.shard_optimizer else P(*[None] * param.ndim))
    assert _spec(state.opt_state[0].count) == P()  # scalars stay replicated
    # the values are untouched by the layout
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(divisible_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_memory_report_shows_1_over_n(divisible_state, strategy):
    s = STRATEGIES[strategy]
    state = shard_train_state(divisible_state, make_mesh(data=N), strategy)
    rep = memory_report(state)
    whole = sum(x.size * 4 for x in jax.tree.leaves(divisible_state.params))  # fp32
    count_bytes = 4  # Adam's step counter stays whole
    assert rep.device == str(jax.devices()[0]) and rep.num_devices == N
    assert rep.params_total == rep.grads_total == whole
    assert rep.opt_state_total == 2 * whole + count_bytes
    assert rep.params == (whole // N if s.shard_parameters else whole)
    assert rep.grads == (whole // N if s.shard_gradients else whole)
    assert rep.opt_state == (2 * whole // N if s.shard_optimizer else 2 * whole) + count_bytes
    assert rep.per_device == rep.params + rep.grads + rep.opt_state
    # measured buffers agree with the shardings' arithmetic (abstract state, nothing allocated)
    abstract = abstract_train_state(divisible_state, make_mesh(data=N), strategy)
    assert memory_report(abstract).as_dict() == rep.as_dict()
    assert "ratio" in str(rep)


def test_memory_report_other_device_and_plain_state(divisible_state):
    state = shard_train_state(divisible_state, make_mesh(data=N), "zero3")
    assert memory_report(state, device=jax.devices()[5]).params == memory_report(state).params
    plain = memory_report(divisible_state)  # an unsharded TrainState: everything whole
    assert plain.params == plain.params_total and plain.opt_state == plain.opt_state_total


def test_zero_memory_bytes_paper_figure_1():
    """Rajbhandari et al. 2020, Figure 1: 7.5B parameters, 64 devices, K = 12."""
    gb = [zero_memory_bytes(num_params=7.5e9, num_devices=64, stage=k) / 1e9 for k in range(4)]
    np.testing.assert_allclose(gb, [120.0, 31.40625, 16.640625, 1.875])
    assert [round(g, 1) for g in gb] == [120.0, 31.4, 16.6, 1.9]
    assert zero_memory_bytes(7e9, 1, "ddp") / 1e9 == pytest.approx(112.0)  # the 7B / 112 GB note
    parts = zero_memory_breakdown(7.5e9, 64, "zero2")
    assert parts["grads"] == pytest.approx(2 * 7.5e9 / 64) and parts["params"] == 2 * 7.5e9


@pytest.mark.parametrize("kwargs, match", [
    (dict(stage=4), "stage=4"), (dict(stage="zero9"), "unknown stage"),
    (dict(num_devices=0), "num_devices=0"), (dict(num_params=-1), "num_params=-1"),
])
def test_zero_memory_bytes_errors(kwargs, match):
    args = dict(num_params=1e9, num_devices=8, stage=1) | kwargs
    with pytest.raises(ValueError, match=match):
        zero_memory_bytes(**args)


def test_shard_batch_and_errors():
    mesh = make_mesh(data=N)
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    placed = shard_batch({"x": x}, mesh)
    assert placed["x"].sharding.spec == P("data")
    assert placed["x"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(placed["x"]), x)
    local = shard_batch({"x": x}, mesh, process_local=True)  # one process: its rows are all rows
    assert local["x"].sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(local["x"]), x)
    with pytest.raises(ValueError, match="batch size 12 .* not divisible by the mesh's data axis size 8"):
        shard_batch({"x": x[:12]}, mesh)
    with pytest.raises(ValueError, match="scalar"):
        shard_batch({"x": np.float32(1.0)}, mesh)


class KeyedState(TrainState):
    """A TrainState subclass with an extra field, like a train state that carries its PRNG key."""

    key: jax.Array = struct.field(pytree_node=True, default=None)


def test_train_state_subclass_keeps_type_and_extra_fields(divisible_state):
    keyed = jax.device_get(KeyedState.create(apply_fn=None, params=divisible_state.params,
                                             tx=divisible_state.tx, key=np.array([0, 4], np.uint32)))
    state = shard_train_state(keyed, make_mesh(data=N), "zero3")
    assert isinstance(state, KeyedState) and isinstance(state, ShardedTrainState)
    assert state.strategy == "zero3"
    assert state.key.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(state.key), np.asarray(keyed.key))
    again = shard_train_state(state, make_mesh(data=2), "zero1")  # reshard: same type, new layout
    assert type(again) is type(state) and again.strategy == "zero1"
    assert memory_report(again).opt_state < memory_report(shard_train_state(keyed, make_mesh(data=2),
                                                                            "ddp")).opt_state


def test_abstract_state_from_eval_shape(divisible_state):
    """A target built without any arrays (e.g. from jax.eval_shape) gets the same layout."""
    shapes = jax.eval_shape(lambda: divisible_state)
    abstract = abstract_train_state(shapes, make_mesh(data=N), "zero2")
    assert abstract.step.dtype == jnp.int32 and abstract.strategy == "zero2"
    assert memory_report(abstract).opt_state == memory_report(
        abstract_train_state(divisible_state, make_mesh(data=N), "zero2")).opt_state
