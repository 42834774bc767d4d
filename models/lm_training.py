"""Training a byte-level :class:`~jaxlab.models.lm.LM` on a text corpus: the pieces and the driver.

    cfg = LMTrainConfig(mixer="mamba2", steps=2000)          # `jaxlab train lm --mixer mamba2 --steps 2000`
    summary = train_lm(cfg, "runs/lm")                       # resumes when runs/lm has a checkpoint

The driver is the foundation's loop (:func:`jaxlab.loop.fit`) around

* data: :func:`~jaxlab.models.corpus.load_corpus` (the Python standard library by default) packed by
  :class:`~jaxlab.models.corpus.PackedIterator` into ``[B, L]`` rows with ``segment_ids``,
  ``positions``, ``targets`` and their ``mask`` (the one LM batch schema; no padding, no target crosses a
  document boundary);
* the step: the LM's :func:`~jaxlab.models.lm.next_token_loss` over the masked targets, through
  the spine's :func:`jaxlab.train_state.make_train_step`, with the spine's optimizer
  (:func:`jaxlab.optim.make_optimizer`: AdamW after global-norm clipping, linear warmup and cosine
  decay, no weight decay on :data:`~jaxlab.models.lm.NO_DECAY_PARAMS`); bf16 compute with fp32
  parameters on request;
* evaluation: validation loss and bits per byte (:func:`make_eval_fn`; a token is a byte, so
  bpb = nats / ln 2), and text samples (:func:`sample_text`) printed and logged to ``samples.jsonl``.

Checkpoints hold the train state (parameters, optimizer state, step, base PRNG key) and the data
cursor, so a run stopped at any step and restarted continues bit-for-bit as if uninterrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.loop import LoopConfig, fit
from jaxlab.metrics import to_jsonable
from jaxlab.models.corpus import PAD_ID, VOCAB_SIZE, PackedIterator, decode, encode, load_corpus
from jaxlab.models.linear_mixers import redraw_favor_projections
from jaxlab.models.lm import (FFNS, LM, MIXERS, NO_DECAY_PARAMS, LMConfig, cross_entropy_sums, init_params,
                              next_token_loss, param_logical_axes)
from jaxlab.models.packing import pack_documents, packing_stats, padded_efficiency
from jaxlab.models.remat import validate_remat
from jaxlab.models.sampling import sample
from jaxlab.optim import OptimizerConfig, lr_schedule, make_optimizer, muon_dimensions
from jaxlab.train_state import create_train_state, jit_train_step, make_train_step
from jaxlab.parallel.mesh import format_mesh, mesh_from_spec, parse_mesh
from jaxlab.parallel.rules import check_mesh_for
from jaxlab.parallel.strategies import STRATEGIES, shard_train_state
from jaxlab.validation import check, check_choice, check_positive

STRATEGY_NAMES = tuple(STRATEGIES)

__all__ = ["LMTrainConfig", "check_architecture_unset", "eval_batches", "load_for_training", "make_eval_fn",
           "make_loss_fn", "redraw_features", "sample_text", "train_lm"]


ARCHITECTURE_FIELDS = ("mixer", "d_model", "num_layers", "num_heads", "ffn", "num_experts", "top_k",
                       "shared_experts", "moe_balance", "moe_gate", "feature_map", "feature_redraw", "sparse_pattern",
                       "sparse_stride", "sparse_summary", "lsh_buckets", "lsh_chunk", "lsh_rounds")
"""LMTrainConfig fields that a checkpoint (``init_from``) decides."""


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
    """Byte-level LM training: model, data, optimisation, evaluation and logging."""

    mixer: str = "attention"
    """Token mixer: attention | sliding | linear | gau | s4d | s5 | mamba | mamba2 | rwkv | retnet | lru | s4 |
    sparse (Sparse Transformer patterns, --sparse-pattern/--sparse-stride) | lsh (Reformer LSH attention,
    --lsh-buckets/--lsh-chunk/--lsh-rounds; no decoding, so --sample-every 0)."""
    feature_map: str = "elu"
    """Feature map of the linear mixer: elu (elu + 1) | favor (Performer FAVOR+ random features)."""
    feature_redraw: int | None = None
    """Redraw the FAVOR+ random features every this many steps, a pure function of the step and its key
    (--mixer linear --feature-map favor); None: drawn once at init."""
    sparse_pattern: str = "strided"
    """Pattern of --mixer sparse: strided | fixed."""
    sparse_stride: int = 16
    """Stride (block length) of --mixer sparse."""
    sparse_summary: int = 1
    """Summary tokens per block of --sparse-pattern fixed."""
    lsh_buckets: int = 8
    """Hash buckets per round of --mixer lsh (1 or even)."""
    lsh_chunk: int = 32
    """Chunk length of --mixer lsh's sorted sequence."""
    lsh_rounds: int = 2
    """Hashing rounds of --mixer lsh."""
    data: str | None = None
    """Text file, folder of text files, or JSONL file with a "text" field (default: the Python stdlib's .py files)."""
    steps: int = 2000
    """Total optimizer steps (counted across restarts)."""
    batch_size: int = 16
    """Rows per batch."""
    seq_len: int = 256
    """Tokens (bytes) per row."""
    d_model: int = 128
    """Model width."""
    num_layers: int = 4
    """Residual blocks."""
    num_heads: int = 4
    """Attention heads (attention / sliding / linear mixers)."""
    ffn: str = "swiglu"
    """Feed-forward: swiglu | gelu | moe (routed + shared experts; expert parallel on a mesh's expert axis)."""
    num_experts: int = 8
    """Routed experts per MoE layer (--ffn moe)."""
    top_k: int = 2
    """Routed experts per token (--ffn moe)."""
    shared_experts: int = 1
    """Shared experts every token passes through (--ffn moe)."""
    moe_balance: str = "aux_loss"
    """Expert load balancing (--ffn moe): aux_loss (Switch's auxiliary loss) | bias (DeepSeek-V3's
    auxiliary-loss-free per-expert routing bias, nudged by sign descent towards equal load)."""
    moe_gate: str = "softmax"
    """Router scores (--ffn moe): softmax (Switch, Mixtral) | sigmoid (DeepSeek-V3: per-expert sigmoid
    affinities, the chosen ones renormalised)."""
    moe_bias_rate: float = 1e-3
    """Update speed gamma of the balancing bias (--moe-balance bias): each step an overloaded expert's
    bias falls by gamma and an underloaded one's rises by gamma (DeepSeek-V3 and Wang et al. 2024: 1e-3)."""
    optimizer: str = "adamw"
    """adamw | muon (Newton-Schulz orthogonalised momentum on the hidden matrices at AdamW's update RMS,
    Moonlight; AdamW on embeddings, norms and the SSM dynamics). The same lr and weight decay serve both."""
    scan_layers: bool = False
    """Run the blocks as one scan over parameters stacked on a layer axis (faster compiles of deep models;
    remat per scanned block)."""
    dtype: str = "float32"
    """Compute dtype: float32 or bfloat16 (parameters and optimizer state stay float32)."""
    remat: str = "none"
    """Activation checkpointing: none | full | dots | offload."""
    lr: float = 3e-3
    """Peak learning rate (after warmup)."""
    warmup_steps: int | None = None
    """Linear warmup steps from 0 to lr (None: a tenth of the steps, at most 100)."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (matrices only; not norms, biases or the SSM dynamics)."""
    clip_norm: float = 1.0
    """Global gradient-norm clipping threshold."""
    eval_every: int = 250
    """Validation loss and bits/byte every this many steps (and at the end)."""
    eval_batches: int = 8
    """Validation batches per evaluation (the same ones every time)."""
    sample_every: int = 500
    """Print a text sample every this many steps (0: never)."""
    sample_prompt: str = "def "
    """Prompt of the printed samples."""
    sample_tokens: int = 128
    """Bytes generated per sample."""
    temperature: float = 0.8
    """Sampling temperature (0: greedy)."""
    log_every: int = 10
    """Write training metrics to metrics.jsonl every this many steps."""
    checkpoint_every: int = 250
    """Save a checkpoint (state and data position) every this many steps."""
    val_fraction: float = 0.05
    """Share of documents held out for validation (by hash of their name)."""
    max_documents: int | None = None
    """Use a deterministic subset of this many documents (None: all)."""
    seed: int = 0
    """Seed of the initialisation, the data order and the samples."""
    resume: bool = True
    """Continue from the latest checkpoint in the output folder when there is one."""
    progress: bool = True
    """Show a progress bar."""
    skip_nonfinite: bool = False
    """Skip steps with a non-finite loss or gradient (counted in the metrics) instead of stopping the run."""
    mesh: str | None = None
    """Device mesh, e.g. "data=4,model=2" (axes data, model, expert, seq; data left out takes the devices
    the others leave). None: every device on data (plain one-device training on one device)."""
    strategy: str = "ddp"
    """How the training state is split over the data axis: ddp | zero1 | zero2 | zero3."""
    grad_accum: int = 1
    """Microbatches per step, their gradients summed inside one jitted step (lax.scan)."""
    init_from: str | None = None
    """Start from a Hugging Face checkpoint folder (Llama, Qwen2, Mistral, GPT-2: config.json, *.safetensors,
    tokenizer.json): its architecture and weights, the text tokenized by its tokenizer (continued pretraining
    or SFT). The architecture flags (--mixer, --d-model, --num-layers, --num-heads, --ffn) keep their defaults;
    the trained weights are written back to OUT/hf in the same format."""

    def __post_init__(self):
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer={self.mixer!r} must be one of {MIXERS}")
        check_positive(self, "steps", "batch_size", "d_model", "num_layers", "num_heads", "eval_every",
                       "eval_batches", "sample_tokens", "log_every", "checkpoint_every")
        check_positive(self, "seq_len", minimum=2)
        check_positive(self, "grad_accum", integer=True)
        check_choice(self, "strategy", STRATEGY_NAMES)
        check_choice(self, "ffn", FFNS)
        check_choice(self, "optimizer", ("adamw", "muon"))
        check(self.batch_size % self.grad_accum == 0,
              f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")
        if self.mesh is not None:
            parse_mesh(self.mesh)
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be in [0, steps={self.steps})")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        validate_remat(self.remat)
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.weight_decay >= 0 and self.clip_norm > 0):
            raise ValueError(f"need lr > 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0, clip_norm > 0; got "
                             f"{self.lr=}, {self.min_lr_ratio=}, {self.weight_decay=}, {self.clip_norm=}")
        if self.sample_every < 0 or self.temperature < 0:
            raise ValueError(f"{self.sample_every=} and {self.temperature=} must be >= 0")
        if not self.sample_prompt:
            raise ValueError("sample_prompt must be non-empty")
        self.model_config()  # validates the model fields (d_model vs num_heads, ...)
        if self.mixer == "lsh" and self.sample_every:
            raise ValueError(f"sample_every={self.sample_every} needs decoding, which mixer='lsh' does not have: "
                             "set sample_every=0 (--sample-every 0)")
        check_architecture_unset(self, ARCHITECTURE_FIELDS)

    def optimizer_config(self) -> OptimizerConfig:
        """AdamW or Muon (beta2 0.95) after clipping, linear warmup then cosine decay to ``lr * min_lr_ratio``."""
        warmup = min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps
        return OptimizerConfig(lr=self.lr, algorithm=self.optimizer, warmup_steps=warmup, decay_steps=self.steps,
                               min_lr_ratio=self.min_lr_ratio, b2=0.95, weight_decay=self.weight_decay,
                               clip_norm=self.clip_norm)

    def model_config(self) -> LMConfig:
        max_len = max(self.seq_len, len(encode(self.sample_prompt)) + self.sample_tokens)
        return LMConfig(vocab_size=VOCAB_SIZE, d_model=self.d_model, num_layers=self.num_layers,
                        num_heads=self.num_heads, mixer=self.mixer, ffn=self.ffn, num_experts=self.num_experts,
                        experts_per_token=self.top_k, num_shared_experts=self.shared_experts,
                        moe_balance=self.moe_balance, moe_gate=self.moe_gate,
                        moe_bias_rate=self.moe_bias_rate, remat=self.remat, feature_map=self.feature_map,
                        feature_redraw=self.feature_redraw, sparse_pattern=self.sparse_pattern,
                        sparse_stride=self.sparse_stride, sparse_summary=self.sparse_summary,
                        lsh_buckets=self.lsh_buckets, lsh_chunk=self.lsh_chunk, lsh_rounds=self.lsh_rounds,
                        scan_layers=self.scan_layers, max_len=max_len, dtype=self.dtype, param_dtype="float32")


