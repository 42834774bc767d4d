"""The pointing head (models.grounding, VLM.point): candidate patches and their centres, box targets, the
pointing loss and the choice of a point by hand, and on the VLM: a query sees its own example only (packed =
alone), later tokens do not move it, gradients reach the head, the ViT and the LM, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models import grounding, vision, vlm
from jaxlab.models.lm import LMConfig
from jaxlab.xla_options import FAST_COMPILE

P, IMG, PT = 2, 60, 61  # patch size; image token id; pointing token id
CFG = vlm.VLMConfig(vit=vision.ViTConfig(patch_size=P, d_model=16, num_layers=1, num_heads=2, d_ff=32,
                                         attention_impl="xla"),
                    lm=LMConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, max_len=24,
                                attention_impl="xla"),
                    image_token=IMG, pointer_dim=8)
MODEL = vlm.VLM(CFG)
SHAPE = dict(seq_len=24, patch_size=P, image_len=24, image_token=IMG, num_rows=1, image_rows=2, image_tokens=6)


def examples():
    rng = np.random.default_rng(0)
    # example 0: a 2x4-patch image (2 merged tokens), text with the pointing token; example 1: a 4x4-patch image
    ex0 = vlm.VLMExample((rng.random((2 * P, 4 * P, 3)).astype(np.float32),), np.array([5, IMG, 7, PT, 9]))
    ex1 = vlm.VLMExample((rng.random((4 * P, 4 * P, 3)).astype(np.float32),), np.array([IMG, 10, PT, 12]))
    return ex0, ex1


def query_of(batch):
    return np.argmax(batch["inputs"] == PT, axis=1).astype(np.int32)  # [B]: the first pointing token


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _point(params, batch, query):
    return MODEL.apply({"params": params}, batch["inputs"], vlm.images_of(batch), batch["image_slots"], query,
                       batch["positions"], batch["segment_ids"], method=vlm.VLM.point)


@pytest.fixture(scope="module")
def params():
    batch = vlm.pack_examples(examples()[:1], **SHAPE)
    return vlm.init_vlm_params(MODEL, jax.random.PRNGKey(0), batch)


def test_candidates_are_the_patches_of_each_merged_token():
    ex1 = examples()[1]
    batch = vlm.pack_examples([ex1], **SHAPE)
    flat, points = grounding.patch_candidates(batch["merge_index"], batch["patch_positions"], batch["image_slots"], P)
    slots = np.flatnonzero(batch["image_slots"][0] >= 0)
    assert len(slots) == 4  # a 2x2 grid of merged tokens, raster order
    for k, s in enumerate(slots):
        r, c = divmod(k, 2)
        want = [((2 * c + b) * P + P // 2, (2 * r + a) * P + P // 2) for a in range(2) for b in range(2)]
        assert np.asarray(points[0, s]).tolist() == [list(w) for w in want]
        rc = batch["patch_positions"].reshape(-1, 2)[np.asarray(flat[0, s])]
        assert rc.tolist() == [[2 * r + a, 2 * c + b] for a in range(2) for b in range(2)]


def test_box_targets_centres_then_overlap():
    points = jnp.array([[[[1, 1], [3, 1]], [[1, 3], [3, 3]]]])  # [1, L=2, ff=2, 2]: centres of 2-pixel patches
    inside = grounding.box_targets(points, jnp.array([[2, 0, 4, 2]]), patch_size=2)  # holds the centre (3, 1)
    assert np.asarray(inside).tolist() == [[[False, True], [False, False]]]
    assert not bool(grounding.points_in_boxes(points, jnp.array([[0, 0, 3, 1]]))[0, 0, 1])  # exclusive ends
    tiny = grounding.box_targets(points, jnp.array([[2, 2, 3, 3]]), patch_size=2)
    # the box [2, 3) x [2, 3) holds no centre; it overlaps the patch [2, 4) x [2, 4) (centre (3, 3)) only
    assert np.asarray(tiny).tolist() == [[[False, False], [False, True]]]
    wide = grounding.box_targets(points, jnp.array([[1, 0, 3, 4]]), patch_size=2)  # x in [1, 3): centres x = 1
    assert np.asarray(wide).tolist() == [[[True, False], [True, False]]]


def test_pointer_loss_and_choice_by_hand():
    logits = jnp.array([[[0.0, 1.0], [2.0, 5.0]], [[1.0, 0.0], [0.0, 0.0]]])  # [B=2, L=2, ff=2]
    valid = jnp.array([[[True], [True]], [[True], [False]]])  # row 1 cannot point at slot 1
    inside = jnp.array([[[False, True], [True, False]], [[False, True], [True, True]]])
    loss, acc = grounding.pointer_loss(logits, valid, inside, jnp.array([1.0, 1.0]))
    p0 = np.exp([0.0, 1.0, 2.0, 5.0]) / np.exp([0.0, 1.0, 2.0, 5.0]).sum()
    p1 = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    want = (-np.log(p0[1] + p0[2]) - np.log(p1[1])) / 2
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert float(acc) == 0.0  # row 0's argmax (5.0) and row 1's (1.0) are outside their boxes
    only_first, _ = grounding.pointer_loss(logits, valid, inside, jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(float(only_first), -np.log(p0[1] + p0[2]), rtol=1e-6)

    points = jnp.arange(2 * 2 * 2 * 2).reshape(2, 2, 2, 2)
    index, point, logp = grounding.choose_point(logits, valid, points, jax.random.PRNGKey(0), 0.0)
    assert index.tolist() == [3, 0] and point.tolist() == [[6, 7], [8, 9]]
    np.testing.assert_allclose(logp, [np.log(p0[3]), np.log(p1[0])], rtol=1e-6)
    # sampling at T = 2: frequencies follow softmax(logits / 2) over the valid candidates, never an invalid one
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    draws = jax.vmap(lambda k: grounding.choose_point(logits, valid, points, k, 2.0)[0])(keys)  # [N, B]
    assert set(np.asarray(draws[:, 1]).tolist()) <= {0, 1}
    freq = np.bincount(np.asarray(draws[:, 0]), minlength=4) / len(keys)
    q = np.exp(np.array([0.0, 1.0, 2.0, 5.0]) / 2)
    np.testing.assert_allclose(freq, q / q.sum(), atol=0.03)


def test_query_sees_its_own_example_and_not_later_tokens(params):
    ex0, ex1 = examples()
    packed = vlm.pack_examples([ex0, ex1], **SHAPE)
    for e, ex in enumerate((ex0, ex1)):
        alone = vlm.pack_examples([ex], **SHAPE)
        _, _, ref, ref_valid, ref_points = _point(params, alone, query_of(alone))
        own = packed["example_ids"][0] == e
        query = np.array([np.flatnonzero(own & (packed["inputs"][0] == PT))[0]], np.int32)
        _, _, got, valid, points = _point(params, packed, query)
        n = int(own.sum())
        assert (np.asarray(valid[0, :, 0]) == (own & (packed["image_slots"][0] >= 0))).all()
        np.testing.assert_array_equal(np.asarray(ref_valid[0, :n]), np.asarray(valid[0, own]))
        keep = np.asarray(ref_valid[0, :n, 0])
        np.testing.assert_allclose(np.asarray(got[0, own])[keep], np.asarray(ref[0, :n])[keep], atol=2e-5)
        np.testing.assert_array_equal(np.asarray(points[0, own]), np.asarray(ref_points[0, :n]))
    # tokens after the query do not move its pointer (over the candidates it can choose)
    alone = vlm.pack_examples([ex0], **SHAPE)
    q = query_of(alone)
    later = dict(alone, inputs=alone["inputs"].copy())
    later["inputs"][0, q[0] + 1:] = 3
    _, _, ref, valid, _ = _point(params, alone, q)
    keep = np.broadcast_to(np.asarray(valid), ref.shape)
    assert keep.sum() == 8  # the two merged tokens' four patches
    np.testing.assert_allclose(np.asarray(_point(params, later, q)[2])[keep], np.asarray(ref)[keep], atol=1e-6)
    earlier = dict(alone, inputs=alone["inputs"].copy())
    earlier["inputs"][0, q[0] - 1] = 3  # a token before the query does move it
    assert np.abs(np.asarray(_point(params, earlier, q)[2])[keep] - np.asarray(ref)[keep]).max() > 1e-4


def test_gradients_reach_pointer_vit_and_lm(params):
    batch = vlm.pack_examples(examples()[:1], **SHAPE)
    q = query_of(batch)

    def loss(params):
        _, _, logits, valid, points = MODEL.apply({"params": params}, batch["inputs"], vlm.images_of(batch),
                                                  batch["image_slots"], q, batch["positions"], batch["segment_ids"],
                                                  method=vlm.VLM.point)
        inside = grounding.box_targets(points, jnp.array([[0, 0, 4, 2]]), P)
        return grounding.pointer_loss(logits, valid, inside, jnp.ones(1))[0]

    grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)
    norms = {k: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(v)))) for k, v in grads.items()}
    assert set(norms) == {"vit", "projector", "lm", "pointer"} and all(n > 0 for n in norms.values()), norms


def test_errors(params):
    batch = vlm.pack_examples(examples()[:1], **SHAPE)
    with pytest.raises(ValueError, match="one query per row"):
        _point(params, batch, np.zeros(2, np.int32))
    plain = vlm.VLM(vlm.VLMConfig(vit=CFG.vit, lm=CFG.lm, image_token=IMG))
    with pytest.raises(ValueError, match="pointer_dim is None"):
        plain.apply({"params": params}, batch["inputs"], vlm.images_of(batch), batch["image_slots"], np.zeros(1),
                    method=vlm.VLM.point)
    with pytest.raises(ValueError, match="pointer_dim=0"):
        vlm.VLMConfig(vit=CFG.vit, lm=CFG.lm, image_token=IMG, pointer_dim=0)


def test_lm_return_hidden_is_what_the_head_reads():
    from jaxlab.models.lm import LM, init_params

    model = LM(CFG.lm)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, CFG.lm.vocab_size)
    params = init_params(model, jax.random.PRNGKey(0), tokens)
    logits, _ = model.apply({"params": params}, tokens)
    same, _, hidden = model.apply({"params": params}, tokens, return_hidden=True)
    np.testing.assert_array_equal(same, logits)
    assert hidden.shape == (2, 8, CFG.lm.d_model)
    head = hidden @ params["embed"]["embedding"].T if CFG.lm.tie_embeddings else \
        hidden @ params["head"]["kernel"]
    np.testing.assert_allclose(head, logits, atol=1e-4, rtol=1e-4)


def test_pointer_loss_shows_a_box_without_targets():
    logits = jnp.zeros((1, 2, 2))
    valid = jnp.ones((1, 2, 1), bool)
    loss, _ = grounding.pointer_loss(logits, valid, jnp.zeros((1, 2, 2), bool), jnp.ones(1))
    assert np.isfinite(float(loss)) and float(loss) > 1e8  # a data error stands out, never NaN


def _grid(rows: int, cols: int, patch: int):
    """Patch centres (x, y) of a rows x cols grid, row-major [rows * cols, 2]."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([c * patch + patch // 2, r * patch + patch // 2], axis=1)


