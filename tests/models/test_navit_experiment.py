"""`navit-packing`: the three pipelines' slot accounting (pad's waste is the analytic one, resize's side and
grid, packed uses every example exactly once), the model's layout invariance, config errors, and a tiny run
of the experiment with its three claims."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
from jaxlab.experiments import navit_packing as npk
from jaxlab.models.vision_data import Scene, make_scenes

from jaxlab import registry
from jaxlab.context import RunContext

CFG = npk.NaViTPackingConfig(slots=324, d_model=16, num_heads=2, num_layers=1, steps=2, warmup_steps=0,
                             eval_every=1, train_scenes=24, eval_scenes=4, fast_compile=True)


def blank_scene(h, w, qa=(("How many shapes are there?", "1"),) * 4):
    """A scene of an (h, w) patch grid (8-pixel patches) with placeholder QA pairs."""
    return Scene(np.zeros((8 * h, 8 * w, 3), np.uint8), (), "", qa)


def test_sizes_resize_side_and_layouts():
    cfg = npk.NaViTPackingConfig()
    np.testing.assert_array_equal(cfg.grid_sides, [3, 6, 9])
    assert cfg.mean_patches == 36 and cfg.max_grid == 9 and cfg.resize_grid == 6
    assert {p: cfg.layout(p) for p in npk.PIPELINES} == {"packed": (16, 81), "resize": (36, 36), "pad": (16, 81)}
    assert all(B * L == cfg.slots for B, L in map(cfg.layout, npk.PIPELINES))
    # sides 24..64 in 8-pixel steps: grids 3..8, E[hw] = 5.5^2 = 30.25, nearest square 25 (side 5), not 36
    odd = dataclasses.replace(cfg, size_multiple=8, min_size=24, max_size=64, slots=1600, row_len=64)
    assert odd.mean_patches == 30.25 and odd.resize_grid == 5


def test_resize_nearest_and_the_resize_batch():
    image = np.arange(2 * 4, dtype=np.float32).reshape(2, 4, 1)  # [[0 1 2 3], [4 5 6 7]]
    np.testing.assert_array_equal(npk.resize_nearest(image, 4)[..., 0],
                                  [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]])
    np.testing.assert_array_equal(npk.resize_nearest(np.arange(9.0).reshape(3, 3, 1), 2)[..., 0], [[0, 2], [6, 8]])
    cfg = npk.NaViTPackingConfig()
    scenes = [blank_scene(3, 9), blank_scene(9, 9), blank_scene(6, 3)]
    vocab = npk.QAVocab(scenes)
    batch = npk.make_batch("resize", [(s, (0, 1, 2, 3)) for s in scenes], vocab, cfg)
    assert batch["patches"].shape == (36, 36, 8 * 8 * 3)
    assert (batch["segment_ids"][:3] == 1).all() and (batch["segment_ids"][3:] == 0).all()  # one full row each
    np.testing.assert_array_equal(batch["positions"][1].max(axis=0), [5, 5])  # a 6 x 6 grid: 48 x 48 pixels


def test_pad_waste_is_the_analytic_value():
    cfg = npk.NaViTPackingConfig()
    grids = [(3, 3), (3, 9), (9, 9), (6, 3), (6, 6)]
    scenes = [blank_scene(h, w) for h, w in grids]
    batch = npk.make_batch("pad", [(s, (0,)) for s in scenes], npk.QAVocab(scenes), cfg)
    B, L = cfg.layout("pad")
    assert batch["segment_ids"].shape == (B, L) == (16, 81)
    used = sum(h * w for h, w in grids)  # 9 + 27 + 81 + 18 + 36 = 171 of 16 x 81 slots
    assert (batch["segment_ids"] == 0).sum() == B * L - used
    np.testing.assert_array_equal((batch["segment_ids"] > 0).sum(axis=1)[:5], [h * w for h, w in grids])
    slot_image = np.where(batch["segment_ids"] > 0, np.arange(B)[:, None], cfg.max_images)  # row i: image i
    np.testing.assert_array_equal(batch["slot_image"], slot_image)
    # over a stream of full steps the waste is 1 - (mean patches of the images drawn) / 81
    pool = [blank_scene(h, w) for h, w in grids]
    data = npk.PipelineBatches("pad", pool, npk.QAVocab(pool), cfg, seed=0)
    for _ in range(5):
        next(data)
    drawn = [grids[data.example(k)[0]] for k in range(data.next)]
    assert data.images == data.next == 5 * 16
    assert data.wasted_fraction == pytest.approx(1 - np.mean([h * w for h, w in drawn]) / 81, abs=1e-12)


def test_packed_steps_use_every_example_once_and_waste_little():
    cfg = npk.NaViTPackingConfig(train_scenes=50)
    scenes = make_scenes(jax.random.PRNGKey(0), 50, cfg.shapes_config())
    data = npk.PipelineBatches("packed", scenes, npk.QAVocab(scenes), cfg, seed=3)
    taken = []
    for _ in range(6):
        chosen = data.choose()
        grids = [data._grid(e) for e in chosen]
        assert sum(h * w for h, w in grids) <= cfg.slots and len(chosen) <= cfg.max_images
        taken += chosen
    pending = list(data.pending)
    assert len(pending) <= cfg.lookahead
    # every example drawn is either in a step or waiting, none twice, none lost
    assert sorted(taken + pending) == sorted(data.example(k) for k in range(data.next))
    batch = next(data)
    assert data.steps == 1 and data.wasted_fraction < 0.05 and data.images > 1.5 * 16  # pad: 16 images a step
    # each image is one contiguous run of one row's slots, and slot_image names it (padding: N)
    N = cfg.max_images
    ids = np.unique(batch["slot_image"][batch["segment_ids"] > 0])
    np.testing.assert_array_equal(ids, np.arange(len(ids)))
    assert (batch["slot_image"][batch["segment_ids"] == 0] == N).all()
    for i in ids:
        b, t = np.nonzero(batch["slot_image"] == i)
        assert len(set(b)) == 1 and np.all(np.diff(t) == 1)
    assert batch["question_mask"][:len(ids)].all() and not batch["question_mask"][len(ids):].any()


def test_the_model_sees_an_image_alike_packed_or_padded():
    cfg = dataclasses.replace(CFG, slots=1296)
    scenes = make_scenes(jax.random.PRNGKey(1), 12, cfg.shapes_config())
    vocab = npk.QAVocab(scenes)
    examples = [(s, (0, 1, 2, 3)) for s in scenes]
    packed = npk.make_batch("packed", examples, vocab, cfg)
    assert (packed["segment_ids"] > 1).any()  # several images share a row
    padded = npk.make_batch("pad", examples, vocab, cfg, rows=12)  # one full row each: other padding counts
    model = npk.ShapesQA(cfg.vit_config(), len(vocab.questions), len(vocab.answers))
    params = model.init(jax.random.PRNGKey(2), *(packed[k] for k in npk.MODEL_INPUTS))["params"]
    apply = jax.jit(lambda b: npk._apply(model, nn.unbox(params), b))
    a, b = apply(packed)[:12], apply(padded)[:12]
    np.testing.assert_allclose(a, b, atol=2e-5)
    # another image's pixels in the same row leave an image's answers alone
    i = packed["slot_image"][np.nonzero(packed["segment_ids"] == 2)][0]  # the second image of some row
    other = dict(packed, patches=np.where((packed["slot_image"] == i)[..., None], 1.0, packed["patches"]))
    changed = np.abs(np.asarray(apply(other) - apply(packed))).max(axis=(1, 2))
    assert changed[i] > 1e-3 and np.delete(changed, i).max() < 2e-5


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"slots=1000 must be a multiple of row_len \(81\)"):
        npk.NaViTPackingConfig(slots=1000)
    with pytest.raises(ValueError, match="size_multiple=20 must be a multiple of patch_size=8"):
        npk.NaViTPackingConfig(size_multiple=20)
    with pytest.raises(ValueError, match="max_size=72 gives up to 81 patches per image, more than row_len=64"):
        npk.NaViTPackingConfig(row_len=64)
    with pytest.raises(ValueError, match=r"questions_per_image=8 must be <= 7"):
        npk.NaViTPackingConfig(questions_per_image=8)
    exp = registry.get_experiment("navit-packing")
    assert exp.quick.steps < exp.config_cls().steps


def test_a_tiny_run_states_the_three_claims(tmp_path):
    ctx = RunContext("navit-packing", tmp_path, quick=True, show_progress=False)
    result = npk.navit_packing(CFG, ctx)
    texts = [c.claim for c in result.claims]
    assert len(texts) == 3
    assert texts[0].startswith("packing native-resolution images wastes < 2% of the token slots")
    assert "packed >= resize" in texts[1] and "packed >= pad" in texts[2]
    m = result.metrics
    assert result.claims[0].holds == (m["wasted_fraction"]["packed"] < 0.02)
    assert result.claims[1].holds == (m["accuracy"]["packed"] >= m["accuracy"]["resize"])
    assert result.claims[2].holds == (m["accuracy"]["packed"] >= m["accuracy"]["pad"])
    assert m["wasted_fraction"]["resize"] == 0 and m["wasted_fraction"]["pad"] > 0.3
    assert m["images_per_step"]["pad"] == 4 and m["images_per_step"]["resize"] == 9
    assert m["eval_questions"] == sum(len(s.qa) for s in make_scenes(jax.random.fold_in(ctx.key, 1), 4,
                                                                      CFG.shapes_config()))
    assert ctx.figure_path.exists()
    assert sum(m["native_size_share"].values()) == pytest.approx(1.0)
    assert all(f"accuracy/native-{s}" in m["runs"]["packed"]["final"] for s, share in m["native_size_share"].items()
               if share > 0)


def test_held_out_accuracy_by_native_size_against_the_resized_square():
    """Images of fewer, as many and more patches than the resize pipeline's 6 x 6 square are scored apart."""
    assert CFG.resize_grid == 6
    qa = (("How many shapes are there?", "1"), ("What colour is the shape?", "red"))
    scenes = [blank_scene(3, 3, qa), blank_scene(6, 6, qa), blank_scene(9, 6, qa), blank_scene(3, 9, qa)]
    held_out = npk.HeldOut(scenes, npk.QAVocab(scenes), CFG, scenes)
    assert held_out.sizes.tolist() == ["smaller"] * 2 + ["same"] * 2 + ["larger"] * 2 + ["smaller"] * 2
    batches = held_out.batches("pad")  # one image a row, in the scenes' order

    def right_on(images):  # predicts the answers of these images' questions, a wrong id for the others
        return lambda b: np.where(np.isin(np.arange(len(b["answer_ids"])), images)[:, None], b["answer_ids"], -1)

    out = held_out.accuracy(right_on([0]), batches)
    assert (out["accuracy/native-smaller"], out["accuracy/native-same"], out["accuracy/native-larger"]) == (0.5, 0, 0)
    out = held_out.accuracy(right_on([1, 2]), batches)
    assert (out["accuracy/native-smaller"], out["accuracy/native-same"], out["accuracy/native-larger"]) == (0, 1, 1)