def _apply(model: LM, params, batch):
    """Logits of a batch; ``segment_ids``/``positions`` are optional (absent: one document per row,
    which lets attention use kernels without segment masks, e.g. cuDNN's)."""
    return model.apply({"params": params}, batch["inputs"], segment_ids=batch.get("segment_ids"),
                       positions=batch.get("positions"))


def make_loss_fn(model: LM):
    """``loss_fn(params, batch, key) -> (loss, aux)`` for :func:`jaxlab.train_state.make_train_step`."""

    def loss_fn(params, batch, key):
        del key  # the model has no dropout; the step key stays part of the state for extensions
        logits, aux = _apply(model, params, batch)
        ce, metrics = next_token_loss(logits, batch["targets"], batch["mask"])
        if model.cfg.ffn == "moe":
            metrics.update(moe_metrics(aux))
        return ce + aux["aux_loss"], {"cross_entropy": ce, **metrics}

    return loss_fn


def make_lm_optimizer(opt_cfg: OptimizerConfig, model: LM) -> optax.GradientTransformation:
    """The spine's optimizer for ``model``: decay masked by :data:`~jaxlab.models.lm.NO_DECAY_PARAMS`;
    with Muon, the matrices and their row/column axes read from the parameters' logical axis names and,
    for the mixers' unnamed ``Dense`` kernels, their shapes (:func:`jaxlab.optim.muon_dimensions`); with ``moe_balance="bias"``, the ``router_bias`` leaves by
    sign descent at ``moe_bias_rate`` (DeepSeek-V3's gamma)."""
    mc = model.cfg
    muon_dims = None
    if opt_cfg.algorithm == "muon":
        shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
        muon_dims = muon_dimensions(param_logical_axes(model), shapes)
    sign = {"router_bias": mc.moe_bias_rate} if mc.ffn == "moe" and mc.moe_balance == "bias" else None
    return make_optimizer(opt_cfg, no_decay=NO_DECAY_PARAMS, muon_dims=muon_dims, sign_descent=sign)


