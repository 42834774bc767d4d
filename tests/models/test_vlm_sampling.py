"""Decoding from image prompts (models.vlm_sampling): greedy KV-cache decoding equals the argmax of repeated
full forward passes on the growing sequence, log-probabilities equal a teacher-forced pass, the LM's decode
path with input embeddings, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models import vision, vlm
from jaxlab.models.lm import LM, LMConfig
from jaxlab.models.vlm_sampling import prepare_prompts, repeat_prompts, sample_vlm, vlm_response_logprobs
from jaxlab.xla_options import FAST_COMPILE

P, IMG, EOS = 4, 30, 29  # patch size; image token; end of sequence
CFG = vlm.VLMConfig(vit=vision.ViTConfig(patch_size=P, d_model=16, num_layers=1, num_heads=2, d_ff=32,
                                         attention_impl="xla"),
                    lm=LMConfig(vocab_size=31, d_model=32, num_layers=2, num_heads=2, max_len=24, attention_impl="xla"),
                    image_token=IMG)
MODEL = vlm.VLM(CFG)
R = 6  # response length
forced_logprobs = jax.jit(functools.partial(vlm_response_logprobs, MODEL), static_argnums=3,
                          compiler_options=FAST_COMPILE)


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def full_forward(params, prompts, tokens):
    """Logits [B, L, V] of one full forward pass (no cache) over the prompts' tokens followed by ``tokens``."""
    slots = jnp.concatenate([prompts.image_slots, jnp.full(tokens.shape, -1, jnp.int32)], axis=1)
    return MODEL.apply({"params": params}, jnp.concatenate([prompts.tokens, tokens], axis=1), prompts.images,
                       slots)[0]


def prompts():
    """Two prompts of one expanded length from images of different resolutions: an 8x16 image (2x4 patches ->
    2 merged tokens) and a 16x8 one (4x2 patches -> 2 tokens), text before and after the image."""
    rng = np.random.default_rng(0)
    return [vlm.VLMExample((rng.random((8, 16, 3)).astype(np.float32),), np.array([3, IMG, 5, 6, 7])),
            vlm.VLMExample((rng.random((16, 8, 3)).astype(np.float32),), np.array([4, IMG, 8, 9, 2]))]


@pytest.fixture(scope="module")
def setup():
    batch = prepare_prompts(prompts(), image_token=IMG, patch_size=P)
    variables = jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.asarray(batch.tokens), batch.images,
                                    jnp.asarray(batch.image_slots))
    return batch, nn.unbox(variables["params"])


def test_prepare_prompts_layout(setup):
    batch, _ = setup
    assert batch.tokens.shape == (2, 6)  # 5 tokens, the placeholder expanded to 2 slots
    np.testing.assert_array_equal(batch.tokens[0], [3, IMG, IMG, 5, 6, 7])
    np.testing.assert_array_equal(batch.image_slots, [[-1, 0, 1, -1, -1, -1], [-1, 2, 3, -1, -1, -1]])
    assert batch.images.merge_index.shape == (4, 4)


def test_greedy_equals_argmax_of_full_forward_passes(setup):
    batch, params = setup
    group = repeat_prompts(batch, 3)  # the shape every sampling call of this file uses: one compile
    out = sample_vlm(MODEL, params, group, jax.random.PRNGKey(1), R, temperature=0.0, eos_id=EOS)
    # the growing sequence, a full forward pass each time (no cache): response tokens 0..t-1 then zeros to a
    # fixed length (one compile); the LM is causal, so the logits at the last real position see only the prefix
    Lp, grown = group.tokens.shape[1], jnp.zeros((6, R), jnp.int32)
    for t in range(R):
        logits = full_forward(params, group, grown)
        grown = grown.at[:, t].set(jnp.argmax(logits[:, Lp + t - 1], axis=-1).astype(jnp.int32))
    live = np.asarray(out.mask) > 0
    np.testing.assert_array_equal(np.asarray(out.response)[live], np.asarray(grown)[live])
    np.testing.assert_array_equal(np.asarray(out.response)[~live], 0)
    np.testing.assert_array_equal(out.tokens[:, :6], group.tokens)
    np.testing.assert_array_equal(out.logps, 0.0)  # greedy: log q = 0
    # the examples as they come (prepared inside) give the same
    again = sample_vlm(MODEL, params, prompts() * 3, jax.random.PRNGKey(1), R, temperature=0.0, eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(again.response)[[0, 2, 4, 1, 3, 5]], out.response)


