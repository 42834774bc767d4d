"""``jaxlab train vlm``: a Kimi-VL-style vision-language model (Kimi Team 2025, "Kimi-VL Technical Report":
MoonViT -> 2x2 pixel shuffle -> MLP projector -> image tokens in the LM; :mod:`jaxlab.models.vlm`) trained
from scratch on question answering about shapes scenes (:mod:`jaxlab.models.vision_data`).

    jaxlab train vlm --out runs/vlm                  # default size: 600 steps, a minute or two on 2 CPU cores
    jaxlab train vlm --steps 2000 --lm-d-model 128 --out runs/vlm-big

At the default size the held-out answer accuracy ends well above the image-blind baseline (seed 0: 0.545
against 0.393 on 400 held-out questions; counts, colours and positions above their baselines).

Tokens: the UTF-8 bytes of the text (0-255, as the LM corpus; byte 0 pads), and three reserved ids above them:
``IMAGE_ID = 256`` (the ``<image>`` placeholder, expanded to one slot per merged image token), ``ANSWER_ID = 257``
(ends the question, the answer follows) and ``EOS_ID = 258`` (ends the answer); ``VOCAB_SIZE = 259``. An
example is ``<image> question <answer> answer <eos>``; the loss counts the answer bytes and ``<eos>`` (with
``question_loss`` the question bytes and ``<answer>`` too).

Evaluation, on held-out scenes (drawn from another key than the training pool): an answer is correct when
every one of its targets (its bytes and ``<eos>``) is the model's most likely token under teacher forcing,
which is exactly when greedy decoding after ``<answer>`` writes the answer and stops. The baseline is the
best a model blind to the image can do: the majority answer of each question text over the training pool
(the global majority for a question never seen). Both are logged (``eval/answer_accuracy``,
``eval/majority_accuracy``, and per question kind: count, colour, shape, position).

``--variant early-fusion`` (Chameleon Team 2024; :mod:`jaxlab.experiments._vlm_fusion`) trains a VQ-VAE image
tokenizer on the training scenes first (``OUT/vqvae/``, reused on resume; or ``--vq-path`` from an earlier run),
then one LM over ``<boi> image codes <eoi> question <answer> answer <eos>`` with QK-norm and the z-loss, on the
same questions, evaluated the same way.

    jaxlab train vlm --variant early-fusion --out runs/vlm-fusion     # seed 0: 0.498 against the same 0.393

Every field of :class:`VLMTrainConfig` is a flag (``jaxlab train vlm --help``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.loop import LoopConfig, fit
from jaxlab.metrics import to_jsonable
from jaxlab.models.corpus import encode
from jaxlab.models.lm import NO_DECAY_PARAMS, LMConfig, cross_entropy_sums, next_token_loss
from jaxlab.models.vision import ViTConfig
from jaxlab.models.vision_data import Scene, ShapesConfig, make_scenes
from jaxlab.models.vlm import (VLM, CapacityError, VLMConfig, VLMExample, init_vlm_params, pack_examples,
                               vlm_apply)
from jaxlab.optim import OptimizerConfig, lr_schedule, make_optimizer
from jaxlab.registry import register_trainer
from jaxlab.train_state import create_train_state, make_train_step
from jaxlab.validation import check, check_choice, check_greater, check_positive, check_range
from jaxlab.xla_options import FAST_COMPILE

__all__ = ["ANSWER_ID", "EOS_ID", "IMAGE_ID", "QABatches", "VARIANTS", "VLMTrainConfig", "VOCAB_SIZE",
           "answer_accuracy", "majority_answers", "qa_example", "question_kind", "train_vlm"]

IMAGE_ID, ANSWER_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259
VARIANTS = ("projector", "early-fusion")
QUESTION_KINDS = ("count", "colour", "shape", "position")


def qa_example(scene: Scene, qa_index: int, *, question_loss: bool = False) -> VLMExample:
    """``<image> question <answer> answer <eos>`` of the scene's ``qa_index``-th pair; the image as float32
    in [0, 1]. The loss counts the answer and ``<eos>`` (and the question and ``<answer>`` with
    ``question_loss``)."""
    question, answer = scene.qa[qa_index]
    q, a = encode(question), encode(answer)  # UTF-8 bytes
    tokens = np.concatenate([[IMAGE_ID], q, [ANSWER_ID], a, [EOS_ID]]).astype(np.int32)
    loss = np.zeros(len(tokens), bool)
    loss[len(q) + 2:] = True  # the answer bytes and <eos>
    if question_loss:
        loss[1:len(q) + 2] = True
    return VLMExample((scene.image.astype(np.float32) / 255.0,), tokens, loss)


def question_kind(question: str) -> str:
    """count | colour | shape | position (the four kinds of ``vision_data`` questions)."""
    for prefix, kind in (("How many", "count"), ("What colour", "colour"), ("What shape", "shape"),
                         ("Where", "position")):
        if question.startswith(prefix):
            return kind
    raise ValueError(f"question {question!r} is none of the kinds {QUESTION_KINDS}")


def majority_answers(scenes: list[Scene]) -> tuple[dict[str, str], str]:
    """The most frequent answer of each question text over the scenes' QA pairs, and the most frequent
    answer overall (for questions not seen): the image-blind baseline."""
    by_question: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    overall: collections.Counter = collections.Counter()
    for scene in scenes:
        for question, answer in scene.qa:
            by_question[question][answer] += 1
            overall[answer] += 1
    return {q: c.most_common(1)[0][0] for q, c in by_question.items()}, overall.most_common(1)[0][0]


def answer_accuracy(correct: np.ndarray, mask: np.ndarray, example_ids: np.ndarray, num_examples: int) -> np.ndarray:
    """bool [num_examples]: example e is right when every counted target of its slots is predicted
    (``correct``, ``mask`` and ``example_ids`` [B, L] of a packed batch; -1 ids are padding)."""
    wrong = np.zeros(num_examples, np.int64)
    counted = np.zeros(num_examples, np.int64)
    sel = (example_ids >= 0) & mask
    np.add.at(wrong, example_ids[sel], ~correct[sel])
    np.add.at(counted, example_ids[sel], 1)
    if (counted == 0).any():
        raise ValueError(f"examples {np.flatnonzero(counted == 0)[:8].tolist()} have no counted targets")
    return wrong == 0


@dataclasses.dataclass(frozen=True)
class VLMTrainConfig:
    """VLM training on shapes-scene QA: model, data, optimisation, evaluation and logging."""

    variant: str = "projector"
    """How images enter the LM: projector (Kimi-VL: ViT -> 2x2 pixel shuffle -> MLP projector -> LM) or
    early-fusion (Chameleon: VQ-VAE codes as LM tokens)."""
    steps: int = 600
    """Total optimizer steps (counted across restarts)."""
    rows: int = 16
    """Text rows per batch (whole examples packed by best fit)."""
    seq_len: int = 128
    """Slots per text row (tokens and image slots)."""
    image_rows: int = 8
    """Rows of packed image patches per batch."""
    image_len: int = 128
    """Patch slots per image row."""
    patch_size: int = 8
    """ViT patch edge in pixels."""
    min_size: int = 32
    """Smallest scene side in pixels (scenes are multiples of 2 * patch_size, so the 2x2 merge divides them)."""
    max_size: int = 48
    """Largest scene side in pixels."""
    max_shapes: int = 3
    """Most shapes per scene (1 to 9)."""
    vit_d_model: int = 64
    vit_layers: int = 2
    vit_heads: int = 4
    abs_pos_grid: int | None = 6
    """Side G of the ViT's learned [G, G] absolute position table, interpolated to each image's patch grid
    (MoonViT keeps SigLIP's; it tells a patch where in its image it lies); None: 2D RoPE only."""
    lm_d_model: int = 64
    lm_layers: int = 3
    """LM blocks (at the default size, 3 learned to read the image cell a question names within the
    step budget more often than 2)."""
    lm_heads: int = 4
    question_loss: bool = False
    """Also train on predicting the question bytes (default: the answer and <eos> only)."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    warmup_steps: int = 50
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    train_scenes: int = 2000
    """Scenes in the training pool (questions drawn from them at random)."""
    eval_scenes: int = 400
    """Held-out scenes; one question each is evaluated."""
    eval_every: int = 200
    """Held-out answer accuracy every this many steps (and at the end)."""
    log_every: int = 20
    checkpoint_every: int = 200
    seed: int = 0
    resume: bool = True
    """Continue from the latest checkpoint in the output folder when there is one."""
    progress: bool = True
    """Show a progress bar."""
    fusion_image_size: int = 32
    """early-fusion: every scene is resized (nearest pixel) to this square side before the VQ-VAE (Chameleon:
    512), so every image is (fusion_image_size / vq_downsample)^2 tokens."""
    vq_codebook_size: int = 256
    """early-fusion: VQ-VAE codes (image token ids in the LM's vocabulary)."""
    vq_code_dim: int = 32
    vq_hidden: int = 64
    vq_downsample: int = 4
    """early-fusion: pixels per code side."""
    vq_steps: int = 400
    """early-fusion: VQ-VAE training steps (before the LM's)."""
    vq_batch_size: int = 32
    vq_lr: float = 2e-3
    vq_codebook_update: str = "loss"
    """early-fusion: how the VQ-VAE's codes learn: "loss" (codebook loss) or "ema" (moving averages)."""
    vq_path: str | None = None
    """early-fusion: a trained VQ-VAE's folder (the vqvae/ folder of an earlier run) instead of training one."""
    z_loss: float = 1e-5
    """early-fusion: weight of the z-loss (log^2 of the softmax normaliser) on the LM's output logits."""
    image_loss: bool = False
    """early-fusion: also train on predicting the image tokens (what generating images needs)."""
    image_loss_fraction: float = 1.0
    """early-fusion with image_loss: the share of training examples whose image tokens are counted (example k
    drawn from ``default_rng((seed, 2, k))``); the others count the answer only, a mix of image-generation and
    VQA examples as in Chameleon's data mixture."""
    generated_images: int = 4
    """early-fusion with image_loss: images drawn after <boi> at each evaluation (OUT/generated.png and
    OUT/generated.npz)."""
    fast_compile: bool = False
    """Compile the step and the evaluation with XLA's backend optimisation off (faster compiles, slower steps:
    for short runs and tests)."""

    def __post_init__(self):
        check_choice(self, "variant", VARIANTS)
        check_positive(self, "steps", "rows", "image_rows", "patch_size", "vit_d_model", "vit_layers", "vit_heads",
                       "lm_d_model", "lm_layers", "lm_heads", "train_scenes", "eval_scenes", "eval_every",
                       "log_every", "checkpoint_every", integer=True)
        check_positive(self, "seq_len", "image_len", minimum=2, integer=True)
        check_range(self, "max_shapes", 1, 9)
        check_greater(self, "lr", "clip_norm")
        check_range(self, "weight_decay", 0.0, 1.0)
        check(0 <= self.warmup_steps < self.steps, f"warmup_steps={self.warmup_steps} must be in [0, steps="
                                                   f"{self.steps})")
        m = 2 * self.patch_size
        self.shapes_config()  # validates the scene sizes
        largest = (self.shapes_config().size_range[1] // self.patch_size) ** 2
        check(largest <= self.image_len, f"max_size={self.max_size} gives up to {largest} patches per image, more "
                                         f"than image_len={self.image_len} (patch_size={self.patch_size})")
        check(self.min_size >= m, f"min_size={self.min_size} must be >= 2 * patch_size = {m}")
        self.model_config()
        if self.variant == "early-fusion":
            check_positive(self, "fusion_image_size", "vq_codebook_size", "vq_code_dim", "vq_hidden", "vq_downsample",
                           "vq_steps", "vq_batch_size", integer=True)
            check_greater(self, "vq_lr")
            check_choice(self, "vq_codebook_update", ("loss", "ema"))
            if self.vq_path is not None:
                missing = [name for name in ("config.json", "params.msgpack")
                           if not (pathlib.Path(self.vq_path) / name).is_file()]
                check(not missing, f"vq_path={self.vq_path!r} must be a VQ-VAE folder (the vqvae/ of an earlier run), "
                                   f"but it has no {' or '.join(missing)}")
            check_range(self, "z_loss", 0.0, 1.0)
            check_range(self, "image_loss_fraction", 0.0, 1.0, open_low=True)
            check_positive(self, "generated_images", integer=True)
            f = self.vq_downsample
            check(self.fusion_image_size % f == 0, f"fusion_image_size={self.fusion_image_size} must be a multiple "
                                                   f"of vq_downsample={f}")
            block = (self.fusion_image_size // f) ** 2 + 2
            check(block + 16 <= self.seq_len, f"an image is {block} tokens with <boi>/<eoi> (fusion_image_size="
                                              f"{self.fusion_image_size}, vq_downsample={f}), too many for "
                                              f"seq_len={self.seq_len} with a question and answer")

    def shapes_config(self) -> ShapesConfig:
        return ShapesConfig(min_size=self.min_size, max_size=self.max_size, size_multiple=2 * self.patch_size,
                            min_shapes=1, max_shapes=self.max_shapes)

    def model_config(self) -> VLMConfig:
        vit = ViTConfig(patch_size=self.patch_size, d_model=self.vit_d_model, num_layers=self.vit_layers,
                        num_heads=self.vit_heads, num_channels=3, abs_pos_grid=self.abs_pos_grid)
        lm = LMConfig(vocab_size=VOCAB_SIZE, d_model=self.lm_d_model, num_layers=self.lm_layers,
                      num_heads=self.lm_heads, max_len=self.seq_len)
        return VLMConfig(vit=vit, lm=lm, image_token=IMAGE_ID, merge_factor=2)

    def pack_kwargs(self) -> dict:
        """The fixed batch shape of :func:`jaxlab.models.vlm.pack_examples`."""
        return {"seq_len": self.seq_len, "patch_size": self.patch_size, "image_len": self.image_len,
                "image_token": IMAGE_ID, "factor": 2, "num_rows": self.rows, "image_rows": self.image_rows,
                "image_tokens": self.image_rows * self.image_len // 4}


def _fill(examples: list[VLMExample], start: int, cfg: VLMTrainConfig, take) -> tuple[dict, int]:
    """Pack examples ``take(start), take(start + 1), ...`` into one fixed-shape batch: as many as fit.
    Returns ``(batch, next index)``; ``examples`` receives the packed ones."""
    P, L, room_text, room_patches = cfg.patch_size, cfg.seq_len, cfg.rows * cfg.seq_len, cfg.image_rows * cfg.image_len
    kw = cfg.pack_kwargs()
    used_text = used_patches = 0
    i = start
    while True:  # add while the totals fit, then let the packers decide
        ex = take(i)
        if ex is None:
            break
        h, w = (s // P for s in ex.images[0].shape[:2])
        n_text, n_patches = len(ex.tokens) - 1 + (h // 2) * (w // 2), h * w
        if examples and (used_text + n_text > room_text or used_patches + n_patches > room_patches):
            break
        check(n_text <= L, f"an example needs {n_text} slots, more than seq_len={L}")
        examples.append(ex)
        used_text, used_patches, i = used_text + n_text, used_patches + n_patches, i + 1
    while True:
        try:
            return pack_examples(examples, **kw), start + len(examples)
        except CapacityError:
            if len(examples) == 1:
                raise
            examples.pop()


class QABatches:
    """Training batches: example k is question ``qa_k`` of scene ``s_k`` of the pool, both drawn from
    ``default_rng((seed, 0, k))``; each batch packs the next examples that fit (see :func:`_fill`). The position
    ``{"next": k}`` is checkpointed by ``fit``."""

    def __init__(self, scenes: list[Scene], cfg: VLMTrainConfig):
        self.scenes, self.cfg, self.next = scenes, cfg, 0

    def pick(self, k: int) -> tuple[int, int]:
        """Example k's (scene index, question index), from ``default_rng((seed, 0, k))``."""
        rng = np.random.default_rng((self.cfg.seed, 0, k))
        s = int(rng.integers(len(self.scenes)))
        return s, int(rng.integers(len(self.scenes[s].qa)))

    def example(self, k: int) -> VLMExample:
        s, q = self.pick(k)
        return qa_example(self.scenes[s], q, question_loss=self.cfg.question_loss)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch, self.next = _fill([], self.next, self.cfg, self.example)
        return batch

    def get_state(self) -> dict:
        return {"next": self.next}

    def set_state(self, state: dict) -> None:
        self.next = int(state["next"])


def eval_batches(pairs: list[tuple[Scene, int]], cfg: VLMTrainConfig) -> list[tuple[dict, int]]:
    """The held-out (scene, question) pairs packed in order into fixed-shape batches: ``(batch, first index)``
    each (the batch's ``example_ids`` count from its first pair). The loss counts the answers only."""
    examples = [qa_example(scene, q) for scene, q in pairs]
    batches, start = [], 0
    while start < len(examples):
        batch, end = _fill([], start, cfg, lambda k: examples[k] if k < len(examples) else None)
        batches.append((batch, start))
        start = end
    return batches


def make_loss_fn(model: VLM):
    """``loss_fn(params, batch, key) -> (loss, metrics)``: next-token cross-entropy over the counted text
    targets (the spine's :func:`jaxlab.train_state.make_train_step`)."""

    def loss_fn(params, batch, key):
        del key  # no dropout
        logits, aux = vlm_apply(model, params, batch)
        ce, metrics = next_token_loss(logits, batch["targets"], batch["mask"])
        return ce + aux["aux_loss"], {"cross_entropy": ce, **metrics}

    return loss_fn


def make_eval_fn(model: VLM | None, batches: list[tuple[dict, int]], pairs: list[tuple[Scene, int]],
                 majority: tuple[dict[str, str], str], compiler_options: dict | None = None, *, logits_fn=None):
    """``eval_fn(params) -> metrics``: answer loss, answer accuracy (overall and per question kind) of the
    held-out pairs, and the image-blind majority baseline on the same pairs. ``logits_fn(params, batch) ->
    logits [B, L, V]`` (default: the projector ``model``'s) is how another variant computes its logits."""
    if logits_fn is None:
        logits_fn = lambda params, batch: vlm_apply(model, params, batch)[0]  # noqa: E731

    def forward(params, batch):
        logits = logits_fn(params, batch)
        nll, _, count = cross_entropy_sums(logits, batch["targets"], batch["mask"])
        return nll, count, jnp.argmax(logits, axis=-1) == batch["targets"]

    run = jax.jit(forward, compiler_options=compiler_options)

    questions = [scene.qa[q] for scene, q in pairs]
    kinds = np.array([question_kind(q) for q, _ in questions])
    by_question, fallback = majority
    blind = np.array([by_question.get(q, fallback) == a for q, a in questions])

    def eval_fn(params) -> dict[str, float]:
        right = np.zeros(len(pairs), bool)
        nll = count = 0.0
        for batch, first in batches:
            n, c, correct = jax.device_get(run(params, batch))
            nll, count = nll + float(n), count + float(c)
            ids = batch["example_ids"]
            num = int(ids.max()) + 1
            right[first:first + num] = answer_accuracy(correct, batch["mask"], ids, num)
        out = {"answer_loss": nll / max(count, 1.0), "answer_accuracy": float(right.mean()),
               "majority_accuracy": float(blind.mean())}
        for kind in QUESTION_KINDS:
            if (kinds == kind).any():
                out[f"answer_accuracy/{kind}"] = float(right[kinds == kind].mean())
                out[f"majority_accuracy/{kind}"] = float(blind[kinds == kind].mean())
        return out

    return eval_fn


def train_vlm(cfg: VLMTrainConfig, out_dir: str | pathlib.Path) -> dict:
    """Train (or resume) under ``out_dir`` (checkpoints/, metrics.jsonl, config.json, summary.json); returns
    the summary (held-out answer accuracy and the majority baseline, steps, timing)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = jax.random.PRNGKey(cfg.seed)
    shapes = cfg.shapes_config()
    train_scenes = make_scenes(jax.random.fold_in(key, 0), cfg.train_scenes, shapes)
    held_out = make_scenes(jax.random.fold_in(key, 1), cfg.eval_scenes, shapes)
    pick = np.random.default_rng((cfg.seed, 1))
    pairs = [(s, int(pick.integers(len(s.qa)))) for s in held_out]
    majority = majority_answers(train_scenes)

    options = FAST_COMPILE if cfg.fast_compile else None
    extra: dict = {}
    if cfg.variant == "early-fusion":  # imported here: _vlm_fusion imports this module
        from jaxlab.experiments._vlm_fusion import early_fusion_parts  # noqa: PLC0415
        data, params, loss_fn, evaluate, extra = early_fusion_parts(cfg, out_dir, train_scenes, pairs, majority,
                                                                    key, options)
    else:
        data = QABatches(train_scenes, cfg)
        model = VLM(cfg.model_config())
        params = init_vlm_params(model, jax.random.fold_in(key, 2), eval_batches(pairs[:1], cfg)[0][0])
        loss_fn = make_loss_fn(model)
        evaluate = make_eval_fn(model, eval_batches(pairs, cfg), pairs, majority, options)
    num_params = {name: sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree)) for name, tree in params.items()}
    opt_cfg = OptimizerConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, decay_steps=cfg.steps,
                              weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    tx, schedule = make_optimizer(opt_cfg, no_decay=NO_DECAY_PARAMS), lr_schedule(opt_cfg)
    base_step = make_train_step(loss_fn, tx)

    def train_step(state, batch, key):
        lr = schedule(state.step)
        state, metrics = base_step(state, batch, key)
        return state, {**metrics, "lr": lr}

    state = create_train_state(params, tx, jax.random.fold_in(key, 3))
    last_eval: dict = {}

    def eval_fn(state):
        last_eval.update(evaluate(state.params))
        return dict(last_eval)

    (out_dir / "config.json").write_text(json.dumps(to_jsonable(cfg), indent=2))
    loop = LoopConfig(num_steps=cfg.steps, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                      resume=cfg.resume, progress=cfg.progress)
    start = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=0, compiler_options=options)  # jit_train_step's, with the options
    result = fit(step, state, data, loop, out_dir, eval_fn=eval_fn, eval_every=cfg.eval_every)
    elapsed = time.perf_counter() - start
    if not last_eval and not result.preempted:
        last_eval.update(evaluate(result.state.params))
    summary = {"step": int(result.state.step), "resumed_from": result.resumed_from, "preempted": result.preempted,
               "variant": cfg.variant, "num_params": num_params, "seconds": elapsed,
               "examples_seen": data.next, **extra, **{f"eval/{k}": v for k, v in last_eval.items()}}
    if last_eval:
        summary["beats_majority"] = bool(last_eval["answer_accuracy"] > last_eval["majority_accuracy"])
    (out_dir / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=2))
    if last_eval:
        print(f"step {summary['step']}: held-out answer accuracy {last_eval['answer_accuracy']:.3f} "
              f"(image-blind majority baseline {last_eval['majority_accuracy']:.3f})")
    return summary


@register_trainer("vlm", description="Kimi-VL-style VLM (ViT -> 2x2 pixel shuffle -> projector -> LM) or "
                                     "Chameleon-style early fusion (VQ-VAE codes as LM tokens) on shapes-scene QA, "
                                     "exact resume", config=VLMTrainConfig)
def vlm(cfg: VLMTrainConfig, out_dir: pathlib.Path) -> dict:
    return train_vlm(cfg, out_dir)
