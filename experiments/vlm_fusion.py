"""``vlm-fusion``: a projector VLM (Kimi Team 2025, "Kimi-VL Technical Report", §2.1: MoonViT -> 2x2 pixel shuffle
-> MLP projector -> LM) against an early-fusion VLM (Chameleon Team 2024, "Chameleon: Mixed-Modal Early-Fusion
Foundation Models", §2: a VQ-VAE turns the image into codes that one LM reads and writes as tokens) on the
shapes-scene QA of ``jaxlab train vlm``, at equal steps, batch and seed.

Both runs are :func:`~jaxlab.experiments.vlm_train.train_vlm` on the same scenes, questions and example stream;
the early-fusion one first trains its VQ-VAE (``vq_steps``) and, as Chameleon does, also learns to write images:
a share ``image_loss_fraction`` of its training examples count the image codes too (image generation), the
others the answer only (VQA), a mix like Chameleon's data mixture. With every example counting its 64 codes the
answers are ~6% of the counted targets and the answer accuracy stays under the blind baseline after 600 steps
(seed 0, 1000 training scenes, 200 held-out questions: 0.34 against 0.36), while a quarter of them gives 0.48
(0.45 with no image loss at all).

Measured, at every ``eval_every`` steps: the held-out answer accuracy of each variant (teacher-forced exact
answer, as greedy decoding) against the image-blind baseline (each question's majority answer over the training
pool). Then, on the held-out scenes: the tokenizer's reconstruction MSE against that of predicting their mean
image, and whether each colour region of a scene (its pixels of one palette colour) decodes to a mean colour
nearest its own (among the palette and black). Last, ``generated_images`` images sampled after ``<boi>`` and
decoded (:mod:`jaxlab.experiments._vlm_fusion`), checked on their pixels against the real scenes and against a
null model, images of codes drawn independently from the held-out scenes' code frequencies (a tokenizer-level
unigram: right code statistics, no layout).

The claims' thresholds: "above the baseline" means by more than two standard errors of the accuracy over the
held-out questions, so that sampling noise does not count as reading the image. The tokenizer keeps the shapes
and colours when its MSE is at most a quarter of the mean image's (the background is constant black, so the
pixel variance around the mean image is the shapes': three quarters of it kept) and at least 80% of the colour
regions come back nearest their own colour. Generated images count as scene-like when their background share is
within 0.05 of the real scenes' (their 1-3 shapes cover ~6% of them), at least three quarters hold a colour blob
(every real scene has a shape), their codes cover at least half the codebook share that as many real scenes
cover, and their number of blobs per image is closer to the real scenes' (one per shape) than the unigram null's:
the layout, one blob per shape rather than scattered codes, is what the LM has to learn beyond code frequencies.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from jaxlab.context import RunContext
from jaxlab.experiments._vlm_fusion import load_vqvae, scene_codes, scene_images
from jaxlab.experiments.vlm_train import QUESTION_KINDS, VARIANTS, VLMTrainConfig, train_vlm
from jaxlab.models.vision_data import COLORS, make_scenes
from jaxlab.models.vqvae import VQVAE
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.validation import check, check_greater, check_positive, check_range

PAPER = ("Chameleon Team 2024, Chameleon (arXiv:2405.09818), §2.1-2.3; Kimi Team 2025, Kimi-VL (arXiv:2504.07491), "
         "§2.1")
PALETTE = np.array(list(COLORS.values()), np.float32) / 255.0  # [7, 3]
BLACK = 0.25
"""A pixel is background when its brightest channel is below this (the palette's dimmest channel maximum is
0.9, the background 0)."""
MIN_BLOB = 4
"""Pixels of the smallest colour blob counted (a 2 x 2 patch: the smallest shape, 4 pixels wide in a 48-pixel
scene, is 2.7 pixels wide once resized to 32)."""


@dataclasses.dataclass(frozen=True)
class VLMFusionConfig:
    """Sizes of the two runs (every other field is :class:`~jaxlab.experiments.vlm_train.VLMTrainConfig`'s
    default)."""

    steps: int = 2000
    """LM optimizer steps of each variant (same batch shape: ``rows`` text rows a step)."""
    rows: int = 16
    """Text rows of 128 slots per batch, for both: early fusion holds one example per row (its image is 66
    tokens), the projector packs whole examples into them (its image is 4-9 merged tokens), so at equal steps and
    batch shape it sees ~2.4x as many examples."""
    lm_d_model: int = 64
    """Width of both variants' LMs (the trainer's default)."""
    lm_layers: int = 3
    """Blocks of both LMs."""
    vit_d_model: int = 64
    """Width of the projector variant's ViT."""
    vit_layers: int = 2
    """Blocks of the projector variant's ViT."""
    lr: float = 1e-3
    """Peak learning rate of both LMs (warmup, then cosine decay to ``steps``)."""
    train_scenes: int = 2000
    """Scenes in the training pool (the questions drawn from them at random)."""
    eval_scenes: int = 400
    """Held-out scenes, one question each (and the tokenizer's and the generation's reference images)."""
    eval_every: int = 250
    """Held-out accuracy every this many steps (and at the end)."""
    vq_steps: int = 600
    """VQ-VAE training steps (before the early-fusion LM)."""
    image_loss_fraction: float = 0.25
    """Share of the early-fusion training examples that also count their image codes."""
    generated_images: int = 64
    """Images sampled after <boi> at each evaluation; the last evaluation's are measured."""
    fast_compile: bool = False
    """XLA backend optimisation off (for tests)."""

    def __post_init__(self):
        check_positive(self, "steps", "rows", "lm_d_model", "lm_layers", "vit_d_model", "vit_layers", "train_scenes",
                       "eval_scenes", "eval_every", "vq_steps", "generated_images", integer=True)
        check_greater(self, "lr")
        check_range(self, "image_loss_fraction", 0.0, 1.0, open_low=True)
        check(self.eval_every <= self.steps, f"eval_every={self.eval_every} must be <= steps={self.steps}")
        check(self.generated_images <= self.eval_scenes, f"generated_images={self.generated_images} must be <= "
                                                         f"eval_scenes={self.eval_scenes} (compared with as many)")
        self.train_config("early-fusion", 0)  # the trainer's own checks

    def train_config(self, variant: str, seed: int) -> VLMTrainConfig:
        return VLMTrainConfig(variant=variant, steps=self.steps, rows=self.rows, lr=self.lr, lm_d_model=self.lm_d_model,
                              lm_layers=self.lm_layers, vit_d_model=self.vit_d_model, vit_layers=self.vit_layers,
                              warmup_steps=min(50, self.steps // 10), train_scenes=self.train_scenes,
                              eval_scenes=self.eval_scenes, eval_every=self.eval_every, checkpoint_every=self.steps,
                              log_every=max(1, min(50, self.steps // 10)), seed=seed, progress=False, resume=False,
                              vq_steps=self.vq_steps, image_loss=variant == "early-fusion",
                              image_loss_fraction=self.image_loss_fraction, generated_images=self.generated_images,
                              fast_compile=self.fast_compile)


# ---- pixel statistics (images float [N, H, W, 3], clipped to [0, 1]) ----------------------------------------
def black_share(images: np.ndarray) -> np.ndarray:
    """[N]: each image's share of background pixels (brightest channel < ``BLACK``)."""
    return (np.clip(images, 0, 1).max(-1) < BLACK).mean(axis=(1, 2))


def blob_counts(images: np.ndarray) -> np.ndarray:
    """[N]: colour blobs per image, 4-connected components of non-background pixels of >= ``MIN_BLOB`` pixels."""
    counts = []
    for image in np.clip(images, 0, 1):
        labels, n = ndimage.label(image.max(-1) >= BLACK)
        counts.append(int((np.bincount(labels.ravel(), minlength=n + 1)[1:] >= MIN_BLOB).sum()))
    return np.array(counts)


def colour_region_accuracy(real: np.ndarray, recon: np.ndarray) -> tuple[float, int]:
    """Share of the colour regions of ``real`` (the pixels of one image in one palette colour) whose mean colour
    in ``recon`` is nearest (L-inf) to that colour among the palette and black; and the number of regions."""
    candidates = np.concatenate([PALETTE, np.zeros((1, 3), np.float32)])
    right = total = 0
    for image, other in zip(real, np.clip(recon, 0, 1)):
        for c, rgb in enumerate(PALETTE):
            region = np.abs(image - rgb).max(-1) < 1e-3
            if region.any():
                mean = other[region].mean(0)
                right += int(np.abs(candidates - mean).max(-1).argmin() == c)
                total += 1
    return right / max(total, 1), total


def _eval_curve(run) -> dict[str, list]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/answer_accuracy" in line]
    return {"steps": [e["step"] for e in evals], "accuracy": [e["eval/answer_accuracy"] for e in evals],
            "baseline": evals[-1]["eval/majority_accuracy"]}


def _tile(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of images [n, H, W, 3] as one picture with 2-pixel grey gaps."""
    n, H, W = rows[0].shape[:3]
    out = np.full((len(rows) * (H + 2) - 2, n * (W + 2) - 2, 3), 0.5, np.float32)
    for r, images in enumerate(rows):
        for i, image in enumerate(np.clip(images[:n], 0, 1)):
            out[r * (H + 2):r * (H + 2) + H, i * (W + 2):i * (W + 2) + W] = image
    return out


@register_experiment("vlm-fusion", description="projector VLM vs early-fusion VLM on shapes QA: accuracy against "
                                               "steps; early fusion also generates images",
                     paper=PAPER,
                     quick_seconds=111,
                     quick=VLMFusionConfig(steps=600, lr=2e-3, train_scenes=1000, eval_every=150, vq_steps=300,
                                           generated_images=32))
def vlm_fusion(cfg: VLMFusionConfig, ctx: RunContext) -> ExperimentResult:
    runs = ctx.out_dir / "vlm-fusion-runs"
    shutil.rmtree(runs, ignore_errors=True)  # fresh runs, never an older run's checkpoints or VQ-VAE
    summaries, curves = {}, {}
    for variant in VARIANTS:
        ctx.log(f"training the {variant} VLM")
        summaries[variant] = train_vlm(cfg.train_config(variant, ctx.seed), runs / variant)
        curves[variant] = _eval_curve(runs / variant)
    fusion = runs / "early-fusion"
    tcfg = cfg.train_config("early-fusion", ctx.seed)
    size = tcfg.fusion_image_size

    # the tokenizer on the held-out scenes (train_vlm's: fold_in(key, 1))
    held_out = make_scenes(jax.random.fold_in(jax.random.PRNGKey(ctx.seed), 1), cfg.eval_scenes,
                           tcfg.shapes_config())
    real = scene_images(held_out, size)  # [N, size, size, 3]
    vq, vq_params = load_vqvae(fusion / "vqvae")
    recon = np.asarray(jax.jit(lambda p, x: vq.apply({"params": p}, x)[0])(vq_params, jnp.asarray(real)))
    recon_mse = float(np.mean((recon - real) ** 2))
    mean_image_mse = float(np.mean((real - real.mean(0)) ** 2))
    regions_right, regions = colour_region_accuracy(real, recon)

    # generated images against the real scenes and the unigram null
    generated = np.load(fusion / "generated.npz")
    gen_pixels, gen_codes = generated["pixels"], generated["codes"]
    n = len(gen_codes)
    real_codes = scene_codes(vq, vq_params, held_out, size)
    freq = np.bincount(real_codes.ravel(), minlength=tcfg.vq_codebook_size) / real_codes.size
    null_codes = np.random.default_rng((ctx.seed, 7)).choice(len(freq), size=gen_codes.shape, p=freq)
    null_pixels = np.asarray(jax.jit(lambda p, c: vq.apply({"params": p}, c, method=VQVAE.decode))(
        vq_params, jnp.asarray(null_codes)))
    groups = {"real": real, "generated": gen_pixels, "unigram": null_pixels}
    black = {k: float(black_share(v).mean()) for k, v in groups.items()}
    blobs = {k: blob_counts(v) for k, v in groups.items()}
    gen_codebook = len(np.unique(gen_codes)) / tcfg.vq_codebook_size
    real_codebook = len(np.unique(real_codes[:n])) / tcfg.vq_codebook_size  # as many real scenes

    fig = Figure(figsize=(14, 4.2))
    ax_curve, ax_kind, ax_img = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.1, 1.0, 1.5]})
    for variant, style in zip(VARIANTS, ("o-", "s-")):
        ax_curve.plot(curves[variant]["steps"], curves[variant]["accuracy"], style, label=variant)
    base = curves["projector"]["baseline"]
    ax_curve.axhline(base, color="grey", ls="--", label="image-blind baseline")
    ax_curve.set(xlabel="step", ylabel="held-out answer accuracy", title="accuracy against steps", ylim=(0, 1))
    ax_curve.legend()
    x = np.arange(len(QUESTION_KINDS))
    for i, variant in enumerate(VARIANTS):
        ax_kind.bar(x + (i - 1) * 0.27, [summaries[variant].get(f"eval/answer_accuracy/{k}", np.nan)
                                        for k in QUESTION_KINDS], 0.27, label=variant)
    ax_kind.bar(x + 0.27, [summaries["projector"].get(f"eval/majority_accuracy/{k}", np.nan)
                           for k in QUESTION_KINDS], 0.27, color="grey", label="baseline")
    ax_kind.set(xticks=x, xticklabels=QUESTION_KINDS, ylim=(0, 1), title="final accuracy by question kind")
    ax_kind.legend(fontsize=8)
    ax_img.imshow(_tile([real[:8], recon[:8], gen_pixels[:8], null_pixels[:8]]), interpolation="nearest")
    ax_img.set(xticks=[], yticks=np.arange(4) * (size + 2) + size / 2,
               yticklabels=["held-out", "VQ-VAE recon", "generated", "unigram null"],
               title="early fusion: tokenizer and generated images")
    fig.suptitle(f"projector (Kimi-VL) vs early-fusion (Chameleon) VLM, {cfg.steps} steps of {cfg.rows} rows, "
                 f"seed {ctx.seed}")
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    acc = {v: summaries[v]["eval/answer_accuracy"] for v in VARIANTS}
    margin = {v: 2 * np.sqrt(acc[v] * (1 - acc[v]) / cfg.eval_scenes) for v in VARIANTS}
    metrics = {
        "curves": curves, "baseline": base, "final_accuracy": acc,
        "accuracy_by_kind": {v: {k: summaries[v].get(f"eval/answer_accuracy/{k}") for k in QUESTION_KINDS}
                             for v in VARIANTS},
        "baseline_by_kind": {k: summaries["projector"].get(f"eval/majority_accuracy/{k}") for k in QUESTION_KINDS},
        "vqvae": {"recon_mse": recon_mse, "mean_image_mse": mean_image_mse, "mse_ratio": recon_mse / mean_image_mse,
                  "colour_regions_right": regions_right, "colour_regions": regions,
                  "perplexity": summaries["early-fusion"]["vqvae/perplexity"],
                  "usage": summaries["early-fusion"]["vqvae/usage"],
                  "codes_per_image": summaries["early-fusion"]["vqvae/codes_per_image"]},
        "generation": {"images": n, "codebook_share": gen_codebook, "real_codebook_share": real_codebook,
                       "black_share": black, "mean_blobs": {k: float(v.mean()) for k, v in blobs.items()},
                       "share_with_blob": {k: float((v > 0).mean()) for k, v in blobs.items()}},
        "num_params": {v: summaries[v]["num_params"] for v in VARIANTS},
        "seconds": {v: summaries[v]["seconds"] for v in VARIANTS},
        "examples_seen": {v: summaries[v]["examples_seen"] for v in VARIANTS},
    }
    blob_gap = {k: abs(float(blobs[k].mean()) - float(blobs["real"].mean())) for k in ("generated", "unigram")}
    claims = (
        Claim(claim="the projector VLM answers held-out questions above the image-blind baseline, by more than 2 "
                    "standard errors (it reads the image; Kimi-VL, Kimi Team 2025, §2.1)",
              holds=bool(acc["projector"] - base > margin["projector"]),
              evidence=f"{acc['projector']:.3f} vs baseline {base:.3f} (2 s.e. = {margin['projector']:.3f}, "
                       f"{cfg.eval_scenes} questions)"),
        Claim(claim="the early-fusion VLM answers held-out questions above the image-blind baseline, by more than 2 "
                    "standard errors (it reads the image codes; Chameleon Team 2024, §2, §5)",
              holds=bool(acc["early-fusion"] - base > margin["early-fusion"]),
              evidence=f"{acc['early-fusion']:.3f} vs baseline {base:.3f} (2 s.e. = {margin['early-fusion']:.3f})"),
        Claim(claim="the image tokenizer keeps held-out scenes' shapes and colours (Chameleon Team 2024, §2.1): "
                    "reconstruction MSE <= 0.25 x the MSE of predicting their mean image, and >= 80% of their colour "
                    "regions decode nearest to their own colour",
              holds=bool(recon_mse <= 0.25 * mean_image_mse and regions_right >= 0.8),
              evidence=f"MSE {recon_mse:.4f} vs mean image {mean_image_mse:.4f} (ratio {recon_mse / mean_image_mse:.2f}"
                       f"); colour regions {regions_right:.3f} of {regions}"),
        Claim(claim="early fusion generates scene-like images (Chameleon Team 2024, §1, §5): decoded samples after "
                    "<boi> use >= half the codebook share of as many real scenes, their black-background share is "
                    "within 0.05 of the real scenes', >= 75% hold a colour blob, and their mean blob count is closer "
                    "to the real scenes' than that of the unigram null",
              holds=bool(gen_codebook >= 0.5 * real_codebook and abs(black["generated"] - black["real"]) <= 0.05
                         and (blobs["generated"] > 0).mean() >= 0.75 and blob_gap["generated"] < blob_gap["unigram"]),
              evidence=f"codebook share {gen_codebook:.3f} vs real {real_codebook:.3f}; black share "
                       f"{black['generated']:.3f} vs real {black['real']:.3f}; with a blob "
                       f"{(blobs['generated'] > 0).mean():.2f}; blobs per image {blobs['generated'].mean():.2f} vs "
                       f"real {blobs['real'].mean():.2f}, unigram {blobs['unigram'].mean():.2f} ({n} images)"),
    )
    comparisons = (
        Comparison("final held-out answer accuracy: projector vs early fusion (baseline)",
                   f"{acc['projector']:.3f} vs {acc['early-fusion']:.3f} ({base:.3f})", None,
                   "no paper gives the direction at this scale"),
        Comparison("image tokenizer: codes per image, codebook size",
                   f"{metrics['vqvae']['codes_per_image']}, {tcfg.vq_codebook_size}", "1024 tokens per 512 x 512 "
                   "image, codebook 8192", "Chameleon Team 2024, §2.1"),
        Comparison("tokenizer codebook usage / perplexity (held-out)",
                   f"{metrics['vqvae']['usage']:.2f} / {metrics['vqvae']['perplexity']:.1f}", None, None),
        Comparison("training examples seen: projector / early fusion (equal steps, rows and row length)",
                   f"{metrics['examples_seen']['projector']} / {metrics['examples_seen']['early-fusion']}", None, None),
        Comparison("training seconds of the LM: projector / early fusion",
                   f"{metrics['seconds']['projector']:.0f} / {metrics['seconds']['early-fusion']:.0f}", None, None),
    )
    seen = metrics["examples_seen"]
    summary = (f"At {cfg.steps} steps of {cfg.rows} text rows (seed {ctx.seed}; {seen['projector']} packed examples "
               f"for the projector, {seen['early-fusion']} for early fusion, one a row) the projector VLM answers "
               f"{acc['projector']:.3f} of {cfg.eval_scenes} held-out questions and the early-fusion VLM "
               f"{acc['early-fusion']:.3f}, against {base:.3f} for the image-blind baseline. Its VQ-VAE reconstructs "
               f"held-out scenes at MSE {recon_mse:.4f} ({recon_mse / mean_image_mse:.2f} of the mean image's), "
               f"{regions_right:.0%} of colour regions kept; its {n} generated images use {gen_codebook:.0%} of the "
               f"codebook, are {black['generated']:.0%} background (real {black['real']:.0%}) with "
               f"{blobs['generated'].mean():.1f} colour blobs each (real {blobs['real'].mean():.1f}, unigram null "
               f"{blobs['unigram'].mean():.1f}).")
    return ExperimentResult(metrics=metrics, comparisons=comparisons, summary=summary, claims=claims)