def moe_metrics(aux: dict) -> dict:
    """Load-balance metrics of an MoE LM's ``aux``: the expert load histogram (fraction of token-expert
    assignments per expert, mean over layers, ``moe/load`` [E]), its coefficient of variation (std / mean
    over experts, per layer, then averaged; 0 = perfectly balanced), the busiest expert's load over the
    mean, the dropped fraction (0 when dropless) and the auxiliary loss."""
    load = aux["expert_load"]  # [num_layers, E]
    mean = jnp.mean(load, axis=-1)  # [num_layers]
    return {"moe/load": jnp.mean(load, axis=0), "moe/load_cv": jnp.mean(jnp.std(load, axis=-1) / mean),
            "moe/max_load": jnp.mean(jnp.max(load, axis=-1) / mean), "moe/dropped": aux["dropped_fraction"],
            "moe/load_balance_loss": aux["load_balance_loss"]}


def eval_batches(docs, batch_size: int, seq_len: int, max_batches: int) -> list[dict[str, np.ndarray]]:
    """A fixed validation set: ``max_batches`` batches of rows spread evenly over the documents packed in
    order (every row when there are fewer; the last batch padded with empty rows).

    Spreading matters: the first rows of the packed split are its first few documents (at 16 x 128 bytes per
    batch, four batches are 8 KB of the stdlib's 1.8 MB validation split), so scores on them swing with those
    files' style rather than with the model."""
    rows = pack_documents(docs, seq_len, pad_id=PAD_ID)
    total, wanted = len(rows["inputs"]), max_batches * batch_size
    if total > wanted:
        pick = np.linspace(0, total - 1, wanted).round().astype(np.int64)  # evenly spaced, first and last included
        rows = {k: v[pick] for k, v in rows.items()}
    n = -(-len(rows["inputs"]) // batch_size) * batch_size
    rows = {k: np.concatenate([v, np.zeros((n - len(v), seq_len), v.dtype)]) for k, v in rows.items()}
    return [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, n, batch_size)]


