"""The LM's one sampler: KV-cache decoding equals the full forward pass, greedy is the argmax, EOS stops a
row, top-k and top-p keep what they promise, ``logps`` are those of the distribution sampled from, and
the key schedule is deterministic. Two compiled samplers (unfiltered; top-k + top-p + EOS; the temperature,
top-p value and EOS token are traced) serve every test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models.lm import LM, LMConfig, init_params
from jaxlab.models.sampling import response_logprobs, sample, sampling_logits
from jaxlab.xla_options import FAST_COMPILE

V, LP, R = 32, 5, 6
# window 4 < LP + R: the sliding layer's ring-buffer cache wraps while decoding
CFG = LMConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=4, mixer="sliding", window=4, attention_impl="xla",
               max_len=64)


@pytest.fixture(scope="module")
def lm():
    """(model, params, prompts [4, LP], jitted full forward)."""
    model = LM(CFG)
    prompts = jax.random.randint(jax.random.PRNGKey(4), (4, LP), 0, V)
    params = init_params(model, jax.random.PRNGKey(0), prompts)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t)[0], compiler_options=FAST_COMPILE)
    return model, params, prompts, forward


def _scored(forward, params, out):
    """The full forward's logits [B, R, V] that predicted each response token."""
    return np.asarray(forward(params, out.tokens)[:, LP - 1:-1])


def test_greedy_is_the_argmax_of_the_full_forward(lm):
    model, params, prompts, forward = lm
    out = sample(model, params, prompts, jax.random.PRNGKey(0), R, temperature=0.0)
    assert out.tokens.shape == (4, LP + R) and out.response.shape == out.logps.shape == out.mask.shape == (4, R)
    np.testing.assert_array_equal(out.tokens[:, :LP], prompts)
    np.testing.assert_array_equal(out.tokens[:, LP:], out.response)
    np.testing.assert_array_equal(out.response, np.argmax(_scored(forward, params, out), axis=-1))
    np.testing.assert_array_equal(out.mask, 1.0)  # no eos_id: every row runs to R
    np.testing.assert_array_equal(out.logps, 0.0)  # a point mass


def test_decode_by_cache_equals_full_forward_and_keys(lm):
    model, params, prompts, forward = lm
    a, b, c = (sample(model, params, prompts, jax.random.PRNGKey(k), R) for k in (5, 5, 6))
    np.testing.assert_array_equal(a.tokens, b.tokens)  # same key, same sample
    np.testing.assert_array_equal(a.logps, b.logps)
    assert not np.array_equal(a.response, c.response)  # another key, another sample
    assert int(a.response.min()) >= 0 and int(a.response.max()) < V
    # the sampler's log-probabilities (cached decoding) are the teacher-forced ones of one forward pass
    full = response_logprobs(model, params, a.tokens, LP)
    np.testing.assert_allclose(a.model_logps, full, atol=2e-5)
    # at temperature 1 without filtering, the distribution sampled from is the model's
    np.testing.assert_allclose(a.logps, a.model_logps, atol=2e-5)
    # token t draws fold_in(key, t): the first token is categorical(fold_in(key, 0), log pi)
    first = jax.random.categorical(jax.random.fold_in(jax.random.PRNGKey(5), 0),
                                   sampling_logits(jnp.asarray(_scored(forward, params, a)[:, 0])))
    np.testing.assert_array_equal(first, a.response[:, 0])


