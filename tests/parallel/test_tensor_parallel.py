"""Tensor parallelism from the logical-axis rules, with the ZeRO stages on top: a tiny LM trained on
8 simulated devices equals the single-device spine step, its parameters take the promised layouts and
bytes, and a mesh that does not fit is a clear error before anything compiles.

Tolerance: 5 fp32 AdamW steps; losses and gradient norms agree with the single-device step to rtol
1e-5, final parameters to rtol 1e-5 / atol 2e-6 (tensor parallelism changes the summation order of
row-parallel products, data parallelism that of the gradient reduction). Adam's eps is 1e-6 rather
than 1e-8: with eps far below a gradient entry's summation noise, g / sqrt(v) is a sign function of
entries near 0, and that noise would move such a parameter by a fraction of a whole step.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxlab.models.lm import LM, NO_DECAY_PARAMS, LMConfig, init_params, lm_loss, param_logical_axes
from jaxlab.optim import OptimizerConfig, make_optimizer
from jaxlab.parallel import make_mesh, shard_train_state
from jaxlab.parallel.rules import (
    LOGICAL_AXIS_RULES,
    batch_specs,
    check_mesh_for,
    logical_to_mesh_specs,
    rules_for_mesh,
)
from jaxlab.parallel.strategies import abstract_train_state, state_specs
from jaxlab.train_state import create_train_state, make_train_step, step_key
from jaxlab.xla_options import FAST_COMPILE

B, L, STEPS = 8, 8, 5
CFG = LMConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_len=L)  # d_ff 88, head_dim 8
TX = make_optimizer(OptimizerConfig(lr=1e-3, weight_decay=0.1, eps=1e-6), no_decay=NO_DECAY_PARAMS)
RTOL, ATOL = 1e-5, 2e-6

# (data, model, strategy): every strategy and every tensor-parallel degree at least once
RUNS = [(8, 1, "ddp"), (8, 1, "zero2"), (4, 2, "zero1"), (4, 2, "zero3"), (2, 4, "ddp"), (2, 4, "zero3")]


def _mesh(**axes):
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                         devices=jax.devices()[:int(np.prod(list(axes.values())))])


@pytest.fixture(scope="module")
def lm():
    """The model, its logical axes, a fresh host-side train state and STEPS batches of tokens."""
    model = LM(CFG)
    rng = np.random.default_rng(0)
    cycle = rng.integers(0, CFG.vocab_size, (B, 4))  # [B, 4]: every row repeats its own 4 tokens
    tokens = [np.tile(np.roll(cycle, s, axis=1), (1, L // 4)).astype(np.int32) for s in range(STEPS)]
    create = jax.jit(lambda key: create_train_state(init_params(model, key, tokens[0]), TX, key))
    state = jax.device_get(create(jax.random.PRNGKey(0)))
    return model, param_logical_axes(model), state, tokens


def _loss_fn(model):
    return lambda params, tokens, key: lm_loss(model, params, tokens)


def _train(step, state, tokens):
    history = []
    for batch in tokens:
        state, metrics = step(state, batch, step_key(state))
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


@pytest.fixture(scope="module")
def reference(lm):
    model, _, state, tokens = lm
    step = jax.jit(make_train_step(_loss_fn(model), TX), compiler_options=FAST_COMPILE)
    return _train(step, state, tokens)


def _sharded_run(lm, data, model_size, strategy, **options):
    model, axes, state, tokens = lm
    mesh = make_mesh(data=data, model=model_size)
    sharded = shard_train_state(state, mesh, strategy, param_axes=axes)
    step = make_train_step(_loss_fn(model), TX, mesh=mesh, strategy=strategy, param_axes=axes,
                           compiler_options=FAST_COMPILE, **options)
    return _train(step, sharded, tokens)


def _assert_matches(run, reference):
    (state, history), (ref_state, ref_history) = run, reference
    for name in ("loss", "grad_norm", "cross_entropy", "accuracy"):
        np.testing.assert_allclose([m[name] for m in history], [m[name] for m in ref_history],
                                   rtol=RTOL, err_msg=name)
    assert [m["nonfinite"] for m in history] == [0] * STEPS
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                            jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL,
                                   err_msg=jax.tree_util.keystr(path))
    assert int(state.step) == STEPS


@pytest.mark.parametrize("data, model_size, strategy", RUNS)
def test_sharded_lm_equals_single_device(lm, reference, data, model_size, strategy):
    run = _sharded_run(lm, data, model_size, strategy)
    _assert_matches(run, reference)
    assert reference[1][-1]["loss"] < reference[1][0]["loss"]  # the runs compared do learn
    query = run[0].params["block_0"]["mixer"]["query"]["kernel"]  # [embed, heads, head_dim]
    tp = "model" if model_size > 1 else None
    assert query.sharding.spec == P("data" if strategy == "zero3" else None, tp, None)


def test_grad_accum_under_tensor_parallel_equals_one_batch(lm, reference):
    """grad_accum=2 on data=2 x model=4 (each device's 4 rows as 2 microbatches of 2) under ZeRO-2."""
    _assert_matches(_sharded_run(lm, 2, 4, "zero2", grad_accum=2), reference)


def test_step_traces_under_the_logical_axis_rules(lm):
    """The model's activation constraints resolve to the mesh: the query projection [B, L, H, D] is
    constrained to (data, -, model, -), the logits [B, L, V] to (data, -, model)."""
    model, axes, state, tokens = lm
    mesh = make_mesh(data=2, model=4)
    sharded = shard_train_state(state, mesh, "ddp", param_axes=axes)
    step = make_train_step(_loss_fn(model), TX, mesh=mesh, param_axes=axes)
    jaxpr = str(jax.make_jaxpr(step.jitted(sharded, tokens[0]))(sharded, tokens[0], sharded.key))
    assert "P('data', None, 'model', None)" in jaxpr and "P('data', None, 'model')" in jaxpr


# ----------------------------------------------------------------------------- layouts and bytes


def _bytes_on_device_0(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == jax.devices()[0])


@pytest.mark.parametrize("model_size", [2, 4])
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_per_device_bytes_under_tensor_parallel(lm, model_size, strategy):
    """Every parameter with a dimension named heads/kv_heads/mlp/vocab is split m ways; the rest
    (norm scales) stay whole; ZeRO-3 further splits everything over data (every leaf here has a
    dimension divisible by data)."""
    _, axes, state, _ = lm
    data = 8 // model_size
    mesh = make_mesh(data=data, model=model_size)
    sharded = shard_train_state(state, mesh, strategy, param_axes=axes)
    split_names = {"heads", "kv_heads", "mlp", "vocab"}
    split = sum(x.nbytes for x, a in zip(jax.tree.leaves(state.params), jax.tree.leaves(
        axes, is_leaf=lambda s: isinstance(s, P))) if split_names & set(a))
    whole = sum(x.nbytes for x in jax.tree.leaves(state.params)) - split
    assert split > 0.9 * (split + whole)
    n = data if strategy == "zero3" else 1
    assert _bytes_on_device_0(sharded.params) == split // (model_size * n) + whole // n
    # Adam's moments are laid out as their parameters
    mu = sharded.opt_state[1][0].mu
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.sharding.spec == b.sharding.spec,
                                        mu, sharded.params)) == [True] * len(jax.tree.leaves(mu))
    assert _bytes_on_device_0(mu) == _bytes_on_device_0(sharded.params)


