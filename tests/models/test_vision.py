"""Vision encoder: NaViT packing fields and errors, packed = alone, 2D RoPE relative positions, interpolated
absolute positions, pixel (un)shuffle, projector, gradients, jit, config validation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models import vision
from jaxlab.xla_options import FAST_COMPILE

P = 2
CFG = vision.ViTConfig(patch_size=P, d_model=16, num_layers=2, num_heads=2, d_ff=32, abs_pos_grid=3)
VIT = vision.ViT(CFG)
_apply = jax.jit(VIT.apply, compiler_options=FAST_COMPILE)


def coded_image(i, patch_grid, channels=3):
    """An image whose pixel (y, x, c) holds ``1000 i + 100 y + 10 x + c``, with a (h, w) patch grid."""
    H, W = patch_grid[0] * P, patch_grid[1] * P
    y, x, c = np.meshgrid(np.arange(H), np.arange(W), np.arange(channels), indexing="ij")
    return (1000 * i + 100 * y + 10 * x + c).astype(np.float32)


# images of 4, 6 and 4 patches: first-fit decreasing puts image 1 alone in row 0 and images 0, 2 in row 1
# (in input order, images 0 and 2 would share row 0 and image 1 go to row 1)
GRIDS = [(2, 2), (2, 3), (4, 1)]
IMAGES = [coded_image(i, g) for i, g in enumerate(GRIDS)]


def test_pack_images_fields_on_a_hand_made_example():
    packed = vision.pack_images(IMAGES, patch_size=P, max_len=8)
    np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 2, 2, 2, 2]])
    np.testing.assert_array_equal(packed.image_ids, [[1, 1, 1, 1, 1, 1, -1, -1], [0, 0, 0, 0, 2, 2, 2, 2]])
    np.testing.assert_array_equal(packed.positions[..., 0], [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 1, 2, 3]])
    np.testing.assert_array_equal(packed.positions[..., 1], [[0, 1, 2, 0, 1, 2, 0, 0], [0, 1, 0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(packed.grid_hw, GRIDS)
    assert packed.patches.shape == (2, 8, P * P * 3) and packed.patches.dtype == np.float32
    assert packed.wasted_fraction == pytest.approx(2 / 16)
    # row 1, slot 5: image 2's patch (1, 0): pixels y = 2, 3, x = 0, 1, row-major [P, P, C]
    np.testing.assert_array_equal(packed.patches[1, 5], [2200, 2201, 2202, 2210, 2211, 2212,
                                                         2300, 2301, 2302, 2310, 2311, 2312])
    np.testing.assert_array_equal(packed.patches[0, 6:], 0)
    for b, t in zip(*np.nonzero(packed.image_ids >= 0)):
        (r, c), image = packed.positions[b, t], IMAGES[packed.image_ids[b, t]]
        np.testing.assert_array_equal(packed.patches[b, t], image[r * P:(r + 1) * P, c * P:(c + 1) * P].ravel())
    # fixed batch size; padding rows are all padding
    padded = vision.pack_images(IMAGES, patch_size=P, max_len=8, num_rows=3)
    np.testing.assert_array_equal(padded.segment_ids[:2], packed.segment_ids)
    assert (padded.segment_ids[2] == 0).all() and (padded.image_ids[2] == -1).all()
    assert padded.wasted_fraction == pytest.approx(10 / 24)
    for x, ref in zip(vision.unpack_images(packed.patches, packed), IMAGES):
        assert x.shape == (ref.shape[0] * ref.shape[1] // P**2, P * P * 3)


def test_greyscale_is_one_channel():
    grey = coded_image(0, (2, 2), channels=1)[..., 0]  # [H, W]
    packed = vision.pack_images([grey, grey[:, :2, None]], patch_size=P, max_len=8)
    assert packed.patches.shape == (1, 8, P * P)
    np.testing.assert_array_equal(packed.patches[0, 1], [20, 30, 120, 130])
    with pytest.raises(ValueError, match=r"images\[1\] has 3 channels .* images\[0\] has 1"):
        vision.pack_images([grey, IMAGES[0]], patch_size=P, max_len=8)


@pytest.mark.parametrize("images, kwargs, match", [
    ([np.zeros((4, 4, 3)), np.zeros((3, 4, 3))], {}, r"images\[1\] of shape \(3, 4, 3\).*multiples of patch_size=2"),
    ([np.zeros((4, 4, 3)), np.zeros((8, 6, 3))], {}, r"images\[1\] of shape \(8, 6, 3\) has 4x3=12 patches, more than "
                                                     r"max_len=8"),
    ([np.zeros((4, 4, 3)), np.zeros((4, 4, 4))], {}, r"images\[1\] has 4 channels \(shape \(4, 4, 4\)\), images\[0\] "
                                                     r"has 3"),
    ([np.zeros((4, 4, 3)), np.zeros((0, 4, 3))], {}, r"images\[1\] is empty: shape \(0, 4, 3\)"),
    ([np.zeros((4, 4, 3)), np.zeros((1, 4, 4, 3))], {}, r"images\[1\] must be \[H, W, C\].*shape \(1, 4, 4, 3\)"),
    ([np.zeros(4)], {}, r"images\[0\] must be \[H, W, C\]"),
    ([], {}, "at least one image"),
    (IMAGES, {"num_rows": 1}, r"num_rows=1: the images need 2 rows"),
    (IMAGES, {"max_len": 0}, r"max_len=0 must be an int >= 1"),
    (IMAGES, {"patch_size": 0}, r"patch_size=0 must be an int >= 1"),
])
def test_pack_images_errors(images, kwargs, match):
    kwargs = {"patch_size": P, "max_len": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        vision.pack_images(images, **kwargs)


_init = jax.jit(lambda key, *inputs: nn.unbox(VIT.init(key, *inputs)), compiler_options=FAST_COMPILE)


def _variables(packed, key=jax.random.PRNGKey(0)):
    return _init(key, packed.patches, packed.segment_ids, packed.positions)


def test_packed_image_encodes_as_it_does_alone():
    rng = np.random.default_rng(0)
    images = [rng.normal(size=img.shape).astype(np.float32) for img in IMAGES]
    packed = vision.pack_images(images, patch_size=P, max_len=8)
    variables = _variables(packed)
    out = _apply(variables, packed.patches, packed.segment_ids, packed.positions)  # [2, 8, d_model]
    assert out.shape == (2, 8, CFG.d_model)
    np.testing.assert_array_equal(np.asarray(out)[packed.segment_ids == 0], 0.0)
    for i, feats in enumerate(vision.unpack_images(out, packed)):
        alone = vision.pack_images([images[i]], patch_size=P, max_len=8)
        ref = _apply(variables, alone.patches, alone.segment_ids, alone.positions)[0, :len(feats)]
        np.testing.assert_allclose(feats, ref, atol=1e-5, rtol=1e-5, err_msg=f"image {i}")


def test_rope_2d_depends_only_on_the_offset():
    D = 16
    q, k = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 1, 1, D))

    def score(p, p_k):
        rq = vision.apply_rope_2d(q, jnp.array([[p]]))
        rk = vision.apply_rope_2d(k, jnp.array([[p_k]]))
        return float(jnp.sum(rq * rk))

    base = score((3, 5), (1, 2))
    for shift in [(1, 0), (0, 4), (7, 3), (-2, -1)]:
        moved = score((3 + shift[0], 5 + shift[1]), (1 + shift[0], 2 + shift[1]))
        assert moved == pytest.approx(base, rel=1e-4, abs=1e-4), shift
    # both axes count: changing the row offset or the column offset alone changes the score
    assert abs(score((4, 5), (1, 2)) - base) > 1e-3 and abs(score((3, 6), (1, 2)) - base) > 1e-3
    # half the frequencies on rows, half on columns, each those of a D/2-wide 1D RoPE
    angles = vision.rope_angles_2d(jnp.array([[[3, 5]]]), D)[0, 0]  # [D/2]
    inv_freq = 10000.0 ** (-jnp.arange(D // 4) * 4 / D)
    np.testing.assert_allclose(angles, jnp.concatenate([3 * inv_freq, 5 * inv_freq]), rtol=1e-6)
    with pytest.raises(ValueError, match="head dim divisible by 4"):
        vision.rope_angles_2d(jnp.zeros((1, 1, 2)), 6)


def test_abs_pos_embedding_is_bilinear_resize_per_image():
    table = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 4))
    images = [np.zeros((h * P, w * P, 3), np.float32) for h, w in [(2, 3), (5, 1), (1, 1), (4, 4)]]
    packed = vision.pack_images(images, patch_size=P, max_len=16)
    grids = [tuple(int(s) for s in hw) for hw in packed.grid_hw]

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def embeddings(table, segment_ids, positions):
        emb = vision.abs_pos_embedding(table, positions, vision.grid_sizes(segment_ids, positions))  # [B, L, 4]
        return emb, [jax.image.resize(table, (h, w, 4), "bilinear", antialias=False) for h, w in grids]

    emb, wants = embeddings(table, packed.segment_ids, packed.positions)
    for i, (got, want, (h, w)) in enumerate(zip(vision.unpack_images(emb, packed), wants, grids)):
        np.testing.assert_allclose(got, want.reshape(h * w, 4), atol=1e-6, err_msg=f"image {i} grid {(h, w)}")


def test_pixel_shuffle_order_and_round_trip():
    x = jnp.arange(16.0)[:, None]  # a 4 x 4 grid, D = 1
    np.testing.assert_array_equal(vision.pixel_shuffle(x, (4, 4)),
                                  [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
    y = jax.random.normal(jax.random.PRNGKey(3), (2, 4 * 6, 5))  # leading axes pass through
    merged = vision.pixel_shuffle(y, (4, 6))
    assert merged.shape == (2, 6, 20)
    np.testing.assert_array_equal(vision.pixel_unshuffle(merged, (4, 6)), y)
    assert vision.pixel_shuffle(y, (4, 6), factor=1).shape == y.shape
    with pytest.raises(ValueError, match=r"grid_hw=\(3, 8\) must be divisible by factor=2"):
        vision.pixel_shuffle(y, (3, 8))
    with pytest.raises(ValueError, match=r"grid_hw=\(4, 4\) has 16 patches, x has 24"):
        vision.pixel_shuffle(y, (4, 4))


def test_projector_shapes():
    x = jnp.ones((3, 7, 64))
    for hidden, up in [(None, (64, 64)), (48, (64, 48))]:
        proj = vision.Projector(out_features=32, hidden=hidden)
        params = jax.eval_shape(lambda key: nn.unbox(proj.init(key, x))["params"], jax.random.PRNGKey(0))
        assert jax.tree.map(jnp.shape, params) == {
            "norm": {"scale": (64,), "bias": (64,)}, "up": {"kernel": up, "bias": (up[1],)},
            "down": {"kernel": (up[1], 32), "bias": (32,)}}
    out = jax.jit(lambda x: proj.apply(proj.init(jax.random.PRNGKey(0), x), x))(x)  # [3, 7, 32]
    assert out.shape == (3, 7, 32) and bool(jnp.all(jnp.isfinite(out)))


def test_gradients_reach_every_parameter_under_jit():
    packed = vision.pack_images(IMAGES, patch_size=P, max_len=8)
    packed = packed._replace(patches=packed.patches / 1000.0)
    variables = _variables(packed)

    def loss(params, packed):  # PackedImages is a pytree: it goes through jit as one argument
        out = VIT.apply({"params": params}, packed.patches, packed.segment_ids, packed.positions)
        return jnp.sum(jnp.sin(out))

    value, grads = jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)(variables["params"], packed)
    assert np.isfinite(value)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        assert float(jnp.max(jnp.abs(g))) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    assert "abs_pos" in grads


def test_vit_input_errors():
    packed = vision.pack_images(IMAGES, patch_size=P, max_len=8)
    with pytest.raises(ValueError, match=r"patches must be \[B, L, P\*P\*C\] = \[B, L, 12\]"):
        VIT.init(jax.random.PRNGKey(0), packed.patches[..., :4], packed.segment_ids, packed.positions)
    with pytest.raises(ValueError, match=r"positions must have shape \(2, 8, 2\)"):
        VIT.init(jax.random.PRNGKey(0), packed.patches, packed.segment_ids, packed.positions[..., 0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=30, num_heads=4), "d_model=30 must be divisible by num_heads=4"),
    (dict(d_model=24, num_heads=4), "head dim .* = 6 must be divisible by 4"),
    (dict(patch_size=0), "patch_size=0 must be an int >= 1"),
    (dict(abs_pos_grid=0), "abs_pos_grid=0 must be an int >= 1"),
    (dict(mlp="tanh"), "mlp='tanh' must be one of"),
    (dict(norm="batch"), "norm='batch' must be one of"),
    (dict(attention_impl="flash"), "attention_impl='flash' must be one of"),
    (dict(rope_base=0.0), "rope_base=0.0 must be > 0"),
    (dict(dtype="float8"), "dtype='float8' must be one of"),
])
def test_config_validation(kwargs, match):
    base = dict(patch_size=P, d_model=16, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match=match):
        vision.ViTConfig(**{**base, **kwargs})
