"""``jaxlab train vlm --variant early-fusion``: the Chameleon-style pieces of the VLM trainer
(:mod:`jaxlab.experiments.vlm_train`; Chameleon Team 2024, "Chameleon: Mixed-Modal Early-Fusion Foundation
Models").

1. Image tokenizer: every scene is resized (nearest pixel, so the colours stay pure) to ``fusion_image_size``
   squared (Chameleon resizes to 512 x 512), and a :class:`~jaxlab.models.vqvae.VQVAE` is trained on the
   training pool (``vq_steps``), saved to ``OUT/vqvae/`` (``config.json``, ``params.msgpack``,
   ``metrics.json``) and loaded from there on resume (or from ``vq_path``). Its held-out reconstruction MSE
   and codebook usage go to the summary (``vqvae/...``).
2. The LM: one :class:`~jaxlab.models.lm.LM` over the fused vocabulary (:class:`~jaxlab.models.early_fusion.
   FusionVocab`: the trainer's 259 text ids, ``<boi>``, ``<eoi>``, the codes) with QK-norm; an example is
   ``<boi> codes <eoi> question <answer> answer <eos>``, one per row, the loss on the answer and ``<eos>``
   (plus the question with ``question_loss``, the image codes with ``image_loss``: of every example, or of the
   share ``image_loss_fraction`` of them drawn per example) and the z-loss
   (``z_loss``) on the counted targets' logits. With ``image_loss`` each evaluation also draws ``generated_images``
   images after ``<boi>`` (codes only, :func:`~jaxlab.models.early_fusion.generate_image_codes`), decodes them
   with the VQ-VAE into ``OUT/generated.png`` and logs the fraction of the codebook they use.
3. Data and evaluation are the projector variant's: example k is question ``qa_k`` of scene ``s_k`` drawn
   from ``default_rng((seed, 0, k))`` (:class:`FusionQABatches`, position checkpointed by ``fit``), and the
   held-out answer accuracy is :func:`~jaxlab.experiments.vlm_train.make_eval_fn`'s.

At the default size (seed 0) the VQ-VAE reconstructs held-out scenes with MSE 0.008 using 96% of its 256 codes
(perplexity 60), and the held-out answer accuracy is 0.498 against the image-blind baseline's 0.393 (the
projector variant: 0.545), colours and positions well above their baselines (0.27 vs 0.13, 0.48 vs 0.08).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from jaxlab.experiments.vlm_train import (ANSWER_ID, EOS_ID, VOCAB_SIZE, QABatches, VLMTrainConfig,
                                          make_eval_fn)
from jaxlab.metrics import to_jsonable
from jaxlab.models.early_fusion import (FusionVocab, fusion_batch, fusion_example, fusion_lm_config, fusion_loss,
                                        generate_image_codes)
from jaxlab.models.lm import LM, init_params
from jaxlab.models.vision_data import Scene, resize_nearest
from jaxlab.models.vqvae import VQTrainConfig, VQVAE, VQVAEConfig, evaluate_vqvae, train_vqvae

__all__ = ["GENERATED", "FusionQABatches", "early_fusion_parts", "fusion_qa_example", "load_vqvae", "scene_images",
           "save_image_row", "scene_codes", "vqvae_config"]


GENERATED = 4
"""Of the ``generated_images`` drawn after ``<boi>`` at each evaluation with ``image_loss``, the first this many
go to ``OUT/generated.png`` (all of them, codes and pixels, to ``OUT/generated.npz``)."""


def save_image_row(images: np.ndarray, path: pathlib.Path) -> None:
    """Float [n, H, W, 3] images (clipped to [0, 1]) side by side, 2-pixel grey gaps, as a PNG."""
    from PIL import Image  # noqa: PLC0415

    n, H, W, _ = images.shape
    row = np.full((H, n * (W + 2) - 2, 3), 128, np.uint8)
    for i, image in enumerate(images):
        row[:, i * (W + 2):i * (W + 2) + W] = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    Image.fromarray(row).save(path)


def vqvae_config(cfg: VLMTrainConfig) -> VQVAEConfig:
    return VQVAEConfig(codebook_size=cfg.vq_codebook_size, code_dim=cfg.vq_code_dim, hidden=cfg.vq_hidden,
                       downsample=cfg.vq_downsample, codebook_update=cfg.vq_codebook_update)


def scene_images(scenes: list[Scene], size: int) -> np.ndarray:
    """The scenes resized (nearest pixel) to ``size`` squared, float32 in [0, 1]: [N, size, size, 3]."""
    return np.stack([resize_nearest(s.image, size) for s in scenes]).astype(np.float32) / 255.0


def load_vqvae(folder, expected: VQVAEConfig | None = None) -> tuple[VQVAE, dict]:
    """The VQ-VAE saved in ``folder`` (``config.json``, ``params.msgpack``); with ``expected``, its config must
    equal it (errors name the file)."""
    folder = pathlib.Path(folder)
    config_file, params_file = folder / "config.json", folder / "params.msgpack"
    for f in (config_file, params_file):
        if not f.is_file():
            raise FileNotFoundError(f"VQ-VAE file {f} does not exist")
    try:
        vq_cfg = VQVAEConfig(**json.loads(config_file.read_text()))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: not a VQVAEConfig ({e})") from None
    if expected is not None and vq_cfg != expected:
        raise ValueError(f"{config_file} holds {vq_cfg}, but this run's vq_* flags give {expected}")
    model = VQVAE(vq_cfg)
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, vq_cfg.downsample, vq_cfg.downsample, vq_cfg.num_channels)))["params"]
    try:
        params = serialization.from_bytes(template, params_file.read_bytes())
    except Exception as e:  # msgpack / shape errors: the file is not this model's
        raise ValueError(f"{params_file}: cannot restore the VQ-VAE parameters ({e})") from None
    return model, jax.tree.map(jnp.asarray, params)


def _vqvae(cfg: VLMTrainConfig, out_dir: pathlib.Path, train_scenes: list[Scene], held_out: list[Scene],
           key) -> tuple[VQVAE, dict, dict]:
    """The run's VQ-VAE: from ``vq_path``, from ``OUT/vqvae/`` (a resumed run), or trained and saved there.
    Returns ``(model, params, metrics)``, the metrics over the held-out scenes."""
    folder = out_dir / "vqvae"
    if cfg.vq_path is not None or (folder / "params.msgpack").is_file():
        model, params = load_vqvae(cfg.vq_path or folder, vqvae_config(cfg))
    else:
        model = VQVAE(vqvae_config(cfg))
        train = VQTrainConfig(steps=cfg.vq_steps, batch_size=cfg.vq_batch_size, lr=cfg.vq_lr,
                              log_every=max(1, cfg.vq_steps // 10))
        params, metrics = train_vqvae(model, scene_images(train_scenes, cfg.fusion_image_size), train, key)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=2))
        (folder / "config.json").write_text(json.dumps(to_jsonable(model.cfg), indent=2))
        tmp = folder / "params.msgpack.tmp"  # written whole, then renamed: never half a file
        tmp.write_bytes(serialization.to_bytes(params))
        tmp.replace(folder / "params.msgpack")
    metrics = evaluate_vqvae(model, params, scene_images(held_out, cfg.fusion_image_size))
    return model, params, metrics


def scene_codes(model: VQVAE, params, scenes: list[Scene], size: int, batch_size: int = 256) -> np.ndarray:
    """VQ-VAE codes int32 [N, h, w] of the scenes resized to ``size``."""
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQVAE.encode))
    images = scene_images(scenes, size)
    return np.concatenate([np.asarray(encode(params, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def fusion_qa_example(codes: np.ndarray, scene: Scene, qa_index: int, vocab: FusionVocab, *,
                      question_loss: bool = False, image_loss: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``<boi> codes <eoi> question <answer> answer <eos>`` and its loss mask (the answer and ``<eos>``; with
    ``question_loss`` the question and ``<answer>`` too; with ``image_loss`` the codes and ``<eoi>``)."""
    question, answer = scene.qa[qa_index]
    q = list(question.encode("utf-8")) + [ANSWER_ID]
    a = list(answer.encode("utf-8")) + [EOS_ID]
    prompt, target = ([], q + a) if question_loss else (q, a)
    return fusion_example(codes, prompt, target, vocab, image_loss=image_loss)


