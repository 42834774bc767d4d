"""``LMConfig(scan_layers=True)``: the scanned stack equals the unrolled one from the same weights (loss,
gradients, auxiliary outputs), decodes like its own full forward, and the layout conversion round-trips."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models.lm import LM, LMConfig, init_params, lm_loss, scan_to_unrolled, unrolled_to_scan
from jaxlab.xla_options import FAST_COMPILE

CASES = {
    "attention": dict(mixer="attention", num_layers=2),
    "hybrid": dict(mixer_pattern=("mamba", "attention"), num_layers=4),
    "s4d-moe": dict(mixer="s4d", ffn="moe", num_layers=2, num_experts=4),
}


def _configs(case):
    cfg = LMConfig(vocab_size=32, d_model=32, num_heads=2, max_len=32, d_state=4, **CASES[case])
    return cfg, dataclasses.replace(cfg, scan_layers=True)


@pytest.mark.parametrize("case", list(CASES))
def test_scanned_equals_unrolled_from_the_same_weights(case):
    cfg, scfg = _configs(case)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, cfg.vocab_size)
    params = init_params(LM(cfg), jax.random.PRNGKey(1), tokens)
    stacked = unrolled_to_scan(params, cfg)
    scanned_init = init_params(LM(scfg), jax.random.PRNGKey(1), tokens)
    assert jax.tree.structure(stacked) == jax.tree.structure(scanned_init)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scanned_init)
    jax.tree.map(np.testing.assert_array_equal, scan_to_unrolled(stacked, cfg), params)  # exact round trip

    def value_and_grad(c, p):
        f = jax.value_and_grad(lambda q: lm_loss(LM(c), q, tokens), has_aux=True)
        return jax.jit(f, compiler_options=FAST_COMPILE)(p)

    (loss, aux), grads = value_and_grad(cfg, params)
    (s_loss, s_aux), s_grads = value_and_grad(scfg, stacked)
    np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
    for name in aux:
        np.testing.assert_allclose(s_aux[name], aux[name], rtol=1e-4, atol=1e-6, err_msg=name)
    flat, s_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(scan_to_unrolled(s_grads, cfg))
    for (path, g), s in zip(flat, s_flat, strict=True):
        np.testing.assert_allclose(s, g, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_scanned_decoding_equals_full_forward():
    _, scfg = _configs("hybrid")
    model = LM(scfg)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 10), 0, scfg.vocab_size)
    params = init_params(model, jax.random.PRNGKey(3), tokens)
    full = model.apply({"params": params}, tokens)[0]
    cache = model.init_cache(2, 16)
    assert len(cache.layers) == scfg.group_size  # one state per pattern position, stacked over groups
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=LM.decode), compiler_options=FAST_COMPILE)
    logits, cache = step(params, tokens[:, :4], cache)  # prefill
    outs = [logits]
    for t in range(4, 10):
        logits, cache = step(params, tokens[:, t:t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-5)


def test_scan_layers_needs_whole_pattern_repetitions():
    with pytest.raises(ValueError, match="num_layers=3 must be a multiple of 2 .*scan_layers=False"):
        LMConfig(mixer_pattern=("mamba", "attention"), num_layers=3, scan_layers=True)
