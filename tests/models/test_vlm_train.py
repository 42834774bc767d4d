"""`jaxlab train vlm`: QA examples and their loss mask, resumable batches, evaluation helpers, the variant
flag, and a short run whose loss falls."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxlab import registry
from jaxlab.experiments import vlm_train
from jaxlab.experiments.vlm_train import ANSWER_ID, EOS_ID, IMAGE_ID, VLMTrainConfig
from jaxlab.models.vision_data import make_scenes

TINY = dict(steps=24, rows=2, seq_len=96, image_rows=1, image_len=64, patch_size=8, min_size=32, max_size=32,
            vit_d_model=16, vit_layers=1, vit_heads=2, lm_d_model=32, lm_layers=1, lm_heads=2, warmup_steps=2,
            train_scenes=16, eval_scenes=4, eval_every=24, log_every=4, checkpoint_every=12, progress=False, lr=1e-2,
            fast_compile=True)


def test_qa_example_tokens_and_loss_mask():
    scene = make_scenes(jax.random.PRNGKey(0), 1, VLMTrainConfig(**TINY).shapes_config())[0]
    question, answer = scene.qa[0]
    ex = vlm_train.qa_example(scene, 0)
    assert ex.tokens[0] == IMAGE_ID and ex.tokens[len(question) + 1] == ANSWER_ID and ex.tokens[-1] == EOS_ID
    assert bytes(ex.tokens[1:len(question) + 1].astype(np.uint8).tolist()).decode() == question
    np.testing.assert_array_equal(np.flatnonzero(ex.loss_mask), np.arange(len(question) + 2, len(ex.tokens)))
    assert len(np.flatnonzero(ex.loss_mask)) == len(answer) + 1
    assert ex.images[0].dtype == np.float32 and 0 <= ex.images[0].min() and ex.images[0].max() <= 1
    with_question = vlm_train.qa_example(scene, 0, question_loss=True)
    np.testing.assert_array_equal(np.flatnonzero(~with_question.loss_mask), [0])
    assert [vlm_train.question_kind(q) for q in ("How many shapes are there?", "What colour is the shape at the "
            "top?", "What shape is at the top?", "Where is the red circle?")] == list(vlm_train.QUESTION_KINDS)


def test_batches_resume_and_answer_accuracy():
    cfg = VLMTrainConfig(**TINY)
    scenes = make_scenes(jax.random.PRNGKey(0), 16, cfg.shapes_config())
    data = vlm_train.QABatches(scenes, cfg)
    next(data)
    state = data.get_state()
    second = next(data)
    again = vlm_train.QABatches(scenes, cfg)
    again.set_state(state)
    for k, v in next(again).items():
        np.testing.assert_array_equal(v, second[k], err_msg=k)
    assert second["inputs"].shape == (2, 96) and second["patches"].shape == (1, 64, 192)
    # example 1 has one wrong counted target, example 0 none (a wrong uncounted one does not matter)
    ids = np.array([[0, 0, 0, 1, 1, 1, -1]])
    mask = np.array([[1, 1, 0, 1, 1, 0, 0]], bool)
    correct = np.array([[1, 1, 0, 1, 0, 1, 0]], bool)
    np.testing.assert_array_equal(vlm_train.answer_accuracy(correct, mask, ids, 2), [True, False])
    majority, fallback = vlm_train.majority_answers(scenes)
    assert majority["How many shapes are there?"] in {"1", "2", "3"} and isinstance(fallback, str)


def test_variant_and_config_errors():
    with pytest.raises(ValueError, match=r"variant='fusion' must be one of \('projector', 'early-fusion'\)"):
        VLMTrainConfig(variant="fusion")
    with pytest.raises(ValueError, match="fusion_image_size=30 must be a multiple of vq_downsample=4"):
        VLMTrainConfig(variant="early-fusion", fusion_image_size=30)
    with pytest.raises(ValueError, match=r"an image is 258 tokens .* too many for seq_len=128"):
        VLMTrainConfig(variant="early-fusion", fusion_image_size=64)
    with pytest.raises(ValueError, match=r"vq_path='/nonexistent' must be a VQ-VAE folder .* no config\.json or "
                                         r"params\.msgpack"):
        VLMTrainConfig(variant="early-fusion", vq_path="/nonexistent")
    with pytest.raises(ValueError, match="max_size=64 gives up to 64 patches per image, more than image_len=32"):
        VLMTrainConfig(max_size=64, image_len=32)
    assert registry.get_trainer("vlm").config_cls is VLMTrainConfig


def test_train_vlm_loss_falls_and_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    summary = vlm_train.train_vlm(VLMTrainConfig(**TINY), run)
    metrics = (run / "metrics.jsonl").read_text()
    losses = [line["cross_entropy"] for line in map(json.loads, metrics.splitlines()) if "cross_entropy" in line]
    assert losses[-1] < 0.6 * losses[0], losses
    assert summary["step"] == 24 and 0 <= summary["eval/answer_accuracy"] <= 1
    assert "eval/majority_accuracy" in summary and "beats_majority" in summary
    # stopped after the step-12 checkpoint: the resumed run repeats the uninterrupted one exactly
    shutil.copytree(run, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "24")
    resumed = vlm_train.train_vlm(VLMTrainConfig(**TINY), tmp_path / "resumed")
    assert resumed["resumed_from"] == 12 and resumed["eval/answer_loss"] == summary["eval/answer_loss"]
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "time"}  # noqa: E731
                          for line in text.splitlines()]
    assert strip((tmp_path / "resumed" / "metrics.jsonl").read_text()) == strip(metrics)


FUSION = dict(TINY, variant="early-fusion", fusion_image_size=16, vq_codebook_size=32, vq_code_dim=8, vq_hidden=16,
              vq_steps=20, steps=16, checkpoint_every=8, eval_every=16, image_loss=True)


def test_train_vlm_early_fusion_runs_and_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    summary = vlm_train.train_vlm(VLMTrainConfig(**FUSION), run)
    assert summary["variant"] == "early-fusion" and summary["step"] == 16
    assert summary["vqvae/codes_per_image"] == 16 and 0 < summary["vqvae/usage"] <= 1
    assert summary["vqvae/recon_mse"] > 0 and 0 <= summary["eval/answer_accuracy"] <= 1
    assert {"config.json", "params.msgpack", "metrics.json"} <= {p.name for p in (run / "vqvae").iterdir()}
    from PIL import Image  # the images drawn after <boi>, decoded to pixels

    assert np.asarray(Image.open(run / "generated.png")).shape == (16, 4 * 18 - 2, 3)
    assert 0 < summary["eval/generated_distinct_codes"] <= 1
    metrics = (run / "metrics.jsonl").read_text()
    lines = [line for line in map(json.loads, metrics.splitlines()) if "cross_entropy" in line]
    assert all(line["z_loss"] > 0 for line in lines) and lines[-1]["cross_entropy"] < lines[0]["cross_entropy"]
    # resumed after the step-8 checkpoint, with the saved VQ-VAE: the same run exactly
    shutil.copytree(run, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "16")
    resumed = vlm_train.train_vlm(VLMTrainConfig(**FUSION), tmp_path / "resumed")
    assert resumed["resumed_from"] == 8 and resumed["eval/answer_loss"] == summary["eval/answer_loss"]
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "time"}  # noqa: E731
                          for line in text.splitlines()]
    assert strip((tmp_path / "resumed" / "metrics.jsonl").read_text()) == strip(metrics)
    with pytest.raises(ValueError, match=r"config\.json holds VQVAEConfig\(codebook_size=32.* but this run's vq_\* "
                                         r"flags give VQVAEConfig\(codebook_size=64"):
        vlm_train.train_vlm(VLMTrainConfig(**{**FUSION, "vq_codebook_size": 64, "vq_path": str(run / "vqvae")}),
                            tmp_path / "other")