class FusionQABatches(QABatches):
    """The projector variant's example stream (example k: question ``qa_k`` of scene ``s_k`` from
    ``default_rng((seed, 0, k))``) as early-fusion rows, ``rows`` examples per batch."""

    def __init__(self, scenes: list[Scene], codes: np.ndarray, cfg: VLMTrainConfig, vocab: FusionVocab):
        super().__init__(scenes, cfg)
        self.codes, self.vocab = codes, vocab

    def example(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        s, q = self.pick(k)
        image_loss = self.cfg.image_loss and (self.cfg.image_loss_fraction >= 1.0 or np.random.default_rng(
            (self.cfg.seed, 2, k)).random() < self.cfg.image_loss_fraction)
        return fusion_qa_example(self.codes[s], self.scenes[s], q, self.vocab, question_loss=self.cfg.question_loss,
                                 image_loss=image_loss)

    def __next__(self) -> dict:
        examples = [self.example(k) for k in range(self.next, self.next + self.cfg.rows)]
        self.next += self.cfg.rows
        return fusion_batch(examples, seq_len=self.cfg.seq_len, num_rows=self.cfg.rows)


def early_fusion_parts(cfg: VLMTrainConfig, out_dir: pathlib.Path, train_scenes: list[Scene],
                       pairs: list[tuple[Scene, int]], majority, key, options):
    """What :func:`~jaxlab.experiments.vlm_train.train_vlm` needs for the early-fusion variant: ``(data,
    params, loss_fn, evaluate, extra)``, ``extra`` the VQ-VAE's metrics for the summary."""
    held_out = [scene for scene, _ in pairs]
    vq, vq_params, vq_metrics = _vqvae(cfg, out_dir, train_scenes, held_out, jax.random.fold_in(key, 4))
    vocab = FusionVocab(text_vocab=VOCAB_SIZE, codebook_size=cfg.vq_codebook_size)
    size = cfg.fusion_image_size
    train_codes = scene_codes(vq, vq_params, train_scenes, size)
    eval_codes = scene_codes(vq, vq_params, held_out, size)

    lm = LM(fusion_lm_config(vocab, d_model=cfg.lm_d_model, num_layers=cfg.lm_layers, num_heads=cfg.lm_heads,
                             max_len=cfg.seq_len))
    data = FusionQABatches(train_scenes, train_codes, cfg, vocab)
    examples = [fusion_qa_example(c, scene, q, vocab) for c, (scene, q) in zip(eval_codes, pairs)]
    batches = [(fusion_batch(examples[i:i + cfg.rows], seq_len=cfg.seq_len, num_rows=cfg.rows), i)
               for i in range(0, len(examples), cfg.rows)]
    params = {"lm": init_params(lm, jax.random.fold_in(key, 2), jnp.asarray(batches[0][0]["inputs"]))}

    def logits_fn(params, batch):
        return lm.apply({"params": params["lm"]}, batch["inputs"])[0]

    def loss_fn(params, batch, key):
        del key  # no dropout
        logits, aux = lm.apply({"params": params["lm"]}, batch["inputs"])
        loss, metrics = fusion_loss(logits, batch["targets"], batch["mask"], cfg.z_loss)
        return loss + aux["aux_loss"], metrics

    answers = make_eval_fn(None, batches, pairs, majority, options, logits_fn=logits_fn)
    grid = train_codes.shape[1:]
    decode = jax.jit(lambda p, codes: vq.apply({"params": p}, codes, method=VQVAE.decode))

    def evaluate(params) -> dict:
        out = answers(params)
        if cfg.image_loss:  # the model also learnt to write images: draw some and decode them to pixels
            prompts = jnp.full((cfg.generated_images, 1), vocab.boi, jnp.int32)
            codes = generate_image_codes(lm, params["lm"], prompts, jax.random.fold_in(key, 5), vocab, grid)
            pixels = decode(vq_params, codes)  # [n, size, size, 3]
            save_image_row(np.asarray(pixels)[:GENERATED], out_dir / "generated.png")
            np.savez(out_dir / "generated.npz", codes=np.asarray(codes), pixels=np.asarray(pixels))
            out["generated_distinct_codes"] = len(np.unique(np.asarray(codes))) / vocab.codebook_size
        return out

    extra = {"vqvae/" + k: v for k, v in vq_metrics.items()}
    extra["vqvae/codes_per_image"] = int(np.prod(train_codes.shape[1:]))
    return data, params, loss_fn, evaluate, extra