def test_region_point_by_hand():
    """GUI-Actor's readout: patches >= threshold * max, 4-connected regions, the highest mean region, its
    probability-weighted centre."""
    points = _grid(4, 5, 8)
    p = np.zeros(20)
    p[[7, 8]] = [0.3, 0.1]  # row 1, cols 2-3: mean 0.2
    p[[15, 16]] = [0.25, 0.25]  # row 3, cols 0-1: mean 0.25, below the peak 0.3 but the best mean
    p[19] = 0.1  # alone at row 3, col 4
    point, score = grounding.region_point(p, points, 8, threshold=0.3)
    np.testing.assert_allclose(point, [(4 * 0.25 + 12 * 0.25) / 0.5, 28.0])
    assert score == pytest.approx(0.25)
    # threshold 1 keeps the most likely patch only: the argmax readout
    np.testing.assert_allclose(grounding.region_point(p, points, 8, threshold=1.0)[0], points[7])
    # between 0.1 and 0.25 of the peak the 0.1 patches drop out: row 1 is then the peak alone, mean 0.3
    np.testing.assert_allclose(grounding.region_point(p, points, 8, threshold=0.5)[0], points[7])
    # weighted centre: a 0.3 / 0.1 pair is read at a quarter of the way from the larger patch's centre
    q = np.zeros(20)
    q[[7, 8]] = [0.3, 0.1]
    np.testing.assert_allclose(grounding.region_point(q, points, 8)[0], [20 + 8 * 0.25, 12.0])