def test_lm_layouts_follow_the_rules(lm):
    _, axes, state, _ = lm
    specs = state_specs(state, make_mesh(data=2, model=4), "zero3", param_axes=axes)
    block = specs.params["block_1"]
    assert block["mixer"]["query"]["kernel"] == P("data", "model", None)  # column-parallel
    assert block["mixer"]["key"]["kernel"] == P("data", "model", None)
    assert block["mixer"]["out"]["kernel"] == P("model", None, "data")  # row-parallel
    assert block["ffn"]["up"]["kernel"] == P("data", "model")
    assert block["ffn"]["down"]["kernel"] == P("model", "data")
    assert block["mixer_norm"]["scale"] == P("data")
    assert specs.params["embed"]["embedding"] == P("model", "data")  # vocab rows
    assert specs.opt_state[1][0].count == P() and specs.step == P()
    compute = state_specs(state, make_mesh(data=2, model=4), "ddp", param_axes=axes).params
    assert compute["block_1"]["mixer"]["out"]["kernel"] == P("model", None, None)
    # without a model axis the logical layout is whole, and ZeRO alone splits over data
    data_only = state_specs(state, make_mesh(data=8), "zero3", param_axes=axes).params
    assert data_only["block_1"]["mixer"]["query"]["kernel"] == P("data", None, None)


def test_scanned_layers_axis_stays_whole():
    model = LM(dataclasses.replace(CFG, scan_layers=True))
    axes = param_logical_axes(model)
    shapes = jax.eval_shape(lambda k: init_params(model, k, jnp.zeros((1, L), jnp.int32)),
                            jax.random.PRNGKey(0))
    specs = logical_to_mesh_specs(axes, make_mesh(data=2, model=4), shapes=shapes)
    stacked = specs["blocks"]["block_0"]
    assert stacked["mixer"]["query"]["kernel"] == P(None, None, "model", None)  # [layers, embed, heads, D]
    assert stacked["ffn"]["down"]["kernel"] == P(None, "model", None)


# ----------------------------------------------------------------------------- rules


def test_rules_table_and_mesh_restriction():
    assert dict(LOGICAL_AXIS_RULES) == {
        "batch": "data", "length": "seq", "heads": "model", "kv_heads": "model", "mlp": "model",
        "vocab": "model", "experts": "expert", "embed": None, "head_dim": None, "layers": None}
    on_model = dict(rules_for_mesh(make_mesh(data=2, model=4)))
    assert on_model["heads"] == "model" and on_model["length"] is None and on_model["experts"] is None
    assert dict(rules_for_mesh(_mesh(data=8, model=1)))["heads"] is None  # size 1 splits nothing
    specs = {"w": P("embed", "mlp"), "e": P("experts", "embed", "mlp"), "b": P()}
    shapes = {"w": np.zeros((4, 8)), "e": np.zeros((4, 4, 8)), "b": np.zeros(3)}
    assert logical_to_mesh_specs(specs, _mesh(data=2, expert=2, model=2), shapes=shapes) == {
        "w": P(None, "model"), "e": P("expert", None, "model"), "b": P(None)}
    assert logical_to_mesh_specs(specs, make_mesh(data=8), shapes=shapes) == {
        "w": P(None, None), "e": P(None, None, None), "b": P(None)}
    # one mesh axis splits at most one dimension of an array: the first named for it
    assert logical_to_mesh_specs(P("heads", "mlp"), make_mesh(data=2, model=4)) == P("model", None)