def test_top_k_top_p_and_eos(lm):
    model, params, prompts, forward = lm
    kw = dict(temperature=0.7, top_k=8, top_p=0.6)
    # the first token never depends on the EOS: make row 0's first token the EOS of the same draw
    eos = int(sample(model, params, prompts, jax.random.PRNGKey(1), R, **kw, eos_id=V - 1).response[0, 0])
    out = sample(model, params, prompts, jax.random.PRNGKey(1), R, **kw, eos_id=eos, pad_id=0)
    response, mask, logps = np.asarray(out.response), np.asarray(out.mask), np.asarray(out.logps)
    # EOS: every row stops at its first eos (row 0 at once); mask 1 through it; padding and zeros after
    is_eos = response == eos
    first = np.where(is_eos.any(1), is_eos.argmax(1), R)
    np.testing.assert_array_equal(mask, (np.arange(R)[None] <= first[:, None]).astype(np.float32))
    assert first[0] == 0 and mask.sum() < mask.size
    assert np.all(response[mask == 0] == 0) and np.all(logps[mask == 0] == 0)
    assert np.all(np.asarray(out.model_logps)[mask == 0] == 0)
    # every sampled token lies in the top k and in the nucleus of the full forward's distribution, and logps
    # are log q of that filtered, tempered distribution
    logits = _scored(forward, params, out)  # [B, R, V]
    chosen = np.take_along_axis(logits, response[..., None], -1)
    rank = (logits > chosen).sum(-1)
    assert rank[mask > 0].max() < 8, rank
    log_q = np.asarray(jax.nn.log_softmax(sampling_logits(jnp.asarray(logits), **kw), axis=-1))
    log_q = np.take_along_axis(log_q, response[..., None], -1)[..., 0]
    assert np.all(np.isfinite(log_q[mask > 0]))  # inside the nucleus
    np.testing.assert_allclose(np.where(mask > 0, log_q, 0.0), logps, atol=1e-4)
    # greedy under the same compiled sampler (temperature and top_p are traced) stops at EOS too
    greedy = sample(model, params, prompts, jax.random.PRNGKey(2), R, temperature=0.0, top_k=8, top_p=0.3, eos_id=eos)
    plain = sample(model, params, prompts, jax.random.PRNGKey(2), R, temperature=0.0)
    g_mask = np.asarray(greedy.mask) > 0
    np.testing.assert_array_equal(np.asarray(greedy.response)[g_mask], np.asarray(plain.response)[g_mask])


def test_sampling_logits_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: np.isfinite(np.asarray(sampling_logits(logits, **kw)))[0].tolist()  # noqa: E731
    # top-p keeps the smallest set of most likely tokens with mass >= p
    assert kept(top_p=0.3) == [True, False, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(top_p=1.0) == [True] * 4
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_k=3, top_p=0.7) == [True, True, False, False]
    # temperature 0.5 squares and renormalises: [0.685, 0.247, 0.062, 0.007]
    assert kept(temperature=0.5, top_p=0.6) == [True, False, False, False]
    assert kept(temperature=0.5, top_p=0.9) == [True, True, False, False]
    # the filtered distribution is renormalised over what is kept
    q = np.exp(np.asarray(jax.nn.log_softmax(sampling_logits(logits, top_p=0.7))))[0]
    np.testing.assert_allclose(q, [0.625, 0.375, 0.0, 0.0], atol=1e-6)
    q = np.exp(np.asarray(jax.nn.log_softmax(sampling_logits(logits, temperature=0.5))))[0]
    np.testing.assert_allclose(q, np.array([0.25, 0.09, 0.0225, 0.0025]) / 0.365, rtol=1e-5)
    # ties at the boundary of the nucleus: the lower token id is kept
    tie = jnp.log(jnp.array([[0.25, 0.25, 0.25, 0.25]]))
    assert np.isfinite(np.asarray(sampling_logits(tie, top_p=0.5)))[0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=64), "max_len"), (dict(top_k=0), "top_k=0"), (dict(top_k=V + 1), "top_k=33"),
    (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"), (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(eos_id=V), "eos_id=32"), (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(prompts=jnp.zeros((2, 3))), "prompts must be")])
def test_invalid_arguments_are_named(lm, kwargs, match):
    model, params, prompts, _ = lm
    args = dict(prompts=prompts, max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        sample(model, params, args.pop("prompts"), jax.random.PRNGKey(0), args.pop("max_new_tokens"), **args)
