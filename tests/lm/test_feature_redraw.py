"""Performer's feature redraw (``LMConfig.feature_redraw``, ``jaxlab train lm --feature-redraw N``): a fresh
orthogonal draw of every FAVOR+ projection (stacked ones too) and nothing else, on the steps it is due, inside
the jitted step, so a resumed run ends bit-identical to an uninterrupted one; and the trainer's mixer flags."""

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlab.cli import CLIError, _parse
from jaxlab.models.linear_mixers import FAVOR_PROJECTION, redraw_favor_projections
from jaxlab.models.lm import LM, LMConfig, init_params
from jaxlab.models.lm_training import LMTrainConfig, redraw_features, train_lm
from jaxlab.xla_options import FAST_COMPILE


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _params(scan_layers):
    cfg = LMConfig(vocab_size=16, d_model=16, num_layers=2 if scan_layers else 1, num_heads=2, mixer="linear",
                   feature_map="favor", num_features=12, max_len=8, scan_layers=scan_layers)
    init = jax.jit(lambda key: nn.unbox(LM(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]),
                   compiler_options=FAST_COMPILE)  # tiny programs: compile time dominates
    return init(jax.random.PRNGKey(0))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_redraw_draws_new_orthogonal_features_and_leaves_the_rest(scan_layers):
    params = _params(scan_layers)
    new = redraw_favor_projections(params, jax.random.PRNGKey(7))
    old, new = _flat(params), _flat(new)
    favor = [k for k in old if FAVOR_PROJECTION in k]
    assert len(favor) == 1 and old.keys() == new.keys()
    for k in old:
        assert new[k].shape == old[k].shape and new[k].dtype == old[k].dtype, k
        if k not in favor:
            np.testing.assert_array_equal(new[k], old[k], err_msg=k)
    W = new[favor[0]].reshape(-1, 12, 8)  # [scanned steps, m, D] (one layer unrolled)
    for w, w_old in zip(W, old[favor[0]].reshape(-1, 12, 8)):
        assert not np.allclose(w, w_old)
        for block in (w[:8], w[8:]):  # rows of a block of D = 8 are orthogonal (orthogonal_gaussian)
            gram = block @ block.T
            np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4)
    if scan_layers:  # every scanned layer gets its own draw
        assert W.shape[0] == 2 and not np.allclose(W[0], W[1])
    again = _flat(redraw_favor_projections(params, jax.random.PRNGKey(7)))
    np.testing.assert_array_equal(again[favor[0]], new[favor[0]])  # a pure function of the key


def test_redraw_happens_on_the_steps_it_is_due():
    params = _params(False)
    key = jax.random.PRNGKey(3)
    proj = lambda p: next(v for k, v in _flat(p).items() if FAVOR_PROJECTION in k)  # noqa: E731
    step = jax.jit(redraw_features, static_argnames="every")
    for s, due in ((0, False), (1, False), (2, True), (3, False), (4, True)):
        changed = not np.array_equal(proj(step(params, jnp.int32(s), key, every=2)), proj(params))
        assert changed == due, s


def test_resumed_run_redraws_as_the_uninterrupted_one(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        (data / f"f{i}.py").write_text(" ".join(rng.choice(["def", "x", "=", "(", ")", ":", "\n"], size=80)))
    cfg = LMTrainConfig(mixer="linear", feature_map="favor", feature_redraw=2, data=str(data), steps=6,
                        warmup_steps=1, batch_size=2, seq_len=16, d_model=16, num_layers=1, num_heads=2,
                        eval_every=6, eval_batches=1, sample_every=0, log_every=1, checkpoint_every=2,
                        progress=False, mesh="data=1")
    out = tmp_path / "run"
    train_lm(cfg, out)
    def state():
        return _flat(ocp.StandardCheckpointer().restore((out / "checkpoints" / "6" / "state").absolute()))

    reference = state()
    key = next(k for k in reference if FAVOR_PROJECTION in k)
    init = _flat(init_params(LM(cfg.model_config()), jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0),
                             jnp.zeros((1, cfg.seq_len), jnp.int32)))
    init_proj = next(v for k, v in init.items() if FAVOR_PROJECTION in k)
    assert reference[key].shape == init_proj.shape and not np.allclose(reference[key], init_proj), "no redraw"
    for step in (4, 6):  # the process died after step 2's checkpoint
        shutil.rmtree(out / "checkpoints" / str(step))
    assert train_lm(cfg, out)["resumed_from"] == 2
    resumed = state()
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_trainer_flags_reach_the_model_and_are_validated():
    cfg = _parse(LMTrainConfig, ["--mixer", "linear", "--feature-map", "favor", "--feature-redraw", "5"],
                 default=LMTrainConfig(), prog="jaxlab train lm")
    mc = cfg.model_config()
    assert (mc.mixer, mc.feature_map, mc.feature_redraw) == ("linear", "favor", 5)
    cfg = _parse(LMTrainConfig, ["--mixer", "sparse", "--sparse-pattern", "fixed", "--sparse-stride", "8",
                                 "--sparse-summary", "2"], default=LMTrainConfig(), prog="jaxlab train lm")
    mc = cfg.model_config()
    assert (mc.mixer, mc.sparse_pattern, mc.sparse_stride, mc.sparse_summary) == ("sparse", "fixed", 8, 2)
    mc = LMTrainConfig(mixer="lsh", lsh_buckets=4, lsh_chunk=16, lsh_rounds=1, sample_every=0).model_config()
    assert (mc.mixer, mc.lsh_buckets, mc.lsh_chunk, mc.lsh_rounds) == ("lsh", 4, 16, 1)
    with pytest.raises(ValueError, match="sample_every=500 needs decoding"):
        LMTrainConfig(mixer="lsh")
    with pytest.raises(ValueError, match="feature_redraw=5 needs a 'linear' mixer"):
        LMTrainConfig(mixer="attention", feature_redraw=5)
    with pytest.raises(ValueError, match="sparse_pattern='banded'"):
        LMTrainConfig(mixer="sparse", sparse_pattern="banded")
    with pytest.raises(CLIError, match="feature_map='relu'"):
        _parse(LMTrainConfig, ["--feature-map", "relu"], default=LMTrainConfig(), prog="jaxlab train lm")
