"""VLM (Kimi-VL projector model): the LM's embeds path, placeholder expansion, the one-gather pixel shuffle,
packed batches (layout, loss mask, packed = alone), gradients into every part, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models import vision, vlm
from jaxlab.models.lm import LM, LMConfig, init_params, next_token_loss
from jaxlab.models.packing import pack_documents
from jaxlab.xla_options import FAST_COMPILE

P, IMG = 2, 60  # patch size; image token id
LM_CFG = LMConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, max_len=24, attention_impl="xla")
CFG = vlm.VLMConfig(vit=vision.ViTConfig(patch_size=P, d_model=16, num_layers=1, num_heads=2, d_ff=32,
                                         attention_impl="xla"),
                    lm=LM_CFG, image_token=IMG)
MODEL = vlm.VLM(CFG)
SHAPE = dict(seq_len=24, patch_size=P, image_len=24, image_token=IMG, num_rows=1, image_rows=2, image_tokens=6)


def image(rng, h, w):
    """A random image with a (h, w) patch grid."""
    return rng.random((h * P, w * P, 3)).astype(np.float32)


def examples():
    rng = np.random.default_rng(0)
    # example 0: text, a 2x4-patch image (2 merged tokens), text; example 1: a 4x4-patch image (4 tokens), text
    ex0 = vlm.VLMExample((image(rng, 2, 4),), np.array([5, 6, IMG, 7, 8, 9]))
    ex1 = vlm.VLMExample((image(rng, 4, 4),), np.array([IMG, 10, 11, 12, 13]),
                         loss_mask=np.array([0, 0, 0, 1, 1], bool))
    return ex0, ex1


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _logits(params, batch):
    return vlm.vlm_apply(MODEL, params, batch)[0]


@pytest.fixture(scope="module")
def params():
    return vlm.init_vlm_params(MODEL, jax.random.PRNGKey(0), vlm.pack_examples(examples(), **SHAPE))


def test_lm_embeds_path_equals_token_path():
    model = LM(LM_CFG)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, LM_CFG.vocab_size)
    params = init_params(model, jax.random.PRNGKey(0), tokens)
    run = jax.jit(lambda embeds, mask: model.apply({"params": params}, tokens, embeds=embeds, embeds_mask=mask)[0],
                  compiler_options=FAST_COMPILE)
    apply = lambda embeds=None, embeds_mask=None: run(embeds, embeds_mask)  # noqa: E731
    plain = apply()
    mask = jnp.arange(8)[None, :] % 3 == 0
    mask = jnp.broadcast_to(mask, (2, 8))
    same = apply(embeds=params["embed"]["embedding"][tokens], embeds_mask=mask)
    np.testing.assert_allclose(same, plain, atol=1e-5)
    # the embeds are read where the mask is set, and only there
    other = jax.random.normal(jax.random.PRNGKey(2), (2, 8, LM_CFG.d_model))
    np.testing.assert_allclose(apply(embeds=other, embeds_mask=jnp.zeros((2, 8), bool)), plain, atol=1e-5)
    changed = apply(embeds=other, embeds_mask=mask)
    assert not np.allclose(changed[:, 0], plain[:, 0], atol=1e-3)  # slot 0 reads `other`
    with pytest.raises(ValueError, match=r"embeds must have shape \(2, 8, 32\) and embeds_mask \(2, 8\).*got "
                                         r"embeds \(2, 8, 16\)"):
        apply(embeds=other[..., :16], embeds_mask=mask)
    with pytest.raises(ValueError, match=r"embeds_mask \(2, 8\).*got embeds \(2, 8, 32\) and embeds_mask \(2, 7\)"):
        apply(embeds=other, embeds_mask=mask[:, :7])
    with pytest.raises(ValueError, match="must be given together.*embeds_mask=None"):
        apply(embeds=other)


def test_expand_image_placeholders_counts_and_positions():
    out = vlm.expand_image_placeholders(np.array([1, IMG, 2, IMG, 3]), [(2, 4), (4, 6)], IMG)
    # image 0: (2/2)*(4/2) = 2 slots, image 1: (4/2)*(6/2) = 6 slots
    np.testing.assert_array_equal(out.tokens, [1, IMG, IMG, 2] + [IMG] * 6 + [3])
    np.testing.assert_array_equal(out.image_index, [-1, 0, 0, -1] + [1] * 6 + [-1])
    np.testing.assert_array_equal(out.token_index, [-1, 0, 1, -1, 0, 1, 2, 3, 4, 5, -1])
    np.testing.assert_array_equal(out.source, [0, 1, 1, 2, 3, 3, 3, 3, 3, 3, 4])
    assert len(vlm.expand_image_placeholders(np.array([IMG]), [(4, 4)], IMG, factor=4).tokens) == 1
    with pytest.raises(ValueError, match=r"2 image placeholders \(image_token=60\) but 1 images"):
        vlm.expand_image_placeholders(np.array([IMG, IMG]), [(2, 2)], IMG)
    with pytest.raises(ValueError, match=r"image 0: patch grid \(2, 3\) must be .* divisible by factor=2"):
        vlm.expand_image_placeholders(np.array([IMG]), [(2, 3)], IMG)


def test_merge_indices_equal_pixel_shuffle():
    rng = np.random.default_rng(1)
    packed = vision.pack_images([image(rng, 2, 4), image(rng, 4, 2), image(rng, 2, 2), image(rng, 4, 4)],
                                patch_size=P, max_len=16)
    x = rng.standard_normal(packed.segment_ids.shape + (3,)).astype(np.float32)  # [B, L, D]
    merge_index, offsets = vlm.merge_indices(packed)
    merged = x.reshape(-1, 3)[merge_index].reshape(len(merge_index), 12)  # [T, 4 D]
    for i, feats in enumerate(vision.unpack_images(x, packed)):
        ref = np.asarray(vision.pixel_shuffle(jnp.asarray(feats), packed.grid_hw[i]))
        np.testing.assert_array_equal(merged[offsets[i]:offsets[i + 1]], ref)
    assert offsets[-1] == 2 + 2 + 1 + 4


def test_pack_examples_layout_and_loss_mask():
    ex0, ex1 = examples()
    batch = vlm.pack_examples([ex0, ex1], **SHAPE)
    # example 0 expands to 7 slots, example 1 to 8: one row, best fit puts them in input order
    np.testing.assert_array_equal(batch["inputs"][0, :15], [5, 6, IMG, IMG, 7, 8, 9, IMG, IMG, IMG, IMG,
                                                            10, 11, 12, 13])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 7 + [2] * 8 + [0] * 9)
    np.testing.assert_array_equal(batch["positions"][0, :15], list(range(7)) + list(range(8)))
    np.testing.assert_array_equal(batch["example_ids"][0], [0] * 7 + [1] * 8 + [-1] * 9)
    # the packer's layout for documents of the expanded lengths, no slot more
    docs = pack_documents([np.ones(7, np.int32), np.ones(8, np.int32)], 24, strategy="best_fit")
    np.testing.assert_array_equal(batch["segment_ids"], docs["segment_ids"])
    np.testing.assert_array_equal(batch["positions"], docs["positions"])
    # image slots: example 0's 2 merged tokens come first, then example 1's 4
    np.testing.assert_array_equal(batch["image_slots"][0, :15], [-1, -1, 0, 1, -1, -1, -1, 2, 3, 4, 5, -1, -1, -1, -1])
    np.testing.assert_array_equal(batch["targets"][0, :14], batch["inputs"][0, 1:15])
    # mask (aligned with targets): no image-slot target (so not 6 -> first slot), no target across examples,
    # example 1 counts its last two tokens only; the last image slot predicts 7 and counts
    expected = np.zeros(24, bool)
    expected[[0, 3, 4, 5, 12, 13]] = True
    np.testing.assert_array_equal(batch["mask"][0], expected)
    assert not (batch["mask"][0, :-1] & (batch["image_slots"][0, 1:] >= 0)).any()
    assert batch["patches"].shape == (2, 24, P * P * 3) and batch["merge_index"].shape == (6, 4)
    # both images share image row 0 (so packed = alone below checks the ViT's segments too), in input order
    np.testing.assert_array_equal(batch["patch_segment_ids"], [[1] * 8 + [2] * 16, [0] * 24])
    np.testing.assert_array_equal(batch["merge_index"][0], [0, 1, 4, 5])  # patches (0,0),(0,1),(1,0),(1,1) of 2x4
    np.testing.assert_array_equal(batch["merge_index"][2], [8, 9, 12, 13])  # the first token of the 4x4 image
    # a text-only example: no image slots; a batch without images keeps the fixed shapes
    text = vlm.pack_examples([vlm.VLMExample((), np.array([1, 2, 3]))], **SHAPE)
    assert (text["image_slots"] == -1).all() and text["mask"][0].tolist()[:3] == [True, True, False]
    assert text["patches"].shape == (2, 24, 12) and text["merge_index"].shape == (6, 4)


def test_packed_examples_equal_examples_alone(params):
    ex0, ex1 = examples()
    packed = vlm.pack_examples([ex0, ex1], **SHAPE)
    logits = _logits(params, packed)
    for e, ex in enumerate((ex0, ex1)):
        alone = vlm.pack_examples([ex], **SHAPE)
        n = int((alone["example_ids"][0] == 0).sum())
        ref = _logits(params, alone)[0, :n]
        np.testing.assert_allclose(logits[0][packed["example_ids"][0] == e], ref, atol=2e-5, rtol=2e-5)


def test_gradients_reach_vit_projector_and_lm(params):
    batch = vlm.pack_examples(examples(), **SHAPE)

    def loss(params, patches):
        logits, _ = vlm.vlm_apply(MODEL, params, {**batch, "patches": patches})
        return next_token_loss(logits, batch["targets"], batch["mask"])[0]

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=FAST_COMPILE)
    grads, dpatches = grad(params, jnp.asarray(batch["patches"]))
    norms = {k: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(v)))) for k, v in grads.items()}
    assert set(norms) == {"vit", "projector", "lm"} and all(n > 0 for n in norms.values()), norms
    assert float(jnp.abs(grads["vit"]["patch_embed"]["kernel"]).sum()) > 0
    # both images' patches get gradient (each example's loss reads its own image); padding gets none
    per_slot = np.asarray(jnp.abs(dpatches).sum(-1))  # [Bv, Lv]
    seg = batch["patch_segment_ids"]
    assert (per_slot[seg == 0] == 0).all() and (per_slot[0, seg[0] == 1] > 0).any()
    assert (per_slot[0, seg[0] == 2] > 0).any()


def test_errors():
    ex0, ex1 = examples()
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=r"examples\[1\]: tokens hold 2 image placeholders .* but 1 images"):
        vlm.pack_examples([ex0, vlm.VLMExample(ex1.images, np.array([IMG, 3, IMG]))], **SHAPE)
    with pytest.raises(ValueError, match=r"examples\[0\] needs 27 slots .* 1 images expanded to 16 image slots\), "
                                         r"more than a row of seq_len=24"):
        vlm.pack_examples([vlm.VLMExample((image(rng, 8, 8),), np.array([IMG] + [3] * 11))],
                          **{**SHAPE, "image_len": 64})
    with pytest.raises(ValueError, match=r"examples\[0\].images\[0\] of shape \(10, 10, 3\) has 5x5 patches, more "
                                         r"than an image row of image_len=24"):
        vlm.pack_examples([vlm.VLMExample((image(rng, 5, 5),), np.array([IMG]))], **SHAPE)
    with pytest.raises(ValueError, match=r"examples\[0\].images\[0\] of shape \(3, 4, 3\): .* of patch_size=2"):
        vlm.pack_examples([vlm.VLMExample((np.zeros((3, 4, 3)),), np.array([IMG]))], **SHAPE)
    with pytest.raises(ValueError, match=r"examples\[0\]: image 0: patch grid \(2, 3\)"):
        vlm.pack_examples([vlm.VLMExample((image(rng, 2, 3),), np.array([IMG]))], **SHAPE)
    with pytest.raises(vlm.CapacityError, match=r"need 2 rows of seq_len=24, num_rows=1"):
        vlm.pack_examples([ex1] * 4, **SHAPE)
    with pytest.raises(vlm.CapacityError, match=r"give 8 merged tokens, image_tokens=6"):
        vlm.pack_examples([ex1, vlm.VLMExample(ex1.images, np.array([IMG]))], **{**SHAPE, "image_rows": 3})
    with pytest.raises(ValueError, match=r"loss_mask has shape \(2,\), tokens \(5,\)"):
        vlm.pack_examples([vlm.VLMExample(ex1.images, ex1.tokens, np.ones(2, bool))], **SHAPE)
    with pytest.raises(ValueError, match=r"image_token=64 must be an int in \[0, lm.vocab_size=64\)"):
        vlm.VLMConfig(vit=CFG.vit, lm=LM_CFG, image_token=64)
    with pytest.raises(ValueError, match="merge_factor=0"):
        vlm.VLMConfig(vit=CFG.vit, lm=LM_CFG, image_token=IMG, merge_factor=0)
    b = vlm.pack_examples([ex0], **SHAPE)
    with pytest.raises(ValueError, match=r"image_slots must have the shape of tokens \(1, 24\), got \(1, 23\)"):
        jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), b["inputs"], vlm.images_of(b), b["image_slots"][:, 1:])
    with pytest.raises(ValueError, match=r"merge_index must be \[T, merge_factor\*\*2\] = \[T, 4\].*\(6, 3\)"):
        jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), b["inputs"],
                       vlm.images_of({**b, "merge_index": b["merge_index"][:, :3]}), b["image_slots"])