def test_batch_rows_over_data_and_positions_over_seq():
    mesh = _mesh(data=4, seq=2)
    batch = {"tokens": np.zeros((8, 6), np.int32), "weight": np.zeros(8)}
    assert batch_specs(batch, mesh) == {"tokens": P("data", "seq"), "weight": P("data")}
    assert batch_specs(batch, make_mesh(data=8)) == {"tokens": P("data", None), "weight": P("data")}
    with pytest.raises(ValueError, match=r"length 6 \(leaf \['tokens'\], shape \(8, 6\)\) is not divisible "
                                         r"by the mesh's seq axis size 4"):
        check_mesh_for(_mesh(data=2, seq=4), batch=batch)


# ----------------------------------------------------------------------------- errors before compiling


def _abstract_state(cfg):
    model = LM(cfg)
    tokens = jnp.zeros((1, L), jnp.int32)
    state = jax.eval_shape(lambda k: create_train_state(init_params(model, k, tokens), TX, k),
                           jax.random.PRNGKey(0))
    return state, param_logical_axes(model)


def test_heads_not_divisible_by_model_is_an_error():
    state, axes = _abstract_state(LMConfig(vocab_size=64, d_model=48, num_layers=1, num_heads=6,
                                           max_len=L))
    with pytest.raises(ValueError, match=r"does not fit the model: .*\['block_0'\]\['mixer'\]\['key'\]"
                                         r"\['kernel'\] dim 1: kv_heads=6 not divisible by model=4; .*"
                                         r"\['query'\]\['kernel'\] dim 1: heads=6 not divisible by model=4"):
        abstract_train_state(state, make_mesh(data=2, model=4), "zero3", param_axes=axes)
    # the same model fits model=2
    fits = abstract_train_state(state, make_mesh(data=4, model=2), "zero3", param_axes=axes)
    assert fits.params["block_0"]["mixer"]["query"]["kernel"].sharding.spec == P("data", "model", None)


def test_mesh_and_axes_errors(lm):
    model, axes, state, tokens = lm
    mesh = make_mesh(data=4, model=2)
    with pytest.raises(ValueError, match=r"splits parameters over \('model',\) but no param_axes were given"):
        shard_train_state(state, mesh, "ddp")
    with pytest.raises(ValueError, match="needs 16 devices but only 8"):
        make_mesh(data=4, model=4)
    with pytest.raises(ValueError, match=r"mesh axes \['batch'\] are not among"):
        shard_train_state(state, _mesh(batch=8), "ddp")
    bad = jax.tree.map(lambda s: P(*("hidden" if a == "mlp" else a for a in s)), axes,
                       is_leaf=lambda s: isinstance(s, P))
    with pytest.raises(ValueError, match=r"\['block_0'\]\['ffn'\]\['down'\]\['kernel'\]: logical axis "
                                         r"'hidden' \(dim 0\) has no rule"):
        shard_train_state(state, mesh, "ddp", param_axes=bad)
    with pytest.raises(ValueError, match=r"do not match the parameters' structure: parameters without "
                                         r"axes \[\"\['final_norm'\]\['scale'\]\"\]"):
        shard_train_state(state, mesh, "ddp", param_axes={k: v for k, v in axes.items() if k != "final_norm"})
    with pytest.raises(ValueError, match="impl='shard_map' is data parallel only"):
        make_train_step(_loss_fn(model), TX, mesh=mesh, param_axes=axes, impl="shard_map")
    with pytest.raises(ValueError, match=r"splits parameters over \('model',\) but no param_axes"):
        make_train_step(_loss_fn(model), TX, mesh=mesh, strategy="zero1")
    bad_layout = {**axes, "embed": {"embedding": P(None, "embed")}}  # the vocabulary rows whole
    # the batch is checked when the step is called, before the program is built
    sharded = shard_train_state(state, mesh, "zero1", param_axes=axes)
    step = make_train_step(_loss_fn(model), TX, mesh=mesh, strategy="zero1", param_axes=axes)
    with pytest.raises(ValueError, match=r"batch size 6 .* not divisible by the mesh's data axis size 4"):
        step(sharded, tokens[0][:6], sharded.key)
    with pytest.raises(ValueError, match=r"laid out as .* but the step expects"):
        make_train_step(_loss_fn(model), TX, mesh=mesh, strategy="zero1", param_axes=bad_layout)(
            sharded, tokens[0], sharded.key)
    assert not step._cache  # nothing was traced or compiled