def make_eval_fn(model: LM, batches: list[dict], target_bytes: float | None = None):
    """``eval_fn(params) -> {"loss", "bpb", "accuracy"}`` over fixed batches (target-weighted means).

    ``target_bytes``: UTF-8 bytes the batches' targets decode to, for bits per byte with a subword tokenizer
    (None: one token is one byte)."""

    @jax.jit
    def sums(params, batch):
        return cross_entropy_sums(_apply(model, params, batch)[0], batch["targets"], batch["mask"])

    def eval_fn(params) -> dict[str, float]:
        totals = np.zeros(3)
        for batch in batches:
            totals += np.asarray(jax.device_get(sums(params, batch)), np.float64)
        nll, correct, count = totals
        loss = nll / max(count, 1.0)
        bytes_ = count if target_bytes is None else target_bytes
        return {"loss": loss, "bpb": nll / max(bytes_, 1.0) / math.log(2), "accuracy": correct / max(count, 1.0)}

    return eval_fn


def sample_text(model: LM, params, prompt: str, max_new_tokens: int, key: jax.Array,
                temperature: float = 0.8, tokenizer=None) -> str:
    """Continue ``prompt`` by ``max_new_tokens`` tokens (bytes, or the ``tokenizer``'s: an
    ``models.hub.HFTokenizer``); returns prompt + continuation as text."""
    enc, dec = (encode, decode) if tokenizer is None else (tokenizer.encode, tokenizer.decode)
    tokens = jnp.asarray(enc(prompt), jnp.int32)[None]
    out = sample(model, params, tokens, key, max_new_tokens, temperature=temperature).tokens
    return dec(np.asarray(out[0]))


