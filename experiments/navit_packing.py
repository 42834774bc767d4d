"""``navit-packing``: images of mixed sizes fed to one ViT three ways at equal compute (Dehghani et al. 2023,
"Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio and Resolution", Figs. 1 and 4; section 2.2:
greedy packing leaves under 2% of the tokens as padding).

Data: :mod:`jaxlab.models.vision_data` shapes scenes (a shape per cell of a 3 x 3 grid; count, colour, shape
and position questions), sides drawn from 24, 48, 72 pixels: 8-pixel patch grids 3, 6 or 9 a side, aspect
ratios 1:3 to 3:1, E[h w] = 36 patches, at most 81. Sides are multiples of 3 patches so that cells start and
end on patch boundaries, native or resized (with sides 32..64 in steps of a patch only 48-pixel sides do:
every resized image, one native side in five). One model, from the same initial parameters, trains the
same steps in each pipeline with ``slots = B x L`` = 1296 token slots a step; the pipelines differ only in
how images fill them:

* ``packed`` (NaViT): native resolution, several images a row of ``row_len`` = 81 slots by
  :func:`jaxlab.models.vision.pack_images` (first-fit decreasing, segment mask); a step takes the next
  examples while their packing fits, one that does not waits for the next step (at most ``lookahead``),
  never dropped: about ``slots / 36`` images a step.
* ``resize`` (the standard ViT: one fixed square, one image per sequence): nearest-pixel resize to the square
  whose patch count is nearest the mean native one (48 pixels, 36 patches): ``slots / 36`` images a step,
  no slot wasted, 72-pixel sides lose a third of their rows, non-square images are distorted.
* ``pad``: native resolution, one image a row of ``(max_size / P)^2 = 81`` slots, the rest masked padding:
  ``slots / 81`` images a step, ``1 - 36 / 81 = 56%`` of the slots wasted. ``packed`` and ``pad`` run one
  compiled program on ``[16, 81]`` rows and compute the same function of an image (tested).

Model (:class:`ShapesQA`): a ViT (2D RoPE and a learned position table interpolated to each image's grid,
NaViT's fractional positions), then per question its learned embedding attends over its own image's patches
(a per-image softmax computed slot by slot: the same cost in every layout) and an MLP scores the training
pool's answers; ``questions_per_image`` QA pairs of each image a step. Held-out: exact match over every QA
pair of ``eval_scenes`` scenes from another key (about 10.7 a scene), overall and by
:func:`~jaxlab.experiments.vlm_train.question_kind`, beside the image-blind majority answer
(:func:`~jaxlab.experiments.vlm_train.majority_answers`); ``resize`` is evaluated on resized images. (``jaxlab
train vlm``'s byte-level VLM scores 0.52 against the image-blind 0.37 after 600 steps, 75 s on one core.)

Seed 0, packed / resize / pad accuracy: quick 0.646 / 0.654 / 0.595, full 0.919 / 0.940 / 0.794 (an earlier full
run of the same program on one pinned core, another float path: 0.847 / 0.917 / 0.696): packing beats padding and
trails resizing. Held-out accuracy by native size against the resized square (:data:`NATIVE_SIZES`) says the edge
is not resolution: at full size resizing wins most on the 6 x 6-patch images it leaves unchanged (0.930 against
0.888), less on those it upsamples (0.951 against 0.941) or downsamples (0.923 against 0.890); more likely it is
the one fixed grid, whose cells always fall on the same patches. A step: ``patches [B, L, P*P*3]``, ``segment_ids``,
``slot_image [B, L]`` (each slot's image, N on padding), ``positions [B, L, 2]``; ``question_ids``, ``answer_ids``,
``question_mask [N, Q]``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxlab.experiments.vlm_train import QUESTION_KINDS, majority_answers, question_kind
from jaxlab.models.vision import PackedImages, ViT, ViTConfig, first_fit_rows, pack_images
from jaxlab.models.vision_data import Scene, ShapesConfig, make_scenes, resize_nearest
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.optim import OptimizerConfig, make_optimizer
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.train_state import create_train_state, make_train_step
from jaxlab.validation import check, check_greater, check_positive, check_range
from jaxlab.xla_options import FAST_COMPILE

PAPER = ("Dehghani et al. 2023, Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio and Resolution "
         "(arXiv:2307.06304), Figures 1 and 4, section 2.2")
PIPELINES = ("packed", "resize", "pad")
NATIVE_SIZES = ("smaller", "same", "larger")
"""Held-out images by their native patch count against the resized square's: resizing upsamples the smaller
ones (more tokens than native) and downsamples the larger ones (rows and columns dropped)."""


def patch_grid(image: np.ndarray, patch_size: int) -> tuple[int, int]:
    """An image's native patch grid (rows, columns): ``[H, W, C] -> (H // P, W // P)``."""
    return tuple(n // patch_size for n in image.shape[:2])


@dataclasses.dataclass(frozen=True)
class NaViTPackingConfig:
    """Scene sizes, the equal compute budget (slots a step, steps) and the model."""

    steps: int = 6000
    """Optimizer steps of each pipeline."""
    slots: int = 1296
    """Token slots a step, B x L, in every pipeline (a multiple of row_len and of both pipelines' row lengths)."""
    row_len: int = 81
    """Slots per row L of the packed pipeline."""
    lookahead: int = 16
    """Packed: examples a step may set aside for the next step when they do not fit."""
    questions_per_image: int = 4
    """QA pairs of each training image a step trains on (drawn with the example; a scene has at least 7)."""
    patch_size: int = 8
    size_multiple: int = 24
    """Scene sides are multiples of this many pixels (3 patches: cells start and end on patch boundaries)."""
    min_size: int = 24
    """Smallest scene side in pixels."""
    max_size: int = 72
    """Largest scene side in pixels."""
    max_shapes: int = 3
    """Most shapes per scene (1 to 9)."""
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    abs_pos_grid: int | None = 8
    """Side G of the ViT's learned absolute position table interpolated to each image's grid (None: RoPE only)."""
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    train_scenes: int = 12000
    """Scenes in the training pool (examples drawn from it at random)."""
    eval_scenes: int = 400
    """Held-out scenes; every question of each is evaluated."""
    eval_every: int = 250
    """Held-out accuracy every this many steps (and at the end)."""
    fast_compile: bool = False
    """Compile with XLA's backend optimisation off (faster compiles, slower steps: for tests)."""

    def __post_init__(self):
        check_positive(self, "steps", "slots", "row_len", "questions_per_image", "patch_size", "size_multiple",
                       "min_size", "max_size", "d_model", "num_layers", "num_heads", "train_scenes", "eval_scenes",
                       "eval_every", integer=True)
        check_positive(self, "lookahead", "warmup_steps", minimum=0, integer=True)
        check_range(self, "max_shapes", 1, 9)
        check(self.questions_per_image <= 7, f"questions_per_image={self.questions_per_image} must be <= 7 (a "
                                             "one-shape scene has 7 questions)")
        check_greater(self, "lr")
        check_range(self, "weight_decay", 0.0, 1.0)
        check(self.warmup_steps < self.steps, f"warmup_steps={self.warmup_steps} must be < steps={self.steps}")
        check(self.size_multiple % self.patch_size == 0,
              f"size_multiple={self.size_multiple} must be a multiple of patch_size={self.patch_size}")
        self.shapes_config()  # validates the scene sizes
        self.vit_config()  # validates the model
        largest = self.max_grid ** 2
        check(self.layout("resize")[0] <= self.max_images,
              f"slots={self.slots} give {self.layout('resize')[0]} resized images a step, more than max_images="
              f"{self.max_images}")
        check(largest <= self.row_len, f"max_size={self.max_size} gives up to {largest} patches per image, more "
                                       f"than row_len={self.row_len} (patch_size={self.patch_size})")
        for name, tokens in (("row_len", self.row_len), ("the largest image's patch count", largest),
                             ("the resized image's patch count", self.resize_grid ** 2)):
            check(self.slots % tokens == 0, f"slots={self.slots} must be a multiple of {name} ({tokens})")

    def shapes_config(self) -> ShapesConfig:
        return ShapesConfig(min_size=self.min_size, max_size=self.max_size, size_multiple=self.size_multiple,
                            min_shapes=1, max_shapes=self.max_shapes)

    def vit_config(self) -> ViTConfig:
        return ViTConfig(patch_size=self.patch_size, d_model=self.d_model, num_layers=self.num_layers,
                         num_heads=self.num_heads, abs_pos_grid=self.abs_pos_grid)

    @property
    def grid_sides(self) -> np.ndarray:
        """The patch-grid sides a scene can have (heights and widths are drawn uniformly from them)."""
        lo, hi = self.shapes_config().size_range
        return np.arange(lo, hi + 1, self.size_multiple) // self.patch_size

    @property
    def max_grid(self) -> int:
        return int(self.grid_sides.max())

    @property
    def mean_patches(self) -> float:
        """E[h w] of a scene's patch grid: E[h] E[w] (independent uniform sides)."""
        return float(self.grid_sides.mean() ** 2)

    @property
    def resize_grid(self) -> int:
        """Grid side g of the resize pipeline: g^2 nearest the mean native patch count (the smaller on a tie)."""
        sides = np.arange(1, self.max_grid + 1)
        return int(sides[np.argmin(np.abs(sides ** 2 - self.mean_patches))])

    def layout(self, pipeline: str) -> tuple[int, int]:
        """(rows B, row length L) of a training step of ``pipeline``; B * L = slots."""
        L = {"packed": self.row_len, "resize": self.resize_grid ** 2, "pad": self.max_grid ** 2}[pipeline]
        return self.slots // L, L

    @property
    def max_images(self) -> int:
        """N, the images a step's arrays hold in every pipeline: 1.5 slots / mean patches (a packed step stops
        there; resize and pad hold one image a row, fewer)."""
        return int(1.5 * self.slots / self.mean_patches)


# ---- data ---------------------------------------------------------------------------------------
class QAVocab:
    """The training pool's question and answer texts as ids (one never seen in training: 0, counted wrong)."""

    def __init__(self, scenes: list[Scene]):
        self.questions = ["<unseen>"] + sorted({q for s in scenes for q, _ in s.qa})
        self.answers = ["<unseen>"] + sorted({a for s in scenes for _, a in s.qa})
        self._q = {q: i for i, q in enumerate(self.questions)}
        self._a = {a: i for i, a in enumerate(self.answers)}

    def encode(self, scene: Scene, which, num: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(question_ids, answer_ids, mask) ``[num]`` of ``scene.qa[i] for i in which``, then padding."""
        q, a, m = np.zeros(num, np.int32), np.zeros(num, np.int32), np.zeros(num, bool)
        for j, i in enumerate(which):
            question, answer = scene.qa[i]
            q[j], a[j], m[j] = self._q.get(question, 0), self._a.get(answer, 0), True
        return q, a, m


def one_per_row(images: list[np.ndarray], *, patch_size: int, row_len: int, num_rows: int) -> PackedImages:
    """Each image alone in a row of ``row_len`` slots (the rest padding), then empty rows up to ``num_rows``:
    the pad and resize layout, by :func:`pack_images` of one image at a time."""
    check(0 < len(images) <= num_rows, f"{len(images)} images need as many rows, num_rows={num_rows}")
    rows = [pack_images([im], patch_size=patch_size, max_len=row_len) for im in images]
    rows = [r._replace(image_ids=np.where(r.image_ids >= 0, i, -1)) for i, r in enumerate(rows)]
    empty = rows[0]._replace(patches=np.zeros_like(rows[0].patches), segment_ids=np.zeros_like(rows[0].segment_ids),
                             positions=np.zeros_like(rows[0].positions), image_ids=np.full((1, row_len), -1, np.int32))
    rows += [empty] * (num_rows - len(rows))
    return PackedImages(*(np.concatenate([getattr(r, f) for r in rows]) for f in PackedImages._fields[:4]),
                        grid_hw=np.concatenate([r.grid_hw for r in rows[:len(images)]]))


def _rows_needed(grids: list[tuple[int, int]], row_len: int) -> int:
    """Rows :func:`pack_images` takes for images of these patch grids (its first-fit decreasing,
    :func:`~jaxlab.models.vision.first_fit_rows`)."""
    return int(first_fit_rows([h * w for h, w in grids], row_len).max()) + 1


def make_batch(pipeline: str, examples: list[tuple[Scene, tuple[int, ...]]], vocab: QAVocab,
               cfg: NaViTPackingConfig, *, rows: int | None = None, num_images: int | None = None,
               num_questions: int | None = None) -> dict[str, np.ndarray]:
    """One step's arrays for ``examples`` (a scene and indices of its QA pairs each) laid out by ``pipeline``;
    ``rows``, ``num_images``, ``num_questions`` fix B, N, Q (default: the config's layout, max_images and
    questions_per_image)."""
    B, L = cfg.layout(pipeline)
    B = B if rows is None else rows
    N = cfg.max_images if num_images is None else num_images
    Q = cfg.questions_per_image if num_questions is None else num_questions
    check(len(examples) <= N, f"{len(examples)} images, more than the {N} a {pipeline} step holds")
    images = [scene.image.astype(np.float32) / 255.0 for scene, _ in examples]
    P = cfg.patch_size
    if pipeline == "resize":
        images = [resize_nearest(im, cfg.resize_grid * P) for im in images]
    if pipeline == "packed":
        packed = pack_images(images, patch_size=P, max_len=L, num_rows=B)
    else:
        packed = one_per_row(images, patch_size=P, row_len=L, num_rows=B)
    qa = [vocab.encode(scene, which, Q) for scene, which in examples]
    qa += [(np.zeros(Q, np.int32), np.zeros(Q, np.int32), np.zeros(Q, bool))] * (N - len(examples))
    return {"patches": packed.patches.astype(np.float32), "segment_ids": packed.segment_ids,
            "positions": packed.positions, "slot_image": np.where(packed.image_ids >= 0, packed.image_ids, N),
            "question_ids": np.stack([q for q, _, _ in qa]), "answer_ids": np.stack([a for _, a, _ in qa]),
            "question_mask": np.stack([m for _, _, m in qa])}


class PipelineBatches:
    """One pipeline's steps. Example k, a pool scene and ``questions_per_image`` of its QA pairs, is drawn from
    ``default_rng((seed, k))`` in every pipeline; counts ``images`` and ``wasted`` (padding) slots."""

    def __init__(self, pipeline: str, scenes: list[Scene], vocab: QAVocab, cfg: NaViTPackingConfig, seed: int):
        self.pipeline, self.scenes, self.vocab, self.cfg, self.seed = pipeline, scenes, vocab, cfg, seed
        self.next, self.pending = 0, collections.deque()
        self.steps = self.images = self.wasted = 0

    def example(self, k: int) -> tuple[int, tuple[int, ...]]:
        """Example k: (pool index of its scene, indices of its QA pairs)."""
        rng = np.random.default_rng((self.seed, k))
        s = int(rng.integers(len(self.scenes)))
        which = rng.choice(len(self.scenes[s].qa), size=self.cfg.questions_per_image, replace=False)
        return s, tuple(int(i) for i in which)

    def _grid(self, example: tuple[int, tuple[int, ...]]) -> tuple[int, int]:
        return patch_grid(self.scenes[example[0]].image, self.cfg.patch_size)

    def choose(self) -> list[tuple[int, tuple[int, ...]]]:
        """The next step's examples."""
        cfg = self.cfg
        B, L = cfg.layout(self.pipeline)
        if self.pipeline != "packed":  # one image a row
            self.next += B
            return [self.example(k) for k in range(self.next - B, self.next)]
        chosen, grids, skipped, used = [], [], [], 0
        while len(chosen) < cfg.max_images and used < cfg.slots:
            if self.pending:
                s = self.pending.popleft()
            else:
                s, self.next = self.example(self.next), self.next + 1
            g = self._grid(s)
            if used + g[0] * g[1] <= cfg.slots and _rows_needed(grids + [g], L) <= B:
                chosen, grids, used = chosen + [s], grids + [g], used + g[0] * g[1]
            else:
                skipped.append(s)
                if len(skipped) >= cfg.lookahead:
                    break
        self.pending.extendleft(reversed(skipped))  # first in line next step, in their order
        return chosen

    def __next__(self) -> dict[str, np.ndarray]:
        chosen = self.choose()
        batch = make_batch(self.pipeline, [(self.scenes[s], which) for s, which in chosen], self.vocab, self.cfg)
        self.steps, self.images = self.steps + 1, self.images + len(chosen)
        self.wasted += int((batch["segment_ids"] == 0).sum())
        return batch

    @property
    def wasted_fraction(self) -> float:
        return self.wasted / max(self.steps * self.cfg.slots, 1)


# ---- model ----------------------------------------------------------------------------------------
class ShapesQA(nn.Module):
    """ViT, then per question an attention pool over its image's patches and an MLP over the answers:
    ``(patches, segment_ids, positions, slot_image [B, L], question_ids [N, Q]) -> logits [N, Q, A]``. The pool's
    softmax over each image's slots is computed slot by slot (segment max and sums over ``slot_image``, N on
    padding), so it costs the same in every layout of the same slots."""

    vit: ViTConfig
    num_questions: int
    num_answers: int

    @nn.compact
    def __call__(self, patches, segment_ids, positions, slot_image, question_ids):
        D, H = self.vit.d_model, self.vit.num_heads
        N = question_ids.shape[0]
        x = ViT(self.vit, name="vit")(patches, segment_ids, positions).reshape(-1, D)  # [S = B*L, D]
        image = slot_image.reshape(-1)  # [S]

        def dense(name):
            return nn.DenseGeneral((H, D // H), name=name)

        question = nn.Embed(self.num_questions, D, name="question_embed")(question_ids)  # [N, Q, D]
        query = jnp.concatenate([dense("query")(question), jnp.zeros_like(question[:1]).reshape(1, -1, H, D // H)])
        scores = jnp.einsum("sqhd,shd->sqh", query[image], dense("key")(x)) / np.sqrt(D // H)  # [S, Q, H]
        top = jax.lax.stop_gradient(jax.ops.segment_max(scores, image, num_segments=N + 1))  # [N+1, Q, H]
        weights = jnp.exp(scores - top[image])  # [S, Q, H]
        weights = weights / jax.ops.segment_sum(weights, image, num_segments=N + 1)[image]
        pooled = jax.ops.segment_sum(weights[..., None] * dense("value")(x)[:, None], image,
                                     num_segments=N + 1)[:N]  # [N, Q, H, D/H]
        h = nn.LayerNorm(name="norm")(question + nn.DenseGeneral(D, axis=(-2, -1), name="out")(pooled))
        h = nn.gelu(nn.Dense(2 * D, name="hidden")(h))
        return nn.Dense(self.num_answers, name="answer")(h)  # [N, Q, A]


MODEL_INPUTS = ("patches", "segment_ids", "positions", "slot_image", "question_ids")


def _apply(model: ShapesQA, params, batch):
    return model.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS))


def make_loss_fn(model: ShapesQA):
    """Mean cross-entropy over the step's question-answer pairs (the spine's ``loss_fn``)."""

    def loss_fn(params, batch, key):
        del key  # no dropout
        ce = optax.softmax_cross_entropy_with_integer_labels(_apply(model, params, batch), batch["answer_ids"])
        mask = batch["question_mask"]
        return jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1), {}

    return loss_fn


class HeldOut:
    """Every question of the held-out scenes, in fixed-shape steps of ``chunk`` images per layout."""

    def __init__(self, scenes: list[Scene], vocab: QAVocab, cfg: NaViTPackingConfig, train: list[Scene],
                 chunk: int = 32):
        self.scenes, self.vocab, self.cfg, self.chunk = scenes, vocab, cfg, chunk
        pairs = [(q, a) for s in scenes for q, a in s.qa]
        self.kinds = np.array([question_kind(q) for q, _ in pairs])
        # each question's image against the resize pipeline's square: fewer, as many or more native patches
        patches = np.array([np.prod(patch_grid(s.image, cfg.patch_size)) for s in scenes for _ in s.qa])
        resized = cfg.resize_grid ** 2
        self.sizes = np.array(NATIVE_SIZES)[1 + np.sign(patches - resized)]
        by_question, fallback = majority_answers(train)
        self.blind = np.array([by_question.get(q, fallback) == a for q, a in pairs])

    def batches(self, pipeline: str) -> list[dict[str, np.ndarray]]:
        Q = max(len(s.qa) for s in self.scenes)
        return [make_batch(pipeline, [(s, tuple(range(len(s.qa)))) for s in self.scenes[i:i + self.chunk]],
                           self.vocab, self.cfg, rows=self.chunk, num_images=self.chunk, num_questions=Q)
                for i in range(0, len(self.scenes), self.chunk)]

    def accuracy(self, predict, batches) -> dict[str, float]:
        right = np.concatenate([np.asarray(predict(b) == b["answer_ids"])[b["question_mask"]] for b in batches])
        out = {"accuracy": float(right.mean()), "majority_accuracy": float(self.blind.mean())}
        for kind in QUESTION_KINDS:
            if (self.kinds == kind).any():
                out[f"accuracy/{kind}"] = float(right[self.kinds == kind].mean())
                out[f"majority_accuracy/{kind}"] = float(self.blind[self.kinds == kind].mean())
        for size in NATIVE_SIZES:
            if (self.sizes == size).any():
                out[f"accuracy/native-{size}"] = float(right[self.sizes == size].mean())
        return out


def run_pipelines(cfg: NaViTPackingConfig, key: jax.Array, seed: int, progress=lambda it, **kw: it,
                  pipelines: tuple[str, ...] = PIPELINES) -> dict:
    """Train the model once per pipeline (same initial parameters, same example stream): held-out accuracy
    against steps and images seen, wasted fraction and images a step of each."""
    shapes = cfg.shapes_config()
    train = make_scenes(jax.random.fold_in(key, 0), cfg.train_scenes, shapes)
    vocab = QAVocab(train)
    held_out = HeldOut(make_scenes(jax.random.fold_in(key, 1), cfg.eval_scenes, shapes), vocab, cfg, train)
    model = ShapesQA(cfg.vit_config(), len(vocab.questions), len(vocab.answers))
    example = make_batch("packed", [(train[0], tuple(range(cfg.questions_per_image)))], vocab, cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.fold_in(key, 2), *(example[k] for k in MODEL_INPUTS))["params"])
    tx = make_optimizer(OptimizerConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, decay_steps=cfg.steps, b2=0.98,
                                        weight_decay=cfg.weight_decay, clip_norm=1.0))
    options = FAST_COMPILE if cfg.fast_compile else None
    step = jax.jit(make_train_step(make_loss_fn(model), tx), donate_argnums=0, compiler_options=options)
    predict = jax.jit(lambda p, b: jnp.argmax(_apply(model, p, b), -1), compiler_options=options)
    eval_sets = {"native": held_out.batches("pad"), "resize": held_out.batches("resize")}
    runs = {}
    for pipeline in pipelines:
        data = PipelineBatches(pipeline, train, vocab, cfg, seed)
        batches = eval_sets["resize" if pipeline == "resize" else "native"]
        state = create_train_state(jax.tree.map(jnp.copy, params), tx, jax.random.fold_in(key, 3))  # donated
        curve, start = [], time.perf_counter()
        for i in progress(range(1, cfg.steps + 1), desc=pipeline):
            state, _ = step(state, next(data), jax.random.fold_in(key, i))
            if i % cfg.eval_every == 0 or i == cfg.steps:
                curve.append({"step": i, "images": data.images,
                              **held_out.accuracy(lambda b, p=state.params: predict(p, b), batches)})
        runs[pipeline] = {"curve": curve, "final": curve[-1], "wasted_fraction": data.wasted_fraction,
                          "images_per_step": data.images / data.steps, "seconds": time.perf_counter() - start,
                          "layout": cfg.layout(pipeline)}
    return {"runs": runs, "eval_questions": len(held_out.kinds), "num_questions": len(vocab.questions) - 1,
            "num_answers": len(vocab.answers) - 1,
            "native_size_share": {size: float(np.mean(held_out.sizes == size)) for size in NATIVE_SIZES}}


# ---- the experiment -------------------------------------------------------------------------------
def _plot(cfg: NaViTPackingConfig, runs: dict, path) -> None:
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for pipeline, run in runs.items():
        acc = [p["accuracy"] for p in run["curve"]]
        axes[0].plot([p["step"] for p in run["curve"]], acc, "o-", ms=3, label=pipeline)
        axes[1].plot([p["images"] for p in run["curve"]], acc, "o-", ms=3, label=pipeline)
    for ax, xlabel, title in zip(axes, ("step", "images seen"), (f"equal compute: {cfg.slots} slots a step",
                                                                 "against images seen")):
        ax.axhline(next(iter(runs.values()))["final"]["majority_accuracy"], color="grey", ls=":",
                   label="image-blind majority")
        ax.set(xlabel=xlabel, ylabel="held-out QA accuracy", ylim=(0, 1), title=title)
        ax.legend(fontsize=8)
    waste = {n: 100 * run["wasted_fraction"] for n, run in runs.items()}
    for bar, (n, run) in zip(axes[2].bar(list(waste), list(waste.values()), color=["C0", "C1", "C2"]), runs.items()):
        axes[2].annotate(f"{waste[n]:.1f}%\n{run['images_per_step']:.1f} img/step",
                         (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    axes[2].set(ylabel="token slots wasted (padding), %", title="padding over the training steps",
                ylim=(0, max([*waste.values(), 1.0]) * 1.3))
    fig.suptitle(f"NaViT Patch n' Pack vs resize-to-square vs pad-to-max: shapes QA, sides {cfg.min_size}-"
                 f"{cfg.max_size} px, {cfg.steps} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _by_kind(runs: dict, pipeline: str) -> str:  # final held-out accuracy per question kind
    return "/".join(f"{runs[pipeline]['final'][f'accuracy/{kind}']:.2f}" for kind in QUESTION_KINDS)


def _size_shares(out: dict) -> str:  # the held-out questions' shares of the native sizes
    return "/".join(f"{100 * out['native_size_share'][size]:.0f}" for size in NATIVE_SIZES) + "% of the questions"


def _by_size(runs: dict, pipeline: str) -> str:  # final held-out accuracy per native size against the square
    final = runs[pipeline]["final"]
    return "/".join(f"{final[f'accuracy/native-{size}']:.2f}" if f"accuracy/native-{size}" in final else "—"
                    for size in NATIVE_SIZES)


@register_experiment("navit-packing", description="NaViT packing vs resize-to-square vs pad-to-max at equal "
                                                  "compute: wasted slots and shapes-QA accuracy", paper=PAPER,
                     quick_seconds=53,
                     quick=NaViTPackingConfig(steps=600, train_scenes=2000, eval_scenes=200, eval_every=100))
def navit_packing(cfg: NaViTPackingConfig, ctx: RunContext) -> ExperimentResult:
    out = run_pipelines(cfg, ctx.key, ctx.seed, progress=lambda it, desc: ctx.progress(it, desc=desc))
    runs, n_eval = out["runs"], out["eval_questions"]
    _plot(cfg, runs, ctx.figure_path)
    acc = {p: runs[p]["final"]["accuracy"] for p in PIPELINES}
    waste = {p: runs[p]["wasted_fraction"] for p in PIPELINES}
    ips = {p: runs[p]["images_per_step"] for p in PIPELINES}
    blind = runs["packed"]["final"]["majority_accuracy"]
    for p in PIPELINES:
        ctx.log(f"{p}: accuracy {acc[p]:.3f}, wasted {waste[p]:.4f}, {ips[p]:.2f} images/step, "
                f"{runs[p]['seconds']:.0f} s")
    rows = ", ".join(f"{p} {'x'.join(map(str, cfg.layout(p)))}" for p in PIPELINES)
    setup = f"{cfg.slots} token slots a step (B x L: {rows}), {cfg.steps} steps each"
    se = math.sqrt(0.25 / n_eval)  # the largest binomial standard error of an accuracy on n_eval questions
    noise = f"one run of seed {ctx.seed}; s.e. of one accuracy <= {se:.3f}"
    claims = (
        Claim(claim="packing native-resolution images wastes < 2% of the token slots (NaViT section 2.2: greedy "
                    "packing leaves under 2% padding)",
              holds=bool(waste["packed"] < 0.02),
              evidence=f"packed {100 * waste['packed']:.2f}% of the slots over {cfg.steps} steps (pad "
                       f"{100 * waste['pad']:.1f}%, resize {100 * waste['resize']:.1f}%)"),
        *(Claim(claim=f"at equal compute ({setup}) packed native resolution is at least as accurate as {label}: "
                      f"final held-out QA accuracy packed >= {other}, exact match over the same {n_eval} held-out "
                      f"questions ({source})",
                holds=bool(acc["packed"] >= acc[other]),
                evidence=f"packed {acc['packed']:.3f}, {other} {acc[other]:.3f} "
                         f"({acc['packed'] - acc[other]:+.3f}; {noise}); {detail}")
          for other, label, source, detail in (
              ("resize", "resize-to-square", "NaViT Fig. 1: NaViT above ViT at equal compute",
               f"by kind {_by_kind(runs, 'packed')} vs {_by_kind(runs, 'resize')}"),
              ("pad", "pad-to-max", "NaViT Figs. 1/4: padding spends compute on empty slots",
               f"images a step {ips['packed']:.1f} vs {ips['pad']:.1f}"))),
    )
    comparisons = (
        Comparison("padding share of token slots: packed / resize / pad",
                   f"{100 * waste['packed']:.2f}% / {100 * waste['resize']:.1f}% / {100 * waste['pad']:.1f}%",
                   "< 2% with packing", "NaViT section 2.2"),
        Comparison("images a step: packed / resize / pad", f"{ips['packed']:.1f} / {ips['resize']:.1f} / "
                   f"{ips['pad']:.1f}", None, None),
        Comparison("held-out QA accuracy: packed / resize / pad (image-blind majority)",
                   f"{acc['packed']:.3f} / {acc['resize']:.3f} / {acc['pad']:.3f} ({blind:.3f})",
                   "NaViT above ViT at every compute budget", "NaViT Fig. 1"),
        *(Comparison(f"held-out accuracy, {p}, by kind ({'/'.join(QUESTION_KINDS)})", _by_kind(runs, p), None, None)
          for p in PIPELINES),
        Comparison(f"held-out accuracy by native size against the {cfg.resize_grid}x{cfg.resize_grid}-patch square "
                   f"({'/'.join(NATIVE_SIZES)} images, {_size_shares(out)}): packed vs resize",
                   f"{_by_size(runs, 'packed')} vs {_by_size(runs, 'resize')}", None, None),
        Comparison("seconds of training and evaluation: packed / resize / pad (this machine, compiles included)",
                   " / ".join(f"{runs[p]['seconds']:.0f}" for p in PIPELINES), None, None),
    )
    summary = (f"One ViT-QA model, {setup}, on shapes scenes of {cfg.min_size}-{cfg.max_size} px sides. Packing "
               f"wastes {100 * waste['packed']:.2f}% of the slots ({ips['packed']:.1f} images a step), padding to the "
               f"largest image {100 * waste['pad']:.1f}% ({ips['pad']:.1f}), resizing to "
               f"{cfg.resize_grid * cfg.patch_size} px squares none ({ips['resize']:.1f}). Held-out accuracy over "
               f"{n_eval} questions: packed {acc['packed']:.3f}, resize {acc['resize']:.3f}, pad {acc['pad']:.3f} "
               f"(image-blind {blind:.3f}). By native size against the resized square "
               f"({'/'.join(NATIVE_SIZES)}): packed {_by_size(runs, 'packed')}, resize {_by_size(runs, 'resize')}.")
    metrics = {"config": dataclasses.asdict(cfg), "accuracy": acc, "wasted_fraction": waste, "images_per_step": ips,
               "eval_questions": n_eval, "majority_accuracy": blind, "resize_side": cfg.resize_grid * cfg.patch_size,
               **out}
    return ExperimentResult(metrics=metrics, comparisons=comparisons, summary=summary, claims=claims)
