"""``zoo-recall``: recall against state size over every token mixer of the LM (Arora et al. 2023, "Zoology:
Measuring and Improving Recall in Efficient Language Models", arXiv:2312.04927, Figure 2 and its figure of
MQAR accuracy against recurrent state size).

Every mixer of ``MIXERS`` is trained at (approximately) the parameter count of attention at ``d_model``: its
width is the multiple of 8 whose block parameters (mixers, feed-forwards and norms; embeddings and head
excluded, they do not depend on the mixer) come closest to attention's. Each mixer then trains two 2-layer
LMs of that width, side by side in one compiled program (``jax.vmap`` over the runs, so a mixer compiles
once): one on Zoology's MQAR (:func:`jaxlab.models.synthetic.mqar`, a fixed length and number of key-value
pairs, token 0 between the queries as in its Figure 2 configs) and one on the byte-level Python-stdlib corpus
(contiguous windows of the concatenated training files; bits per byte on evenly spaced windows of the
validation files). Over a small learning-rate sweep the best score of each task is kept (Zoology's protocol
for MQAR; the same for the LM). The LMs follow :mod:`jaxlab.experiments.mqar`: token embedding drawn at std 1
with an untied head (at GPT-2's 0.02 two-layer attention stays on the ln K plateau).

Reported per mixer, in one table: MQAR accuracy, validation bits per byte, training tokens per second (all
runs of the mixer over the wall time of its compiled program, compile excluded; reported, not claimed) and
the state size: floats of one layer's decoding state for one sequence of the evaluated length (complex numbers
count two). For recurrent mixers this is the recurrent state; for attention-like mixers it is the KV cache,
which grows with the sequence (Zoology plots attention's at the evaluated length). A mixer is "fixed-state"
when that size is the same at twice the length (the recurrent and linear-attention mixers, GAU's chunked
form, and the sliding window, whose cache is a ring of ``window`` slots). The "lsh" mixer (Reformer) has no
decoding state (its sorted chunks depend on later tokens); it attends over every earlier key, so it is
counted as a full KV cache, 2 L d per layer.

Claims, fixed from the paper before any run:

1. Attention solves MQAR at the tested setting: accuracy >= 0.9 (the threshold of ``mqar``'s claim; Zoology's
   Figure 2 shows attention near 1.0 at every width and length).
2. Among the fixed-state mixers MQAR accuracy rises with state size: Spearman rank correlation between state
   size and accuracy > 0 (Zoology's state-size figure: recall of every efficient architecture climbs with its
   recurrent state; at equal parameters the mixers differ in state size, so the ranks should agree).
3. The gap between attention and the fixed-state mixers is larger on recall than on language modelling, in
   the same unit, the fraction of attention's score lost: the median over fixed-state mixers of
   ``(acc_attention - acc) / acc_attention`` exceeds the median of ``(bpb - bpb_attention) / bpb_attention``
   (Zoology, Section 3: the gated-convolution models trail attention by a few perplexity points overall while
   failing associative recall, which accounts for most of that gap).

Sizes, on one CPU core. The full size (d=64, L=64, 4 pairs of 16 tokens, 500 steps of 16 sequences per run,
learning rates 1e-3 and 3e-3, so four runs per mixer) takes about 22 minutes, a quarter of it compiling
(one program per mixer, 17-40 s each with XLA's backend optimisations). The quick size (L=32, window 8,
200 steps, lr 3e-3 only, backend optimisations off) takes about 4 minutes: fourteen compiles of
3-14 s each and the slow recurrent scans (Mamba, RWKV, S4) on CPU dominate it. Two-layer attention needs
about 200 steps to leave the MQAR plateau at this size (lr 3e-3: accuracy 1.0 after 200 steps at L=32, seeds
0 and 1), which sets the quick size's floor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.experiments._lm_common import synthetic_config
from jaxlab.models.corpus import load_corpus
from jaxlab.models.lm import LM, MIXERS, NO_DECAY_PARAMS, LMConfig, cross_entropy_sums, make_mixer
from jaxlab.models.synthetic import mqar
from jaxlab.optim import OptimizerConfig, lr_schedule, make_optimizer
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.train_state import create_train_state, make_train_step
from jaxlab.validation import check_positive
from jaxlab.xla_options import FAST_COMPILE

BYTE_VOCAB = 256
SOLVES = 0.9
"""Attention "solves" MQAR at this accuracy (as in ``mqar``)."""
WIDTH_STEP = 8
"""Widths tried when matching parameter counts are multiples of this (Mamba-2 needs 2 d divisible by 16)."""


@dataclasses.dataclass(frozen=True)
class ZooRecallConfig:
    """Sizes of the every-mixer comparison."""

    mixers: tuple[str, ...] = MIXERS
    """Token mixers compared (attention is the reference of the parameter count and of claims 1 and 3)."""
    d_model: int = 64
    """Attention's width; every other mixer gets the width of closest block-parameter count (Zoology's smallest
    width; at d=32 a single attention head stays on the MQAR plateau, see ``mqar``)."""
    num_layers: int = 2
    seq_len: int = 64
    """Length of both tasks' sequences (MQAR and LM windows); the state sizes are taken at this length."""
    kv_pairs: int = 4
    """MQAR key-value pairs per sequence (at most seq_len / 4)."""
    mqar_vocab: int = 16
    """MQAR tokens (keys from the lower half, values from the upper half; the model's vocabulary is the 256
    bytes). Small as in ``mqar``'s quick size: at 64 or 256 tokens learning the embeddings takes far more
    samples than one CPU core affords fourteen mixers."""
    window: int = 16
    """Keys seen by the "sliding" mixer: a quarter of the sequence, so its state is fixed and far queries
    fall outside it."""
    steps: int = 500
    batch_size: int = 16
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    """Peak learning rates swept per mixer and task; the best score is kept (at 1e-2 two-layer attention stays
    on the MQAR plateau: 0.22-0.28 after 200 steps at L=32 and L=64)."""
    warmup: int = 50
    eval_batches: int = 8
    max_documents: int | None = None
    """Deterministic subset of the stdlib files (None: all)."""
    max_train_windows: int = 100_000
    """Training windows of the LM task taken evenly from the concatenated training files."""
    fast_compile: bool = False
    """Skip XLA's backend optimisations (wins when compiling dominates: short runs)."""

    def __post_init__(self):
        if not self.mixers or any(m not in MIXERS for m in self.mixers) or len(set(self.mixers)) != len(self.mixers):
            raise ValueError(f"mixers={self.mixers} must be distinct names of {MIXERS}")
        check_positive(self, "d_model", "num_layers", "seq_len", "kv_pairs", "window", "steps", "batch_size",
                       "warmup", "eval_batches", "max_train_windows", integer=True)
        if self.seq_len < 4 * self.kv_pairs:
            raise ValueError(f"kv_pairs={self.kv_pairs} must be <= seq_len / 4 = {self.seq_len / 4}")
        if not 4 <= self.mqar_vocab <= BYTE_VOCAB or self.mqar_vocab // 2 - 1 < self.kv_pairs:
            raise ValueError(f"mqar_vocab={self.mqar_vocab} must be in [4, {BYTE_VOCAB}] with at least "
                             f"kv_pairs={self.kv_pairs} keys")
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"lrs={self.lrs} must be a non-empty tuple of positive learning rates")
        if self.d_model % WIDTH_STEP:
            raise ValueError(f"d_model={self.d_model} must be a multiple of {WIDTH_STEP}")