def target_bytes(batches: list[dict], tokenizer) -> float:
    """UTF-8 bytes of the targets of ``batches`` (packed rows of ``tokenizer``'s tokens): per row and document,
    the decoded text of its tokens after the first (the first token of a document is never a target)."""
    total = 0
    for batch in batches:
        for inputs, seg in zip(batch["inputs"], batch["segment_ids"]):
            for s in np.unique(seg[seg > 0]):
                ids = inputs[seg == s][1:]
                total += len(tokenizer.decode(ids).encode("utf-8"))
    return float(total)


def check_architecture_unset(cfg, fields: tuple[str, ...]) -> None:
    """With ``cfg.init_from`` set, every field of ``fields`` (the model's architecture) must keep its default:
    the checkpoint decides it. ``ValueError`` naming the first field set (the trainers' ``--init-from`` check)."""
    if getattr(cfg, "init_from", None) is None:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name in fields:
        if getattr(cfg, name) != defaults[name]:
            raise ValueError(f"{name}={getattr(cfg, name)!r} cannot be set with init_from={cfg.init_from!r}: "
                             "the architecture comes from the checkpoint")


def load_for_training(path, *, context: int, dtype: str = "float32", context_name: str = "seq_len",
                      **config_overrides):
    """``(model, params, tokenizer)`` of the Hugging Face checkpoint folder ``path`` to train from: float32
    parameters, compute ``dtype``, ``config_overrides`` (``remat``, ``scan_layers``, ...); a clear error when
    the folder has no tokenizer or a context shorter than ``context`` tokens (``context_name`` names what
    needs them). The one loader of ``--init-from`` (``jaxlab train lm``, ``jaxlab train posttrain``)."""
    from jaxlab.models.hub import load_pretrained

    model, params, tokenizer = load_pretrained(path, dtype="float32", **config_overrides)
    if tokenizer is None:
        raise ValueError(f"init_from={str(path)!r} has no tokenizer.json: its text cannot be tokenized")
    if model.cfg.max_len < context:
        raise ValueError(f"{context_name}={context} exceeds the checkpoint's context of {model.cfg.max_len} tokens")
    return LM(dataclasses.replace(model.cfg, dtype=dtype)), params, tokenizer