def test_region_point_joins_sides_not_corners():
    """Diagonal neighbours are separate regions (4-connectivity); a sub-threshold patch does not join two."""
    points = _grid(3, 3, 4)
    p = np.zeros(9)
    p[[0, 4]] = [0.5, 0.45]  # (0, 0) and (1, 1): corners touch
    point, score = grounding.region_point(p, points, 4)
    np.testing.assert_allclose(point, points[0])
    assert score == pytest.approx(0.5)
    p[[1]] = 0.1  # (0, 1) links them by sides but is under 0.3 * 0.5
    np.testing.assert_allclose(grounding.region_point(p, points, 4)[0], points[0])
    p[[1]] = 0.2  # above the threshold: one region of mean 0.383, centre weighted toward (0, 0)
    point, score = grounding.region_point(p, points, 4)
    assert score == pytest.approx((0.5 + 0.45 + 0.2) / 3)
    np.testing.assert_allclose(point, (0.5 * points[0] + 0.2 * points[1] + 0.45 * points[4]) / 1.15)


def test_region_point_errors():
    points = _grid(2, 2, 8)
    with pytest.raises(ValueError, match="probs must be"):
        grounding.region_point(np.ones(3), points, 8)
    with pytest.raises(ValueError, match="threshold=0"):
        grounding.region_point(np.ones(4) / 4, points, 8, threshold=0)
    with pytest.raises(ValueError, match="no positive entry"):
        grounding.region_point(np.zeros(4), points, 8)