def model_config(cfg: ZooRecallConfig, mixer: str, d_model: int) -> LMConfig:
    """The LM of one mixer: ``synthetic_config`` on bytes, embedding std 1 with an untied head (as ``mqar``)."""
    L = cfg.seq_len
    return synthetic_config(mixer, d_model, BYTE_VOCAB, L, cfg.num_layers, embed_init_std=1.0,
                            tie_embeddings=False, window=cfg.window, lsh_chunk=min(32, L),
                            sparse_stride=max(2, math.isqrt(L)), scan_layers=True)


def block_params(cfg: LMConfig) -> int:
    """Parameters outside the token embedding and the output head (shapes only, nothing computed)."""
    tokens = jnp.zeros((1, cfg.max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: LM(cfg).init(jax.random.PRNGKey(0), tokens))["params"]
    shapes = {k: v for k, v in nn.unbox(shapes).items() if k not in ("embed", "head")}
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def matched_width(cfg: ZooRecallConfig, mixer: str, target: int) -> tuple[int, int]:
    """(width, block parameters) of ``mixer`` closest to ``target`` block parameters (multiples of WIDTH_STEP)."""
    count = functools.lru_cache(None)(lambda d: block_params(model_config(cfg, mixer, d)))

    def valid(d):
        try:
            model_config(cfg, mixer, d)
        except ValueError:
            return False
        return True

    guess = cfg.d_model * math.sqrt(target / count(cfg.d_model))  # parameters grow about as d^2
    centre = max(WIDTH_STEP, WIDTH_STEP * round(guess / WIDTH_STEP))
    candidates = [d for d in (centre - WIDTH_STEP, centre, centre + WIDTH_STEP) if d > 0 and valid(d)]
    if not candidates:  # e.g. a head count that does not divide the width: look further out
        candidates = [d for d in range(WIDTH_STEP, 4 * cfg.d_model + 1, WIDTH_STEP) if valid(d)][:1]
    best = min(candidates, key=lambda d: abs(count(d) - target))
    return best, count(best)


def state_floats(cfg: LMConfig, length: int) -> int:
    """Floats of one layer's decoding state for one sequence of ``length`` tokens (complex counts two).

    "lsh" has no decoding state but attends over every earlier key: a full KV cache, 2 L d."""
    if cfg.mixer == "lsh":
        return 2 * length * cfg.d_model
    state = jax.eval_shape(lambda: make_mixer(dataclasses.replace(cfg, max_len=max(cfg.max_len, length)),
                                              parent=None).init_state(1, length, cfg.d_model))
    total = 0
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            total += 2 * int(np.prod(leaf.shape))
        elif jnp.issubdtype(leaf.dtype, jnp.floating):
            total += int(np.prod(leaf.shape))
    return total


def byte_windows(docs, length: int, count: int) -> np.ndarray:
    """``count`` windows of ``length`` bytes (int32), evenly spaced over the concatenation of ``docs``."""
    stream = np.concatenate(docs).astype(np.int32)
    if len(stream) < length + 1:
        raise ValueError(f"the corpus has {len(stream)} bytes, fewer than one window of {length + 1}")
    starts = np.linspace(0, len(stream) - length - 1, min(count, len(stream) - length)).round().astype(np.int64)
    return stream[starts[:, None] + np.arange(length + 1)]  # [count, length + 1]


def _as_batch(windows):
    """Inputs, next-byte targets and a full mask of windows [..., L + 1]."""
    return {"inputs": windows[..., :-1], "targets": windows[..., 1:],
            "mask": jnp.ones(windows[..., 1:].shape, bool)}


def train_mixer(cfg: ZooRecallConfig, model_cfg: LMConfig, train_windows, eval_sets, key) -> dict:
    """Train every (task, learning rate) run of one mixer in one compiled program; scores and timings.

    The program is one ``lax.scan`` of the training step, vmapped over the runs: ``cfg.steps`` steps on fresh
    batches, then one step per evaluation batch at learning rate 0 (AdamW's update, weight decay included,
    scales with it, so the parameters stay put) whose loss sums score the trained model. One loop body is
    compiled per mixer (with ``scan_layers``, one block), which is what the compile time is spent on.

    ``eval_sets``: ``{"mqar": batches [E, B, L], "lm": batches [E, B, L]}`` (dicts of inputs/targets/mask).
    Returns ``{"mqar": {lr: accuracy}, "lm": {lr: bits per byte}, "tokens_per_s", "compile_s", "run_s",
    "losses"}``; tokens/s counts the training tokens of all runs over the program's wall time."""
    model = LM(model_cfg)
    base = lr_schedule(OptimizerConfig(lr=1.0, warmup_steps=min(cfg.warmup, cfg.steps - 1),
                                       decay_steps=max(cfg.steps, cfg.warmup + 1), min_lr_ratio=0.1))
    B, L, T = cfg.batch_size, cfg.seq_len, cfg.steps
    task_mqar = functools.partial(mqar, batch=B, seq_len=L, num_kv_pairs=cfg.kv_pairs, vocab_size=cfg.mqar_vocab,
                                  random_non_queries=False)

    def loss_fn(params, batch, _):
        logits, aux = model.apply({"params": params}, batch["inputs"])
        nll, correct, count = cross_entropy_sums(logits, batch["targets"], batch["mask"])
        return nll / count + aux["aux_loss"], {"sums": jnp.stack([nll, correct, count])}

    def one(key, lr, is_lm, windows, evals):
        pick = lambda a, b: jnp.where(is_lm, a, b)  # noqa: E731
        evals = jax.tree.map(pick, evals["lm"], evals["mqar"])  # [E, B, L]

        def batch(k, i):
            rows = windows[jax.random.randint(k, (B,), 0, windows.shape[0])]
            train = jax.tree.map(pick, _as_batch(rows), task_mqar(k))
            held_out = jax.tree.map(lambda e: e[jnp.clip(i - T, 0, cfg.eval_batches - 1)], evals)
            return jax.tree.map(lambda e, t: jnp.where(i >= T, e, t), held_out, train)

        tx = make_optimizer(OptimizerConfig(lr=1.0, b2=0.98, weight_decay=0.1, clip_norm=1.0),
                            no_decay=NO_DECAY_PARAMS, schedule=lambda step: jnp.where(step < T, lr * base(step), 0.0))
        train_step = make_train_step(loss_fn, tx)
        k_init, k_data = jax.random.split(key)
        params = nn.unbox(model.init(k_init, jnp.zeros((B, L), jnp.int32))["params"])

        def step(state, i):
            state, metrics = train_step(state, batch(jax.random.fold_in(k_data, i), i), None)
            return state, (metrics["loss"], metrics["sums"])

        _, (losses, sums) = jax.lax.scan(step, create_train_state(params, tx, k_data),
                                         jnp.arange(T + cfg.eval_batches))
        return losses[:T], jnp.sum(sums[T:], axis=0)

    runs = [(task, lr) for task in ("mqar", "lm") for lr in cfg.lrs]
    keys = jax.random.split(key, len(runs))
    lrs = jnp.asarray([lr for _, lr in runs], jnp.float32)
    is_lm = jnp.asarray([task == "lm" for task, _ in runs])
    args = (keys, lrs, is_lm, train_windows, eval_sets)
    program = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None)))
    start = time.perf_counter()
    compiled = program.lower(*args).compile(FAST_COMPILE if cfg.fast_compile else None)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    losses, totals = jax.device_get(compiled(*args))
    run_s = time.perf_counter() - start
    out = {"mqar": {}, "lm": {}, "losses": {}}
    for (task, lr), (nll, correct, count), curve in zip(runs, np.asarray(totals, np.float64), losses):
        score = correct / count if task == "mqar" else nll / count / math.log(2)
        out[task][f"{lr:g}"] = float(score)
        out["losses"][f"{task}/{lr:g}"] = [float(x) for x in curve[:: max(1, T // 50)]]
    out["tokens_per_s"] = len(runs) * T * B * L / run_s
    out["compile_s"], out["run_s"] = compile_s, run_s
    return out


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    def ranks(v):
        v = np.asarray(v, np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def median_relative_gaps(rows: dict[str, dict], fixed) -> tuple[float, float]:
    """Median over the ``fixed`` mixers of the fraction of attention's score lost, (on MQAR accuracy, on bits per
    byte): ``(acc_attention - acc) / acc_attention`` and ``(bpb - bpb_attention) / bpb_attention``. nan without
    attention or fixed-state mixers, and at an attention accuracy of 0 (a fraction of nothing)."""
    attn = rows.get("attention")
    if attn is None or not fixed or attn["mqar_accuracy"] <= 0:
        return float("nan"), float("nan")
    acc, bpb = attn["mqar_accuracy"], attn["bits_per_byte"]
    return (float(np.median([(acc - rows[m]["mqar_accuracy"]) / acc for m in fixed])),
            float(np.median([(rows[m]["bits_per_byte"] - bpb) / bpb for m in fixed])))


def _eval_sets(cfg: ZooRecallConfig, validation, key) -> dict:
    B, L, E = cfg.batch_size, cfg.seq_len, cfg.eval_batches
    keys = jax.random.split(key, E)
    batches = [mqar(k, batch=B, seq_len=L, num_kv_pairs=cfg.kv_pairs, vocab_size=cfg.mqar_vocab,
                    random_non_queries=False) for k in keys]
    mqar_set = {k: jnp.stack([b[k] for b in batches]) for k in ("inputs", "targets", "mask")}
    windows = byte_windows(validation, L, E * B)
    if len(windows) < E * B:  # a small validation split: repeat its windows to fill the batches
        windows = np.resize(windows, (E * B, L + 1))
    lm_set = _as_batch(jnp.asarray(windows.reshape(E, B, L + 1)))
    return {"mqar": mqar_set, "lm": lm_set}


@register_experiment("zoo-recall", description="MQAR accuracy vs state size and stdlib bits/byte, every LM mixer",
                     paper="Arora et al. 2023, Zoology: Measuring and Improving Recall in Efficient LMs "
                           "(arXiv:2312.04927), Figure 2 and the accuracy-vs-state-size figure",
                     quick_seconds=242,
                     quick=ZooRecallConfig(seq_len=32, window=8, steps=200, lrs=(3e-3,), eval_batches=2,
                                           max_documents=200, max_train_windows=20_000, fast_compile=True))
def zoo_recall(cfg: ZooRecallConfig, ctx: RunContext) -> ExperimentResult:
    corpus = load_corpus(max_documents=cfg.max_documents)
    train_windows = jnp.asarray(byte_windows(corpus.train, cfg.seq_len, cfg.max_train_windows))
    eval_sets = _eval_sets(cfg, corpus.validation, jax.random.fold_in(ctx.key, 10_000))
    target = block_params(model_config(cfg, "attention", cfg.d_model))
    rows: dict[str, dict] = {}
    for i, mixer in enumerate(ctx.progress(cfg.mixers, desc="mixers")):
        width, params = (cfg.d_model, target) if mixer == "attention" else matched_width(cfg, mixer, target)
        mcfg = model_config(cfg, mixer, width)
        state, state_2x = state_floats(mcfg, cfg.seq_len), state_floats(mcfg, 2 * cfg.seq_len)
        out = train_mixer(cfg, mcfg, train_windows, eval_sets, jax.random.fold_in(ctx.key, i))
        best_lr = max(out["mqar"], key=out["mqar"].get)
        best_lm = min(out["lm"], key=out["lm"].get)
        rows[mixer] = {"d_model": width, "block_params": params, "state_floats": state,
                       "fixed_state": state == state_2x, "mqar_accuracy": out["mqar"][best_lr],
                       "mqar_lr": float(best_lr), "bits_per_byte": out["lm"][best_lm], "lm_lr": float(best_lm),
                       "by_lr": {k: out[k] for k in ("mqar", "lm")},
                       "tokens_per_s": out["tokens_per_s"], "compile_s": out["compile_s"], "losses": out["losses"]}
        r = rows[mixer]
        ctx.log(f"{mixer} d={width} ({params:,} block params, state {state:,}): MQAR {r['mqar_accuracy']:.3f}, "
                f"{r['bits_per_byte']:.3f} bits/byte, {r['tokens_per_s']:,.0f} tokens/s "
                f"(compile {out['compile_s']:.1f} s)")

    fig = Figure(figsize=(11, 4))
    ax_acc, ax_bpb = fig.subplots(1, 2)
    for mixer, r in rows.items():
        colour = "tab:blue" if r["fixed_state"] else "tab:red"
        ax_acc.scatter(r["state_floats"], r["mqar_accuracy"], color=colour, zorder=3)
        ax_acc.annotate(mixer, (r["state_floats"], r["mqar_accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax_acc.set_xscale("log")
    ax_acc.set(xlabel=f"state floats per layer at L={cfg.seq_len} (blue: fixed, red: grows with L)",
               ylabel="MQAR accuracy", title=f"MQAR, L={cfg.seq_len}, {cfg.kv_pairs} key-value pairs",
               ylim=(-0.02, 1.05))
    ax_acc.grid(alpha=0.3)
    names = list(rows)
    ax_bpb.bar(range(len(names)), [rows[m]["bits_per_byte"] for m in names],
               color=["tab:blue" if rows[m]["fixed_state"] else "tab:red" for m in names])
    ax_bpb.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    ax_bpb.set(ylabel="validation bits per byte", title="byte-level LM, Python stdlib")
    ax_bpb.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    source = "Zoology Fig. 2 and state-size figure (shape only: no number at this size)"
    comparisons = tuple(Comparison(
        quantity=f"{m} (d={r['d_model']}, {r['block_params']:,} block params): MQAR accuracy / bits per byte / "
                 f"training tokens/s / state floats per layer at L={cfg.seq_len}"
                 + (" (fixed)" if r["fixed_state"] else " (grows with L)"),
        ours=f"{r['mqar_accuracy']:.3f} / {r['bits_per_byte']:.3f} / {r['tokens_per_s']:,.0f} / {r['state_floats']:,}",
        published=None, source=source) for m, r in rows.items())

    attn = rows.get("attention")
    fixed = [m for m, r in rows.items() if r["fixed_state"]]
    rho = spearman([rows[m]["state_floats"] for m in fixed], [rows[m]["mqar_accuracy"] for m in fixed]) \
        if len(fixed) >= 3 else float("nan")
    recall_gap, lm_gap = median_relative_gaps(rows, fixed)
    fixed_list = ", ".join(f"{m} {rows[m]['state_floats']:,}: {rows[m]['mqar_accuracy']:.3f}" for m in
                           sorted(fixed, key=lambda m: rows[m]["state_floats"]))
    claims = (
        Claim(claim=f"attention solves MQAR: accuracy >= {SOLVES}",
              holds=bool(attn is not None and attn["mqar_accuracy"] >= SOLVES),
              evidence=f"attention {attn['mqar_accuracy']:.3f}" if attn else "attention not run"),
        Claim(claim="among fixed-state mixers MQAR accuracy rises with state size: Spearman rank correlation > 0",
              holds=bool(rho > 0),
              evidence=f"rho = {rho:.3f} over {len(fixed)} mixers (state floats: accuracy) {fixed_list}"),
        Claim(claim="the fixed-state mixers' median gap to attention, as a fraction of attention's score, is larger "
                    "on MQAR accuracy than on bits per byte",
              holds=bool(recall_gap > lm_gap),
              evidence=f"median relative gap: MQAR {recall_gap:.3f}, bits per byte {lm_gap:.3f}"
              + (f" (attention {attn['mqar_accuracy']:.3f} accuracy, {attn['bits_per_byte']:.3f} bits/byte)"
                 if attn else "")),
    )
    growing = [m for m in rows if m not in fixed]
    summary = (f"{len(rows)} mixers at about {target:,} block parameters (attention's at d={cfg.d_model}; widths "
               + ", ".join(f"{m} {r['d_model']}" for m, r in rows.items())
               + f"), {cfg.num_layers} layers, {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens per task "
               f"(best of lr {', '.join(f'{lr:g}' for lr in cfg.lrs)}). MQAR (L={cfg.seq_len}, "
               f"{cfg.kv_pairs} pairs, {cfg.mqar_vocab} tokens) accuracy: "
               + ", ".join(f"{m} {r['mqar_accuracy']:.2f}" for m, r in rows.items())
               + ". Bits per byte: " + ", ".join(f"{m} {r['bits_per_byte']:.2f}" for m, r in rows.items())
               + f". Fixed-state mixers: {', '.join(fixed) or 'none'}; state growing with the length (KV cache): "
               f"{', '.join(growing) or 'none'}. Spearman(state size, accuracy) over the fixed-state mixers "
               f"{rho:.2f}; median relative gap to attention {recall_gap:.2f} on MQAR against {lm_gap:.2f} on bits "
               f"per byte. Tokens/s are one device's, "
               + ("with XLA's backend optimisations off (quick size: compiling dominates), so only roughly "
                  "comparable." if cfg.fast_compile else "for orientation (not claimed)."))
    metrics = {"mixers": rows, "target_block_params": target, "fixed_state": fixed, "spearman": rho,
               "median_relative_gap": {"mqar": recall_gap, "bits_per_byte": lm_gap},
               "corpus": corpus.describe(), "config": dataclasses.asdict(cfg)}
    return ExperimentResult(metrics=metrics, comparisons=comparisons, summary=summary, claims=claims)