def from_pretrained(cfg: LMTrainConfig):
    """``(model, params, tokenizer)`` of ``cfg.init_from``: float32 parameters, ``cfg``'s compute dtype, remat
    and layer layout; a clear error when the folder has no tokenizer or a context shorter than ``seq_len``."""
    return load_for_training(cfg.init_from, context=cfg.seq_len, dtype=cfg.dtype, scan_layers=cfg.scan_layers,
                             remat=cfg.remat)


REDRAW_SALT = 0xFEA7
"""Folded into the step key for the FAVOR+ redraw, apart from any other use of that key."""


def redraw_features(params, step, key, every: int):
    """FAVOR+'s features redrawn at the start of every step ``step % every == 0`` after the first (Performer,
    Section 4.2), from ``fold_in(key, REDRAW_SALT)`` with ``key`` the step key (``fold_in(state.key, step)``):
    a pure function of the state, so a resumed run redraws exactly as the uninterrupted one."""
    redraw = (step > 0) & (step % every == 0)
    return jax.lax.cond(redraw, lambda p: redraw_favor_projections(p, jax.random.fold_in(key, REDRAW_SALT)),
                        lambda p: p, params)


def _log(message: str) -> None:
    """Print a progress message (process 0 only in a multi-process run)."""
    if jax.process_index():
        return
    from tqdm.auto import tqdm

    tqdm.write(message)


def _sharded(cfg: LMTrainConfig, mesh, model: LM, state, tx, schedule):
    """The state laid out on ``mesh`` by ``cfg.strategy`` and the sharded spine step (tensor, expert and
    context parallel from the model's logical axes, ZeRO over ``data``); the mesh is checked against the
    model and the batch before anything compiles."""
    axes = param_logical_axes(model)
    rows = cfg.batch_size // cfg.grad_accum
    check_mesh_for(mesh, params=state.params, param_axes=axes,
                   batch={"inputs": jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32)})
    _log(f"mesh: {format_mesh(mesh)} ({mesh.size} devices), strategy {cfg.strategy}, grad_accum {cfg.grad_accum}")
    state = shard_train_state(state, mesh, cfg.strategy, param_axes=axes)
    step = make_train_step(make_loss_fn(model), tx, mesh=mesh, strategy=cfg.strategy, param_axes=axes,
                           grad_accum=cfg.grad_accum)

    redraw = None
    if model.cfg.feature_redraw is not None:  # its own small program, the parameters' layout kept
        redraw = jax.jit(functools.partial(redraw_features, every=model.cfg.feature_redraw), donate_argnums=0,
                         out_shardings=jax.tree.map(lambda x: x.sharding, state.params))

    def train_step(state, batch, key):
        lr = schedule(state.step)
        if redraw is not None:
            state = state.replace(params=redraw(state.params, state.step, key))
        state, metrics = step(state, batch, key)
        return state, {**metrics, "lr": lr}

    return state, train_step


