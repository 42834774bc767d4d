"""The training spine: the step (gradient accumulation, the non-finite guard), the optimizer factory, and
``fit``'s fault handling (corrupt newest checkpoint, NaN, metrics after a resume, unwritable output)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.loop import ArrayIterator, LoopConfig, NonFiniteError, fit
from jaxlab.metrics import MetricsWriter
from jaxlab.optim import OptimizerConfig, decay_mask, lr_schedule, make_optimizer
from jaxlab.train_state import LOSS_WEIGHT, create_train_state, jit_train_step, make_train_step, step_key


def _regression(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return x, (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)


def _loss(params, batch, key):
    x, y = batch
    x = x + 0.01 * jax.random.normal(key, x.shape)  # key-dependent, so the step key matters
    err = x @ params["w"] + params["b"] - y  # [B]
    return jnp.mean(err ** 2), {"abs_err": jnp.mean(jnp.abs(err))}


def _state(tx):
    return create_train_state({"w": jnp.zeros(3), "b": jnp.zeros(())}, tx, jax.random.PRNGKey(3))


TX = make_optimizer(OptimizerConfig(lr=0.05, algorithm="adam", b2=0.999))


def test_grad_accum_equals_one_big_batch():
    x, y = _regression(8)
    state = _state(TX)

    def quiet(params, batch, key):  # no key-dependent noise: microbatches draw other keys than the whole batch
        x, y = batch
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2), {}

    one, m1 = jax.jit(make_train_step(quiet, TX))(state, (x, y), step_key(state))
    four, m4 = jax.jit(make_train_step(quiet, TX, grad_accum=4))(state, (x, y), step_key(state))
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), one.params, four.params)
    with pytest.raises(ValueError, match="grad_accum=3 must divide"):
        jax.jit(make_train_step(quiet, TX, grad_accum=3))(state, (x, y), step_key(state))
    with pytest.raises(ValueError, match="grad_accum=0"):
        make_train_step(quiet, TX, grad_accum=0)
    with pytest.raises(ValueError, match="need a mesh"):
        make_train_step(quiet, TX, strategy="zero1")


def test_grad_accum_weighs_microbatches_by_the_loss_weight():
    """A mean over masked terms whose microbatches hold 1, 1, 2 and 2 unmasked rows: weighted by the
    reported ``loss_weight`` the accumulated loss and gradient are the whole batch's (equal weights would
    give the mean of the four means instead)."""
    x, y = _regression(8)
    mask = np.array([1, 0, 0, 1, 1, 1, 1, 1], np.float32)
    state = _state(TX)

    def masked(params, batch, key):
        x, y, m = batch
        count = jnp.sum(m)
        return jnp.sum(m * (x @ params["w"] + params["b"] - y) ** 2) / count, {LOSS_WEIGHT: count}

    one, m1 = jax.jit(make_train_step(masked, TX))(state, (x, y, mask), step_key(state))
    four, m4 = jax.jit(make_train_step(masked, TX, grad_accum=4))(state, (x, y, mask), step_key(state))
    assert [mask[i:i + 2].sum() for i in range(0, 8, 2)] == [1, 1, 2, 2] and float(m4[LOSS_WEIGHT]) == 6
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), one.params, four.params)


def test_nonfinite_step_keeps_state_and_flags_it():
    state = _state(TX)
    bad = lambda p, b, k: (jnp.sum(p["w"]) * jnp.nan, {})  # noqa: E731
    new, metrics = jax.jit(make_train_step(bad, TX))(state, None, step_key(state))
    assert int(metrics["nonfinite"]) == 1 and int(new.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, new.opt_state, state.opt_state)
    with pytest.raises(TypeError, match=r"\(loss, metrics\)"):
        jax.jit(make_train_step(lambda p, b, k: jnp.sum(p["w"]), TX))(state, None, step_key(state))


def _run(out, num_steps, loss=_loss, **loop):
    x, y = _regression()
    data = ArrayIterator((x, y), batch_size=16, seed=1)
    cfg = LoopConfig(num_steps=num_steps, log_every=1, checkpoint_every=5, keep_checkpoints=3, progress=False, **loop)
    return fit(jit_train_step(make_train_step(loss, TX)), _state(TX), data, cfg, out)


def test_corrupt_newest_checkpoint_falls_back_and_ends_equal(tmp_path):
    reference = _run(tmp_path / "ref", 15).state
    _run(tmp_path / "run", 10)  # checkpoints at 5 and 10
    for f in (tmp_path / "run" / "checkpoints" / "10" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00" * f.stat().st_size)  # overwrite the data files of the newest step
    with pytest.warns(RuntimeWarning, match=r"checkpoint .*10 is corrupt.*resuming from step 5"):
        result = _run(tmp_path / "run", 15)
    assert result.resumed_from == 5
    jax.tree.map(np.testing.assert_array_equal, result.state.params, reference.params)
    assert (tmp_path / "run" / "checkpoints.corrupt" / "10").is_dir()
    steps = [r["step"] for r in MetricsWriter.read(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 16))  # rows past the restored step were dropped, none duplicated


def test_half_written_checkpoint_is_never_taken_for_a_valid_one(tmp_path):
    _run(tmp_path / "run", 5)  # checkpoint 5
    partial = tmp_path / "run" / "checkpoints" / "10.orbax-checkpoint-tmp-1234567"  # a save killed mid-write
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 64)
    result = _run(tmp_path / "run", 6)
    assert result.resumed_from == 5 and int(result.state.step) == 6


def test_nan_stops_with_error_and_keeps_last_good_checkpoint(tmp_path):
    def exploding(params, batch, key):
        loss, metrics = _loss(params, batch, key)
        blow = jnp.where(jnp.sum(jnp.abs(params["w"])) > 1.0, jnp.inf, 1.0)  # diverges after a few steps
        return loss * blow, metrics

    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient at step (\d+).*checkpoint \(step 5\)") as e:
        _run(tmp_path / "nan", 20, loss=exploding)
    assert 5 < e.value.step <= 10
    from jaxlab.checkpoint import Checkpointer

    with Checkpointer(tmp_path / "nan" / "checkpoints", save_every=5) as ckpt:
        assert ckpt.all_steps() == [5]
        state, _ = ckpt.restore(_state(TX))
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(state.params))
    skipped = _run(tmp_path / "skip", 20, loss=exploding, skip_nonfinite=True)
    assert int(skipped.state.step) == 20 and skipped.skipped_nonfinite == 20 - e.value.step + 1
    last = MetricsWriter.read(tmp_path / "skip" / "metrics.jsonl")[-1]
    assert last["skipped_nonfinite"] == skipped.skipped_nonfinite


def test_unwritable_output_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    calls = []

    def step(state, batch, key):
        calls.append(1)
        return state, {}

    with pytest.raises(OSError, match="cannot write to the output folder"):
        fit(step, _state(TX), ArrayIterator(np.zeros(4), 2), LoopConfig(num_steps=2, progress=False),
            blocker / "out")
    assert not calls


def test_optimizer_schedule_end_points_and_errors():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    s = lr_schedule(cfg)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, rel=1e-5) and float(s(110)) == pytest.approx(0.1)
    assert float(s(500)) == pytest.approx(0.1)
    lin = lr_schedule(OptimizerConfig(lr=2.0, decay_steps=100, schedule="linear", min_lr_ratio=0.0))
    assert float(lin(0)) == pytest.approx(2.0) and float(lin(50)) == pytest.approx(1.0) and float(lin(100)) == 0.0
    flat = lr_schedule(OptimizerConfig(lr=0.3, warmup_steps=4))
    assert float(flat(2)) == pytest.approx(0.15) and float(flat(1000)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="weight_decay=0.1"):
        OptimizerConfig(algorithm="adam", weight_decay=0.1)
    with pytest.raises(ValueError, match="warmup_steps=20 must be <= decay_steps=10"):
        OptimizerConfig(warmup_steps=20, decay_steps=10)
    with pytest.raises(ValueError, match="algorithm='sgdx'"):
        OptimizerConfig(algorithm="sgdx")


def test_decay_mask_is_by_name_and_clipping_applies():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones((2, 2))},
              "emb": {"table": jnp.ones(3)}}
    mask = decay_mask(params, {"bias", "scale"})
    assert mask == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}, "emb": {"table": True}}
    tx = make_optimizer(OptimizerConfig(lr=1.0, weight_decay=0.5, clip_norm=0.0), no_decay={"bias", "scale"})
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["dense"]["kernel"][0, 0]) == pytest.approx(-0.5)  # -lr * wd * p
    assert float(updates["norm"]["scale"][0, 0]) == 0.0 and float(updates["emb"]["table"][0]) == pytest.approx(-0.5)
    clipped = make_optimizer(OptimizerConfig(lr=1.0, algorithm="adam", clip_norm=1.0))
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1.0, b2=0.95))
    g = jax.tree.map(lambda p: 10 * p, params)
    got, _ = clipped.update(g, clipped.init(params), params)
    want, _ = reference.update(g, reference.init(params), params)
    jax.tree.map(np.testing.assert_allclose, got, want)
