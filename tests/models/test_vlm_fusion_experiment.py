"""`vlm-fusion`: the pixel statistics on images with known answers, the config's errors, the early-fusion
examples that count their image codes (``image_loss_fraction``), and a tiny run of both variants end to end
(claims named, metrics finite, generated images measured)."""

import json
import math

import jax
import numpy as np
import pytest

from jaxlab import registry
from jaxlab.context import RunContext
from jaxlab.experiments import vlm_fusion
from jaxlab.experiments._vlm_fusion import FusionQABatches
from jaxlab.experiments.vlm_fusion import VLMFusionConfig
from jaxlab.experiments.vlm_train import VOCAB_SIZE, VLMTrainConfig
from jaxlab.models.early_fusion import FusionVocab
from jaxlab.models.vision_data import COLORS, make_scenes


def _scene(blobs):
    """A black 16 x 16 image with filled squares ``(top, left, side, rgb 0-255)``."""
    image = np.zeros((16, 16, 3), np.float32)
    for top, left, side, rgb in blobs:
        image[top:top + side, left:left + side] = np.array(rgb) / 255.0
    return image


def test_black_share_and_blob_counts():
    red, blue = COLORS["red"], COLORS["blue"]
    images = np.stack([
        _scene([(0, 0, 4, red), (8, 8, 2, blue)]),  # 16 + 4 coloured pixels, two blobs
        _scene([(0, 0, 4, red), (4, 4, 4, blue)]),  # touching only at a corner: two 4-connected blobs
        _scene([(0, 0, 4, red), (0, 4, 4, blue)]),  # sharing an edge: one blob of two colours
        _scene([(0, 0, 1, red), (5, 5, 1, blue)]),  # single pixels: under MIN_BLOB, no blob
        np.full((16, 16, 3), 0.2, np.float32),  # dim grey (brightest channel < 0.25): all background
    ])
    np.testing.assert_allclose(vlm_fusion.black_share(images), [1 - 20 / 256, 1 - 32 / 256, 1 - 32 / 256,
                                                                1 - 2 / 256, 1.0])
    np.testing.assert_array_equal(vlm_fusion.blob_counts(images), [2, 2, 1, 0, 0])


def test_colour_region_accuracy():
    real = np.stack([_scene([(0, 0, 4, COLORS["red"]), (8, 8, 4, COLORS["white"])]),
                     _scene([(2, 2, 6, COLORS["green"])])])
    assert vlm_fusion.colour_region_accuracy(real, real) == (1.0, 3)
    blurred = real * 0.8 + 0.05  # dimmer and lifted, still nearest its own colour
    assert vlm_fusion.colour_region_accuracy(real, blurred) == (1.0, 3)
    wrong = real.copy()
    wrong[0, 0:4, 0:4] = np.array(COLORS["magenta"]) / 255.0  # the red region decodes magenta
    wrong[1] = 0.0  # the green region is lost to the background
    assert vlm_fusion.colour_region_accuracy(real, wrong) == (pytest.approx(1 / 3), 3)


def test_config_errors():
    with pytest.raises(ValueError, match="steps=0 must be an int >= 1"):
        VLMFusionConfig(steps=0)
    with pytest.raises(ValueError, match=r"image_loss_fraction=0\.0 must be in \(0\.0, 1\.0\]"):
        VLMFusionConfig(image_loss_fraction=0.0)
    with pytest.raises(ValueError, match="eval_every=300 must be <= steps=200"):
        VLMFusionConfig(steps=200, eval_every=300)
    with pytest.raises(ValueError, match=r"generated_images=64 must be <= eval_scenes=32 \(compared with as many\)"):
        VLMFusionConfig(eval_scenes=32)
    with pytest.raises(ValueError, match="lr=-0.001 must be > 0"):
        VLMFusionConfig(lr=-1e-3)
    exp = registry.get_experiment("vlm-fusion")
    assert exp.config_cls is VLMFusionConfig and exp.quick.steps < VLMFusionConfig().steps


def test_tiny_run_end_to_end(tmp_path):
    cfg = VLMFusionConfig(steps=4, rows=4, lm_d_model=16, lm_layers=1, vit_d_model=16, vit_layers=1, train_scenes=16,
                          eval_scenes=8, eval_every=2, vq_steps=4, generated_images=6, fast_compile=True)
    result = vlm_fusion.vlm_fusion(cfg, RunContext("vlm-fusion", tmp_path, quick=True, show_progress=False))
    assert [c.claim.split(" answers")[0].split(" generates")[0].split(" keeps")[0] for c in result.claims] == [
        "the projector VLM", "the early-fusion VLM", "the image tokenizer", "early fusion"]
    m = result.metrics
    for variant in ("projector", "early-fusion"):
        assert m["curves"][variant]["steps"] == [2, 4]
        assert all(0 <= a <= 1 for a in m["curves"][variant]["accuracy"])
    assert 0 <= m["baseline"] <= 1
    g, vq = m["generation"], m["vqvae"]
    assert g["images"] == 6 and 0 < g["codebook_share"] <= 1 and 0 < g["real_codebook_share"] <= 1
    assert set(g["black_share"]) == {"real", "generated", "unigram"}
    assert all(0 <= v <= 1 for v in g["black_share"].values())
    assert vq["colour_regions"] >= 8 and 0 <= vq["colour_regions_right"] <= 1  # every scene has a shape
    assert all(math.isfinite(vq[k]) and vq[k] > 0 for k in ("recon_mse", "mean_image_mse", "perplexity"))
    # the generated images the claim reads are the early-fusion run's final evaluation's
    saved = np.load(tmp_path / "vlm-fusion-runs" / "early-fusion" / "generated.npz")
    assert saved["pixels"].shape == (6, 32, 32, 3) and saved["codes"].shape == (6, 8, 8)
    assert g["codebook_share"] == len(np.unique(saved["codes"])) / 256
    assert (tmp_path / "vlm-fusion.png").stat().st_size > 0
    json.dumps(m)  # serialisable as the report writes it


def test_image_loss_fraction_counts_the_codes_of_that_share_of_examples():
    vocab = FusionVocab(text_vocab=VOCAB_SIZE, codebook_size=256)

    def counted_images(fraction, seed=0):
        cfg = VLMTrainConfig(variant="early-fusion", image_loss=True, image_loss_fraction=fraction, seed=seed)
        scenes = make_scenes(jax.random.PRNGKey(0), 8, cfg.shapes_config())
        data = FusionQABatches(scenes, np.zeros((8, 8, 8), np.int32), cfg, vocab)
        counted = []
        for k in range(400):
            tokens, loss = data.example(k)
            image = (tokens >= vocab.image_offset) | (tokens == vocab.eoi)
            assert loss[image].all() or not loss[image].any()  # an example counts all its codes or none
            assert loss[~image & (np.arange(len(tokens)) > 0)].any()  # and always its answer
            counted.append(bool(loss[image].any()))
        return np.array(counted)

    assert counted_images(1.0).all()
    quarter = counted_images(0.25)
    assert 0.18 < quarter.mean() < 0.32
    np.testing.assert_array_equal(quarter, counted_images(0.25))  # example k's draw is fixed: exact resume
    assert (quarter != counted_images(0.25, seed=1)).any()
