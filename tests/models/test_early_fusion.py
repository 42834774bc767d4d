"""Early fusion (Chameleon): the fused vocabulary and token layout, the loss mask on answers only, the z-loss
by hand, and image-token generation that never leaves the codebook range and decodes to pixels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.experiments import _vlm_fusion
from jaxlab.experiments.vlm_train import ANSWER_ID, EOS_ID, VOCAB_SIZE
from jaxlab.models import early_fusion
from jaxlab.models.early_fusion import FusionVocab
from jaxlab.models.lm import LM, init_params
from jaxlab.models.vision_data import ShapesConfig, make_scenes
from jaxlab.models.vqvae import VQVAE, VQVAEConfig


def test_vocabulary_and_token_layout():
    vocab = FusionVocab(text_vocab=VOCAB_SIZE, codebook_size=16)
    assert (vocab.boi, vocab.eoi, vocab.image_offset, vocab.size) == (259, 260, 261, 277)
    codes = np.array([[0, 15], [7, 3]])
    block = early_fusion.image_block(codes, vocab)
    np.testing.assert_array_equal(block, [259, 261, 276, 268, 264, 260])  # <boi>, codes + 261 in raster order, <eoi>
    np.testing.assert_array_equal(vocab.codes_of(block[1:-1]), codes.reshape(-1))
    # text ids, <boi>/<eoi> and image ids are disjoint and cover the vocabulary
    text, image = set(range(VOCAB_SIZE)), set(vocab.image_tokens(np.arange(16)).tolist())
    assert not text & image and not {vocab.boi, vocab.eoi} & (text | image)
    assert text | image | {vocab.boi, vocab.eoi} == set(range(vocab.size))
    assert early_fusion.fusion_lm_config(vocab, d_model=16, num_heads=2).qk_norm
    with pytest.raises(ValueError, match=r"codes must be ints in \[0, codebook_size=16\), got .* range \[0, 16\]"):
        vocab.image_tokens(np.array([0, 16]))
    with pytest.raises(ValueError, match=r"must be image ids in \[261, 277\), got range \[259, 261\]"):
        vocab.codes_of(np.array([259, 261]))
    with pytest.raises(ValueError, match=r"prompt ids must be text ids in \[0, text_vocab=259\)"):
        early_fusion.fusion_example(codes, [300], [1], vocab)


def test_qa_example_loss_mask_is_on_the_answer_only():
    vocab = FusionVocab(text_vocab=VOCAB_SIZE, codebook_size=16)
    scene = make_scenes(jax.random.PRNGKey(0), 1, ShapesConfig(min_size=24, max_size=24))[0]
    question, answer = scene.qa[0]
    codes = np.arange(16).reshape(4, 4) % 16
    tokens, loss = _vlm_fusion.fusion_qa_example(codes, scene, 0, vocab)
    n_q = len(question)
    assert tokens[0] == vocab.boi and tokens[17] == vocab.eoi and tokens[18 + n_q] == ANSWER_ID
    assert bytes(tokens[18:18 + n_q].astype(np.uint8).tolist()).decode() == question
    np.testing.assert_array_equal(np.flatnonzero(loss), np.arange(19 + n_q, len(tokens)))
    assert bytes(tokens[loss][:-1].astype(np.uint8).tolist()).decode() == answer and tokens[loss][-1] == EOS_ID
    with_image = _vlm_fusion.fusion_qa_example(codes, scene, 0, vocab, image_loss=True)[1]
    np.testing.assert_array_equal(np.flatnonzero(with_image), np.r_[1:18, 19 + n_q:len(tokens)])

    batch = early_fusion.fusion_batch([(tokens, loss)], seq_len=64, num_rows=2)
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (2, 64)
    n = len(tokens) - 1
    np.testing.assert_array_equal(batch["inputs"][0, :n], tokens[:-1])
    np.testing.assert_array_equal(batch["targets"][0, :n], tokens[1:])
    # the counted targets are exactly the answer bytes and <eos>: no image, question or padding target
    np.testing.assert_array_equal(batch["targets"][batch["mask"]], tokens[loss])
    np.testing.assert_array_equal(batch["example_ids"][0], np.where(np.arange(64) < n, 0, -1))
    assert not batch["mask"][1].any() and (batch["example_ids"][1] == -1).all()
    with pytest.raises(ValueError, match=r"example 0 has \d+ tokens, more than seq_len \+ 1 = 11"):
        early_fusion.fusion_batch([(tokens, loss)], seq_len=10, num_rows=1)


def test_z_loss_by_hand():
    logits = jnp.array([[[0.0, 0.0], [1.0, 2.0], [5.0, 5.0]]])  # [1, 3, 2]
    mask = jnp.array([[1.0, 1.0, 0.0]])
    log_z = np.log([2.0, np.e + np.e ** 2])
    assert float(early_fusion.z_loss(logits, mask)) == pytest.approx(np.mean(log_z ** 2), rel=1e-6)
    targets = jnp.array([[0, 1, 0]])
    loss, metrics = early_fusion.fusion_loss(logits, targets, mask, z_coef=0.1)
    ce = np.mean([np.log(2.0), log_z[1] - 2.0])
    assert float(metrics["cross_entropy"]) == pytest.approx(ce, rel=1e-6)
    assert float(loss) == pytest.approx(ce + 0.1 * np.mean(log_z ** 2), rel=1e-6)
    assert float(early_fusion.z_loss(logits, jnp.zeros((1, 3)))) == 0.0


def test_constrained_generation_emits_codes_only_and_decodes():
    vocab = FusionVocab(text_vocab=40, codebook_size=8)  # 42 non-image ids against 8 image ids
    lm = LM(early_fusion.fusion_lm_config(vocab, d_model=16, num_layers=1, num_heads=2, max_len=24))
    prompts = jnp.array([[1, 2, vocab.boi], [3, 4, vocab.boi]])
    params = init_params(lm, jax.random.PRNGKey(0), prompts)
    # push the head towards text: unconstrained, nearly every token would be text
    params = {**params, "embed": {"embedding": params["embed"]["embedding"].at[:vocab.boi].multiply(5.0)}}
    codes = early_fusion.generate_image_codes(lm, params, prompts, jax.random.PRNGKey(1), vocab, (4, 4))
    assert codes.shape == (2, 4, 4) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < vocab.codebook_size
    # greedy decoding with the KV cache = the argmax over image ids of a full forward pass at every position
    greedy = early_fusion.generate_image_codes(lm, params, prompts, jax.random.PRNGKey(1), vocab, (4, 4),
                                               temperature=0.0)
    tokens = jnp.concatenate([prompts, greedy.reshape(2, -1) + vocab.image_offset], axis=1)  # [2, 19]
    logits, _ = lm.apply({"params": params}, tokens)
    expected = jnp.argmax(early_fusion.image_logits(logits[:, 2:-1], vocab), axis=-1) - vocab.image_offset
    np.testing.assert_array_equal(greedy.reshape(2, -1), expected)
    unconstrained = jnp.argmax(logits[:, 2:-1], axis=-1)
    assert (unconstrained < vocab.image_offset).mean() > 0.5  # the constraint is what keeps the codes in range
    vq = VQVAE(VQVAEConfig(codebook_size=8, code_dim=4, hidden=8, downsample=2))
    vq_params = jax.jit(vq.init)(jax.random.PRNGKey(2), jnp.zeros((1, 8, 8, 3)))["params"]
    assert vq.apply({"params": vq_params}, codes, method=VQVAE.decode).shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match=r"grid=\(5, 5\) after a prompt of 3 tokens must fit max_len=24"):
        early_fusion.generate_image_codes(lm, params, prompts, jax.random.PRNGKey(1), vocab, (5, 5))
