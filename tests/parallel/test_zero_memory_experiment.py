"""Smoke tests of the ``zero-memory`` experiment at tiny sizes (in-process and in a child process)."""

import dataclasses
import json

import numpy as np
import pytest

from jaxlab.context import RunContext
from jaxlab.experiments import zero_memory as zm
from jaxlab.registry import get_experiment

# Compiling the LM's train step costs seconds per strategy on 2 cores; the compiled-memory path
# (compiled_memory) is covered by the train-step tests.
TINY = zm.ZeroMemoryConfig(device_counts=(1, 2, 4), vocab_size=64, d_model=32, num_layers=1,
                           num_heads=2, seq_len=8, compile_steps=False)


def _lm_num_params(cfg: zm.ZeroMemoryConfig) -> int:
    """Parameters of jaxlab's LM at the experiment's sizes (shapes only)."""
    import jax

    from jaxlab.models.lm import init_params

    tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), np.int32)
    shapes = jax.eval_shape(lambda key: init_params(zm._model(cfg), key, tokens), jax.random.key(0))
    return sum(x.size for x in jax.tree.leaves(shapes))


def test_zero_memory_measures_jaxlabs_lm():
    from jaxlab.models.lm import LM

    model = zm._model(TINY)
    assert isinstance(model, LM) and model.cfg.scan_layers and model.cfg.d_model == TINY.d_model
    assert not zm._model(dataclasses.replace(TINY, scan_layers=False)).cfg.scan_layers


def test_zero_memory_tiny_in_process(tmp_path):
    exp = get_experiment("zero-memory")
    assert isinstance(exp.quick, zm.ZeroMemoryConfig)
    result = exp.fn(TINY, RunContext("zero-memory", tmp_path, quick=True, show_progress=False))
    m = json.loads(json.dumps(result.metrics))  # JSON-able
    assert (tmp_path / "zero-memory.png").exists()
    assert m["device_counts"] == [1, 2, 4] and m["num_params"] == _lm_num_params(TINY)
    measured, formula = m["measured_bytes_per_device"], m["formula_bytes_per_device"]
    # one device: every strategy holds everything, 16 bytes per fp32-AdamW parameter (+ counter)
    assert {measured[s][0] for s in zm.STRATEGIES} == {measured["ddp"][0]}
    assert measured["ddp"][0] == pytest.approx(16 * m["num_params"], abs=64)
    # memory falls with N under ZeRO, ordered DDP > ZeRO-1 > ZeRO-2 > ZeRO-3, close to the formula
    for s in zm.STRATEGIES[1:]:
        assert measured[s][0] > measured[s][1] > measured[s][2]
    last = [measured[s][-1] for s in zm.STRATEGIES]
    assert last == sorted(last, reverse=True)
    for s in zm.STRATEGIES:
        np.testing.assert_allclose(measured[s], formula[s], rtol=0.05)
    assert m["compiled_step_bytes_at_max_devices"] == {}
    published = {c.quantity: c for c in result.comparisons if c.quantity.endswith("(K=12)")}
    for c in published.values():
        assert round(c.ours, 1) == c.published
    assert any("112" in str(c.published) or c.published == 112.0 for c in result.comparisons)
    assert "ZeRO" in result.summary


def test_zero_memory_measures_in_a_child_process_when_devices_are_missing():
    """16 devices > the 8 this process has: measured in a child with 16 simulated devices."""
    data = zm._measure_anywhere(dataclasses.replace(TINY, device_counts=(16,), compile_steps=False))
    assert data["device_count"] == 16 and data["backend"] == "cpu"
    zero3 = next(r for r in data["rows"] if r["strategy"] == "zero3")
    assert zero3["devices"] == 16 and zero3["params"] < zero3["params_total"] / 8


def test_config_validation():
    with pytest.raises(ValueError, match="d_model=30 must be divisible by num_heads=4"):
        zm.ZeroMemoryConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="device_counts"):
        zm.ZeroMemoryConfig(device_counts=())


def test_memory_report_on_a_tensor_parallel_mesh():
    """With param_axes, gradients take the parameters' model-axis layout plus the ZeRO split over data."""
    import jax

    from jaxlab.models.lm import init_params, param_logical_axes
    from jaxlab.optim import OptimizerConfig, make_optimizer
    from jaxlab.parallel import make_mesh, memory_report, shard_train_state
    from jaxlab.train_state import create_train_state

    model = zm._model(TINY)
    axes = param_logical_axes(model)
    tokens = jax.ShapeDtypeStruct((1, TINY.seq_len), np.int32)
    shapes = jax.eval_shape(lambda key: init_params(model, key, tokens), jax.random.key(0))
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    state = create_train_state(params, make_optimizer(OptimizerConfig(lr=1e-3)), jax.random.PRNGKey(0))
    whole = sum(x.nbytes for x in jax.tree.leaves(params))
    mesh = make_mesh(data=2, model=2)
    sharded = shard_train_state(state, mesh, "zero2", param_axes=axes)
    rep = memory_report(sharded, param_axes=axes)
    assert whole / 2 < rep.params < whole  # norms stay whole on the model axis
    assert rep.grads == pytest.approx(rep.params / 2, rel=0.02)  # ZeRO-2 splits them again over data
    with pytest.raises(ValueError, match="param_axes"):
        memory_report(sharded)
