"""Encoder-decoder Transformer: learns to reverse sequences; greedy (KV cache) and beam search agree
with the full forward; source padding changes nothing; config validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.models.transformer import (Transformer, TransformerConfig, beam_search, greedy_decode, seq2seq_loss,
                                       shift_right)
from jaxlab.xla_options import FAST_COMPILE

PAD, BOS, EOS, V, L = 0, 1, 2, 12, 6


def reverse_batch(key, batch=64):
    """Source: L tokens from {3..V-1}; target: the source reversed, then EOS."""
    src = jax.random.randint(key, (batch, L), 3, V)
    return src, jnp.concatenate([src[:, ::-1], jnp.full((batch, 1), EOS)], axis=1)


def test_learns_reverse_and_decoders_agree_with_full_forward():
    cfg = TransformerConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=32, num_heads=4, num_encoder_layers=1,
                            num_decoder_layers=1, d_ff=64, dropout=0.0, max_len=16, attention_impl="xla")
    model = Transformer(cfg)
    tx = optax.adam(optax.linear_schedule(0.0, 3e-3, 20))

    def train(key):
        src, tgt = reverse_batch(key)
        params = nn.unbox(model.init(key, src, shift_right(tgt, BOS)))["params"]

        def step(carry, key):
            params, opt_state = carry
            src, tgt = reverse_batch(key)

            def loss_fn(p):  # label smoothing 0.1 as in the paper
                logits = model.apply({"params": p}, src, shift_right(tgt, BOS))
                return seq2seq_loss(logits, tgt, PAD, label_smoothing=0.1)[0]

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, 200))
        return params, losses

    params, losses = jax.jit(train, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(0))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])

    src, tgt = reverse_batch(jax.random.PRNGKey(7), batch=16)
    greedy = greedy_decode(model, params, src, max_new_tokens=L + 2)  # [B, L + 2]
    beam, score = beam_search(model, params, src, max_new_tokens=L + 2, beam_size=3, alpha=0.6)
    np.testing.assert_array_equal(greedy[:, L + 1:], PAD)  # pad after EOS
    assert float(jnp.mean(greedy[:, :L + 1] == tgt)) > 0.95
    assert float(jnp.mean(beam[:, :L + 1] == tgt)) > 0.95

    def full_forward(params, src, greedy, beam):
        apply = lambda s, t: model.apply({"params": params}, s, shift_right(t, BOS))  # noqa: E731
        padded = jnp.concatenate([src, jnp.full((src.shape[0], 3), PAD)], axis=1)  # extra source padding
        return apply(src, greedy), apply(padded, greedy), jax.nn.log_softmax(apply(src, beam))

    logits, logits_padded, logp_beam = jax.jit(full_forward, compiler_options=FAST_COMPILE)(params, src, greedy,
                                                                                           beam)
    np.testing.assert_allclose(logits_padded, logits, atol=1e-5, rtol=1e-5, err_msg="source padding leaks")
    # greedy decoding with the KV cache = argmax of the full forward on its own output (until EOS)
    live = np.asarray(shift_right(greedy, BOS) != EOS).cumprod(axis=1).astype(bool)
    np.testing.assert_array_equal(np.asarray(greedy)[live], np.asarray(jnp.argmax(logits, -1))[live])
    # the beam's score is its length-normalised log-probability under the full forward
    tok_logp = np.take_along_axis(np.asarray(logp_beam), np.asarray(beam)[..., None], -1)[..., 0]
    lengths = np.argmax(np.asarray(beam) == EOS, axis=1) + 1
    mask = np.arange(beam.shape[1]) < lengths[:, None]
    expected = (tok_logp * mask).sum(1) / ((5.0 + lengths) / 6.0) ** 0.6
    np.testing.assert_allclose(score, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=30, num_heads=4), "d_model=30 must be divisible by num_heads=4"),
    (dict(norm="sandwich"), "norm='sandwich'"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(pad_id=1, bos_id=1), "must differ"),
    (dict(tgt_vocab_size=2), "eos_id=2"),
    (dict(activation="tanh"), "activation='tanh'"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kwargs)


def test_decode_argument_errors():
    model = Transformer(TransformerConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=8, num_heads=2, max_len=8))
    src = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="max_new_tokens=9"):
        greedy_decode(model, {}, src, max_new_tokens=9)
    with pytest.raises(ValueError, match="beam_size=0"):
        beam_search(model, {}, src, max_new_tokens=4, beam_size=0)
    with pytest.raises(ValueError, match="src must be an int array"):
        greedy_decode(model, {}, src.astype(jnp.float32), max_new_tokens=4)
