"""RWKV, RetNet and LRU mixers: decode == full forward, packed row == documents run separately, causal by
gradients (within a segment only), and the LM trains with each; the LM's names for their dynamics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.models.lm import LM, NO_DECAY_PARAMS, LMConfig, init_params, lm_loss, make_mixer
from jaxlab.models.rnn_mixers import LRUState, RWKVState, head_group_norm, token_shift
from jaxlab.optim import decay_mask
from jaxlab.xla_options import FAST_COMPILE

MIXERS = ("rwkv", "retnet", "lru")
B, L, D_MODEL, SPLIT, PREFILL = 2, 11, 16, 5, 4


def _cfg(mixer, **kw):
    base = dict(vocab_size=16, d_model=D_MODEL, num_layers=1, num_heads=2, mixer=mixer, max_len=32, chunk_size=4)
    base.update(kw)
    return LMConfig(**base)


@pytest.mark.parametrize("mixer", MIXERS)
def test_mixer_decodes_packs_and_is_causal(mixer, mixer_contract):
    """One compiled program per mixer: the full forward, the decode (prefill then one token at a time), the
    two documents alone, the packed row, and the Jacobian of the packed row's outputs w.r.t. its inputs."""
    module = make_mixer(_cfg(mixer))
    forms = mixer_contract(module, batch=B, length=L, d_model=D_MODEL, split=SPLIT, prefill=PREFILL, tol=2e-5)
    assert type(forms["state"]) is type(module.init_state(B, L, D_MODEL))
    np.testing.assert_allclose(forms["packed"][:, :SPLIT], forms["full"][:, :SPLIT], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mixer", MIXERS)
def test_lm_trains_with_the_mixer(mixer):
    """A few Adam steps on a fixed batch of packed rows: the loss is finite and falls."""
    cfg = _cfg(mixer, d_model=32)
    model = LM(cfg)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(np.tile(rng.integers(0, 16, (1, 8)), (4, 3))[:, :20], jnp.int32)  # period-8 rows
    seg = jnp.broadcast_to((jnp.arange(20) >= 12).astype(jnp.int32), (4, 20))
    params = init_params(model, jax.random.PRNGKey(0), tokens)
    tx = optax.adam(1e-2)

    def train(params):
        def step(carry, _):
            params, opt = carry
            (loss, _), grads = jax.value_and_grad(lambda p: lm_loss(model, p, tokens, seg), has_aux=True)(params)
            updates, opt = tx.update(grads, opt)
            return (optax.apply_updates(params, updates), opt), loss

        return jax.lax.scan(step, (params, tx.init(params)), None, length=25)[1]

    losses = np.asarray(jax.jit(train, compiler_options=FAST_COMPILE)(params))
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.5 * losses[0], losses


def test_dynamics_are_not_decayed_and_projections_are():
    names = {"rwkv": {"time_maa_x", "time_maa", "time_maa_w1", "time_maa_w2", "time_decay", "time_decay_w1",
                      "time_decay_w2", "time_first", "scale", "bias"},
             "retnet": {"scale", "bias"},
             "lru": {"nu_log", "theta_log", "gamma_log", "D", "bias"}}
    for mixer, spared in names.items():
        params = jax.eval_shape(lambda: init_params(LM(_cfg(mixer)), jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 4), jnp.int32)))
        mask = decay_mask(params["block_0"]["mixer"], NO_DECAY_PARAMS)
        flat = {jax.tree_util.keystr(p).split("'")[-2]: d for p, d in jax.tree_util.tree_leaves_with_path(mask)}
        assert {n for n, d in flat.items() if not d} == spared, mixer
        assert all(flat[n] for n in flat if n in ("kernel", "lru_B", "lru_C")), mixer


def test_token_shift_and_head_norm():
    x = jnp.arange(2 * 5 * 2, dtype=jnp.float32).reshape(2, 5, 2)
    seg = jnp.array([[0, 0, 1, 1, 1], [2, 2, 2, 2, 2]])
    prev = jnp.full((2, 2), -1.0)
    out = np.asarray(token_shift(x, prev, seg))
    np.testing.assert_array_equal(out[0], [[-1, -1], [0, 1], [0, 0], [4, 5], [6, 7]])  # zeros where doc 1 starts
    np.testing.assert_array_equal(out[1, 1:], np.asarray(x[1, :-1]))
    o = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 2, 4)), jnp.float32)  # [B, L, H, D]
    y = np.asarray(head_group_norm(o, jnp.ones(8), jnp.zeros(8), 0.0)).reshape(1, 3, 2, 4)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-6)  # every head of every token normalised alone
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-5)


def test_states_and_config_errors():
    assert isinstance(make_mixer(_cfg("rwkv")).init_state(3, 8, D_MODEL), RWKVState)
    lru_state = make_mixer(_cfg("lru")).init_state(3, 8, D_MODEL)
    assert isinstance(lru_state, LRUState) and lru_state.h.shape == (3, 2 * D_MODEL)
    assert make_mixer(_cfg("retnet")).init_state(3, 8, D_MODEL).kv.shape == (3, 2, 8, 16)  # [B, H, D, expand D]
    with pytest.raises(ValueError, match="head dim"):
        LMConfig(mixer="retnet", d_model=6, num_heads=2)