def test_logprobs_equal_teacher_forced_pass(setup):
    batch, params = setup
    group = repeat_prompts(batch, 3)  # 6 rows sharing 2 images
    out = sample_vlm(MODEL, params, group, jax.random.PRNGKey(2), R, temperature=1.0, eos_id=EOS, pad_id=0)
    forced = forced_logprobs(params, group, out.response, 1.0)
    np.testing.assert_allclose(out.model_logps, forced * out.mask, atol=2e-5)
    np.testing.assert_allclose(out.logps, out.model_logps, atol=2e-5)  # T = 1, no filtering: the same distribution
    # rows stop at EOS: mask 1 up to and including it, PAD after
    for row, mask in zip(np.asarray(out.response), np.asarray(out.mask)):
        stop = np.flatnonzero(row == EOS)
        n = stop[0] + 1 if len(stop) else R
        np.testing.assert_array_equal(mask, np.arange(R) < n)
        np.testing.assert_array_equal(row[n:], 0)
    # at T = 0.5 the tempered log-probabilities equal the tempered teacher-forced pass
    cold = sample_vlm(MODEL, params, group, jax.random.PRNGKey(3), R, temperature=0.5, eos_id=EOS)
    np.testing.assert_allclose(cold.logps, forced_logprobs(params, group, cold.response, 0.5) * cold.mask,
                               atol=2e-5)
    # the image matters: other images give other log-probabilities of the same response
    other = group._replace(images=group.images._replace(patches=group.images.patches[..., ::-1]))
    assert not np.allclose(forced, forced_logprobs(params, other, out.response, 1.0), atol=1e-4)


def test_lm_decode_with_embeds_equals_forward():
    lm = LM(CFG.lm)
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    embeds = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
    mask = jnp.array([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], bool)
    params = jax.jit(lm.init)(jax.random.PRNGKey(1), tokens)["params"]
    full, _ = jax.jit(lambda p: lm.apply({"params": p}, tokens, embeds=embeds, embeds_mask=mask))(params)
    cached, cache = jax.jit(lambda p: lm.apply({"params": p}, tokens, lm.init_cache(2, 8), embeds=embeds,
                                               embeds_mask=mask, method=LM.decode))(params)
    np.testing.assert_allclose(cached, full, atol=1e-5)
    assert int(cache.index) == 5
    with pytest.raises(ValueError, match="embeds and embeds_mask must be given together"):
        lm.apply({"params": params}, tokens, lm.init_cache(2, 8), embeds=embeds, method=LM.decode)
    with pytest.raises(ValueError, match=r"embeds must have shape \(2, 5, 32\)"):
        lm.apply({"params": params}, tokens, lm.init_cache(2, 8), embeds=embeds[:, :4], embeds_mask=mask,
                 method=LM.decode)


def test_errors(setup):
    batch, params = setup
    rng = np.random.default_rng(0)
    short = vlm.VLMExample((rng.random((8, 8, 3)).astype(np.float32),), np.array([3, IMG, 5]))
    with pytest.raises(ValueError, match=r"lengths \[3, 6\]"):
        prepare_prompts([prompts()[0], short], image_token=IMG, patch_size=P)
    with pytest.raises(ValueError, match=r"prompts\[0\]: tokens hold 0 image placeholders"):
        prepare_prompts([vlm.VLMExample(short.images, np.array([3, 5]))], image_token=IMG, patch_size=P)
    with pytest.raises(ValueError, match=r"prompts\[0\]: image 0: patch grid \(1, 2\) must be .*divisible by factor=2"):
        prepare_prompts([vlm.VLMExample((np.zeros((4, 8, 3)),), np.array([IMG]))], image_token=IMG, patch_size=P)
    with pytest.raises(ValueError, match="exceeds lm.max_len=24"):
        sample_vlm(MODEL, params, batch, jax.random.PRNGKey(0), 19)
    with pytest.raises(ValueError, match="temperature=-1"):
        sample_vlm(MODEL, params, batch, jax.random.PRNGKey(0), 2, temperature=-1)
    with pytest.raises(ValueError, match="eos_id=31"):
        sample_vlm(MODEL, params, batch, jax.random.PRNGKey(0), 2, eos_id=31)