def train_lm(cfg: LMTrainConfig, out_dir: str | pathlib.Path) -> dict:
    """Train (or resume) under ``out_dir`` (checkpoints/, metrics.jsonl, samples.jsonl, config.json);
    returns a summary dict (final validation loss/bpb, step, packing efficiency, timing)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(cfg.data, val_fraction=cfg.val_fraction, max_documents=cfg.max_documents)
    _log(f"data: {corpus.describe()}")
    key = jax.random.PRNGKey(cfg.seed)
    if cfg.init_from is None:
        model, tokenizer = LM(cfg.model_config()), None
        params = init_params(model, jax.random.fold_in(key, 0), jnp.zeros((1, cfg.seq_len), jnp.int32))
        train_docs, val_docs = corpus.train, corpus.validation
    else:
        model, params, tokenizer = from_pretrained(cfg)
        _log(f"init from {cfg.init_from}: its tokenizer ({tokenizer.vocab_size:,} tokens) and weights")
        train_docs, val_docs = ([np.asarray(tokenizer.encode(decode(d)), np.int32) for d in docs]
                                for docs in (corpus.train, corpus.validation))
    lengths = [len(d) for d in train_docs]
    packed = packing_stats(pack_documents(train_docs, cfg.seq_len)).efficiency
    padded = padded_efficiency(lengths, cfg.batch_size, cfg.seq_len).efficiency
    _log(f"packing: {packed:.2%} of token slots real (pad-to-longest batches of the same data: {padded:.2%})")

    data = PackedIterator(train_docs, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    opt_cfg = cfg.optimizer_config()
    tx, schedule = make_lm_optimizer(opt_cfg, model), lr_schedule(opt_cfg)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    mc = model.cfg
    _log(f"model: {mc.mixer}, {mc.num_layers} layers, d_model={mc.d_model}, {num_params:,} parameters")
    state = create_train_state(params, tx, jax.random.fold_in(key, 1))
    mesh = mesh_from_spec(cfg.mesh)
    if mesh.size == 1:  # one device: the plain jitted step
        base_step = make_train_step(make_loss_fn(model), tx, grad_accum=cfg.grad_accum)

        def train_step(state, batch, key):
            lr = schedule(state.step)
            if mc.feature_redraw is not None:
                state = state.replace(params=redraw_features(state.params, state.step, key, mc.feature_redraw))
            state, metrics = base_step(state, batch, key)
            return state, {**metrics, "lr": lr}

        train_step = jit_train_step(train_step)
    else:
        state, train_step = _sharded(cfg, mesh, model, state, tx, schedule)

    val = eval_batches(val_docs, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    evaluate = make_eval_fn(model, val, None if tokenizer is None else target_bytes(val, tokenizer))
    last_eval: dict = {}

    def eval_fn(state):
        last_eval.update(evaluate(state.params))
        return dict(last_eval)

    primary = jax.process_index() == 0  # the one process that writes files in a multi-process run
    if primary:
        (out_dir / "config.json").write_text(json.dumps(to_jsonable(cfg), indent=2))
    samples_path = out_dir / "samples.jsonl"

    def on_step(step, state, metrics):
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
            text = sample_text(model, state.params, cfg.sample_prompt, cfg.sample_tokens,
                               jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), step), cfg.temperature,
                               tokenizer)
            _log(f"--- sample at step {step} ---\n{text}\n---")
            if primary:
                with samples_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, "text": text}) + "\n")

    loop = LoopConfig(num_steps=cfg.steps, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                      resume=cfg.resume, progress=cfg.progress, skip_nonfinite=cfg.skip_nonfinite)
    start = time.perf_counter()
    result = fit(train_step, state, data, loop, out_dir, eval_fn=eval_fn,
                 eval_every=cfg.eval_every, on_step=on_step)
    elapsed = time.perf_counter() - start
    if result.resumed_from is not None:
        _log(f"resumed from step {result.resumed_from}")
    if not last_eval and not result.preempted:
        last_eval.update(evaluate(result.state.params))
    step = int(result.state.step)
    summary = {"step": step, "resumed_from": result.resumed_from, "preempted": result.preempted,
               "val_loss": last_eval.get("loss"), "val_bpb": last_eval.get("bpb"), "num_params": num_params,
               "skipped_nonfinite": result.skipped_nonfinite, "packing_efficiency": packed, "padded_efficiency": padded, "seconds": elapsed,
               "train_documents": len(corpus.train), "skipped": corpus.skipped}
    if tokenizer is not None and not result.preempted:
        if jax.process_count() == 1:  # back to the checkpoint's format, loadable by transformers
            from jaxlab.models.hub import save_pretrained

            save_pretrained(model, result.state.params, out_dir / "hf", tokenizer)
            summary["exported"] = str(out_dir / "hf")
        else:
            _log("multi-process run: the weights stay in checkpoints/ (OUT/hf is written by one-process runs)")
    if primary:
        (out_dir / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=2))
    if summary["val_bpb"] is not None:
        _log(f"step {step}: validation loss {summary['val_loss']:.4f} nats, {summary['val_bpb']:.4f} bits/byte")
    return summary
