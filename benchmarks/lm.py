"""Benchmark: LM training throughput per mixer, packed vs padded batches, and model FLOPs utilisation.

    python benchmarks/lm.py [--quick] [--out DIR]

CPU (always):

* training tokens/s of one full step (forward, backward, clipped AdamW) per token mixer at a fixed
  size, all mixers timed in one run (best of interleaved repeats, so load spikes hit every mixer alike);
* packed vs padded: real (non-padding) tokens/s on the default corpus (the Python stdlib), with
  the same step program and shape: packed rows (:class:`jaxlab.models.corpus.PackedIterator`) against
  one document piece per row padded to L (the static-shape baseline), and the padding efficiency of
  both plus of pad-to-longest batches. Real tokens/s over an epoch = efficiency of the whole split x
  B x L / step time (the real tokens of the few timed batches would depend on which documents they hold).

GPU (when present): model FLOPs utilisation of a ~125M-parameter attention LM (d=768, 12 layers, 12
heads, GPT-2 vocabulary size, L=2048, bf16 compute), with the PaLM count (Chowdhery et al. 2022,
App. B: 6 N + 12 n_layers d L FLOPs per token, N = non-embedding parameters plus the output matmul)
against the device's dense bf16 peak. Goal: at least 45% MFU on an H100. Measured for one document
per row (attention through cuDNN, and through our Pallas kernel) and for packed rows with segment ids
(Pallas: cuDNN's fused kernel takes no segment mask). A configuration that fails is recorded with its
error and the others still run. ``--mfu-only`` skips the CPU-sized sections.

Against PyTorch (``--torch-python PY``, the interpreter of a separate venv holding the CPU build of
torch, ``pip install torch==2.13.0``; torch is never a jaxlab dependency): tokens/s of ``jaxlab train lm``
as a user runs it (its own packed data pipeline, metrics and loop included; timed from the
``metrics.jsonl`` stamps after the first logged interval, so compilation is excluded) beside the
same model in PyTorch eager and under ``torch.compile`` (``benchmarks/lm_torch.py``, the twin), in
alternating runs at two sizes, and the Mamba-2 mixer's tokens/s beside them. The twin is checked to
be the same model: from jaxlab's parameters and one batch it must give the same loss and gradient norm.

Results go to ``benchmarks/results/lm-<backend>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

CPU_MODEL = dict(d_model=128, num_layers=4, num_heads=4, batch=8, seq_len=256)
MIXERS = ("attention", "sliding", "linear", "gau", "s4d", "s5", "mamba", "mamba2")
TORCH_SIZES = (dict(d_model=128, num_layers=4, num_heads=4, batch=16, seq_len=256),  # `jaxlab train lm` defaults
               dict(d_model=384, num_layers=6, num_heads=6, batch=8, seq_len=512))
GPU_MODEL = dict(d_model=768, num_layers=12, num_heads=12, vocab_size=50304, batch=16, seq_len=2048)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer mixers and repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, quick 2)")
    p.add_argument("--mfu-only", action="store_true", help="on a GPU, measure only the MFU section")
    p.add_argument("--torch-python", type=pathlib.Path, default=None,
                   help="python of a venv with torch 2.13.0 (CPU): adds the side-by-side PyTorch section")
    p.add_argument("--torch-only", action="store_true", help="with --torch-python: only the PyTorch section")
    p.add_argument("--torch-steps", type=int, default=40, help="timed training steps per run in that section")
    p.add_argument("--torch-repeats", type=int, default=3, help="alternating rounds in that section")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def _step_fn(model_cfg, steps_hint: int = 1000):
    """A jitted training step (state donated) and a fresh state for ``model_cfg``."""
    import jax
    import jax.numpy as jnp

    from jaxlab.models.lm import LM, NO_DECAY_PARAMS, init_params
    from jaxlab.models.lm_training import LMTrainConfig, make_loss_fn
    from jaxlab.optim import make_optimizer
    from jaxlab.train_state import create_train_state, jit_train_step, make_train_step

    model = LM(model_cfg)
    tx = make_optimizer(LMTrainConfig(steps=steps_hint, warmup_steps=10).optimizer_config(), no_decay=NO_DECAY_PARAMS)
    params = init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    state = create_train_state(params, tx, jax.random.PRNGKey(1))
    return jit_train_step(make_train_step(make_loss_fn(model), tx)), state


def _time_steps(step, state, batches, repeats: int):
    """Best wall time of one step over ``repeats`` rounds (after a warm-up), and the final state."""
    import jax

    state, m = step(state, batches[0], jax.random.PRNGKey(0))
    jax.block_until_ready(m)
    best = float("inf")
    for r in range(repeats):
        batch = batches[(r + 1) % len(batches)]
        start = time.perf_counter()
        state, m = step(state, batch, jax.random.PRNGKey(r))
        jax.block_until_ready(m)
        best = min(best, time.perf_counter() - start)
    return best, state


def _batch(tokens, segment_ids=None):
    import numpy as np

    from jaxlab.models.layers import positions_from_segments
    from jaxlab.models.packing import target_mask_from_segments

    seg = np.ones_like(tokens) if segment_ids is None else segment_ids
    tokens = tokens.astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)  # [B, L]
    return {"inputs": tokens, "targets": targets, "mask": target_mask_from_segments(seg),
            "segment_ids": seg.astype(np.int32), "positions": np.asarray(positions_from_segments(seg))}


def bench_mixers(mixers, repeats: int) -> list[dict]:
    import numpy as np

    from jaxlab.models.lm import LMConfig

    B, L = CPU_MODEL["batch"], CPU_MODEL["seq_len"]
    rng = np.random.default_rng(0)
    batches = [_batch(rng.integers(1, 256, (B, L))) for _ in range(2)]
    steps = {}
    for mixer in mixers:
        cfg = LMConfig(vocab_size=256, d_model=CPU_MODEL["d_model"], num_layers=CPU_MODEL["num_layers"],
                       num_heads=CPU_MODEL["num_heads"], mixer=mixer, max_len=L, window=64)
        steps[mixer] = _step_fn(cfg)
    best = {m: float("inf") for m in mixers}
    for _ in range(repeats):  # interleaved rounds
        for m in mixers:
            t, state = _time_steps(*steps[m], batches, 1)
            steps[m] = (steps[m][0], state)
            best[m] = min(best[m], t)
    return [{"mixer": m, "step_ms": 1e3 * best[m], "tokens_per_s": B * L / best[m]} for m in mixers]


def bench_packing(seq_lens, repeats: int) -> list[dict]:
    import numpy as np

    from jaxlab.models.corpus import PackedIterator, load_corpus
    from jaxlab.models.lm import LMConfig
    from jaxlab.models.packing import pack_documents, packing_stats, pad_documents, padded_efficiency, split_long

    corpus = load_corpus()
    rows = []
    B = CPU_MODEL["batch"]
    for L in seq_lens:
        packed_it = PackedIterator(corpus.train, B, L, seed=0)
        packed = [next(packed_it) for _ in range(4)]
        pieces = split_long(corpus.train, L)
        order = np.random.default_rng(0).permutation(len(pieces))  # like PackedIterator's shuffle
        padded = [pad_documents([pieces[j] for j in order[i * B:(i + 1) * B]], length=L) for i in range(4)]
        cfg = LMConfig(vocab_size=256, d_model=CPU_MODEL["d_model"], num_layers=CPU_MODEL["num_layers"],
                       num_heads=CPU_MODEL["num_heads"], mixer="attention", max_len=L)
        step, state = _step_fn(cfg)
        t_packed = t_padded = float("inf")
        for _ in range(repeats):  # interleaved rounds, so load spikes hit both alike
            t, state = _time_steps(step, state, packed, 1)
            t_packed = min(t_packed, t)
            t, state = _time_steps(step, state, padded, 1)
            t_padded = min(t_padded, t)
        eff_packed = packing_stats(pack_documents(corpus.train, L)).efficiency
        eff_fixed = sum(map(len, pieces)) / (len(pieces) * L)
        eff_longest = padded_efficiency([len(d) for d in corpus.train], B, L).efficiency
        # Over an epoch, a step of B x L tokens carries eff * B * L real ones (the efficiency of the whole
        # split, not of the few timed batches, whose mix of short and long documents is a sample).
        rows.append({"seq_len": L, "packed_efficiency": eff_packed, "pad_to_L_efficiency": eff_fixed,
                     "pad_to_longest_efficiency": eff_longest,
                     "packed_real_tokens_per_s": eff_packed * B * L / t_packed,
                     "padded_real_tokens_per_s": eff_fixed * B * L / t_padded,
                     "packed_step_ms": 1e3 * t_packed, "padded_step_ms": 1e3 * t_padded})
    return rows


# ---- against PyTorch ------------------------------------------------------------------------------
TWIN = pathlib.Path(__file__).resolve().parent / "lm_torch.py"


def _size_args(size: dict) -> list[str]:
    return ["--d-model", str(size["d_model"]), "--num-layers", str(size["num_layers"]),
            "--num-heads", str(size["num_heads"])]


def jaxlab_train_tokens_per_s(size: dict, mixer: str, steps: int, workdir: pathlib.Path,
                              async_dispatch: bool | None = None) -> float:
    """Tokens/s of ``jaxlab train lm`` run as a user runs it (a child process, the stdlib corpus packed by its
    own pipeline), from the ``metrics.jsonl`` time stamps between the second logged step and the last one
    before the end (compilation and the final evaluation excluded). ``async_dispatch``: JAX's asynchronous CPU
    dispatch forced on or off (``JAX_CPU_ENABLE_ASYNC_DISPATCH``); None leaves the CLI's choice (off,
    ``jaxlab.process_setup.configure_cpu_dispatch``)."""
    import os
    import shutil
    import subprocess

    from jaxlab.child_process import python_module_command

    out = workdir / f"jaxlab-{mixer}-{size['d_model']}"
    shutil.rmtree(out, ignore_errors=True)
    log_every = 5
    cmd = python_module_command("jaxlab", "train", "lm", "--out", str(out), "--mixer", mixer,
                                "--steps", str(steps + 2 * log_every), "--batch-size", str(size["batch"]),
                                "--seq-len", str(size["seq_len"]), *_size_args(size), "--log-every", str(log_every),
                                "--eval-every", str(10 ** 6), "--eval-batches", "1", "--sample-every", "0",
                                "--checkpoint-every", str(10 ** 6), "--no-progress")
    env = {k: v for k, v in os.environ.items() if k != "JAX_CPU_ENABLE_ASYNC_DISPATCH"}
    if async_dispatch is not None:
        env["JAX_CPU_ENABLE_ASYNC_DISPATCH"] = "1" if async_dispatch else "0"
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    stamps = [(r["step"], r["time"]) for r in lines if "time" in r][1:-1]  # [(step, wall time)]
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]
    return (s1 - s0) * size["batch"] * size["seq_len"] / (t1 - t0)


def torch_tokens_per_s(torch_python: pathlib.Path, size: dict, steps: int, compile_: bool,
                       weights: pathlib.Path | None = None) -> dict:
    """One run of the PyTorch twin; its JSON result."""
    import subprocess

    cmd = [str(torch_python), str(TWIN), *_size_args(size), "--batch", str(size["batch"]),
           "--seq-len", str(size["seq_len"]), "--steps", str(steps)]
    cmd += ["--compile"] if compile_ else []
    cmd += ["--weights", str(weights)] if weights else []
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def twin_check(torch_python: pathlib.Path, size: dict, workdir: pathlib.Path) -> dict:
    """jaxlab's loss and gradient norm from its initial parameters on one batch (one document per row) and the
    twin's from the same parameters: equal up to fp32 rounding when the two are the same model."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlab.models.lm import LM, LMConfig, init_params
    from jaxlab.models.lm_training import make_loss_fn

    B, L = 4, size["seq_len"]
    model = LM(LMConfig(vocab_size=256, d_model=size["d_model"], num_layers=size["num_layers"],
                        num_heads=size["num_heads"], max_len=L))
    params = init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    batch = _batch(np.random.default_rng(1).integers(1, 256, (B, L)))
    (loss, _), grads = jax.value_and_grad(make_loss_fn(model), has_aux=True)(params, batch, jax.random.PRNGKey(0))
    grad_norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float64 if jax.config.x64_enabled else jnp.float32)))
                                   for g in jax.tree.leaves(grads))))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    flat.update({f"batch/{k}": np.asarray(batch[k]) for k in ("inputs", "targets", "mask")})
    path = workdir / f"twin-{size['d_model']}.npz"
    np.savez(path, **flat)
    twin = torch_tokens_per_s(torch_python, {**size, "batch": B}, 1, False, weights=path)
    return {"jaxlab_loss": float(loss), "torch_loss": twin["loss"], "jaxlab_grad_norm": grad_norm,
            "torch_grad_norm": twin["grad_norm"]}


def bench_torch(torch_python: pathlib.Path, repeats: int, steps: int) -> list[dict]:
    """Per size: the twin check, then ``repeats`` alternating rounds of jaxlab (attention, with and without
    asynchronous dispatch off, and Mamba-2), torch eager and torch.compile; medians over rounds. ``steps`` timed
    steps at the default size, fewer at larger ones (in proportion to the work per step)."""
    import statistics
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        for size in TORCH_SIZES:
            runs: dict[str, list[float]] = {"jaxlab": [], "jaxlab_async": [], "jaxlab_mamba2": [], "torch_eager": [],
                                            "torch_compile": []}
            steps = max(10, round(steps * 4096 / (size["batch"] * size["seq_len"]) * 128 ** 2 / size["d_model"] ** 2))
            for _ in range(repeats):
                runs["jaxlab"].append(jaxlab_train_tokens_per_s(size, "attention", steps, workdir))
                runs["jaxlab_async"].append(jaxlab_train_tokens_per_s(size, "attention", steps, workdir, True))
                runs["torch_eager"].append(torch_tokens_per_s(torch_python, size, steps, False)["tokens_per_s"])
                runs["torch_compile"].append(torch_tokens_per_s(torch_python, size, steps, True)["tokens_per_s"])
                runs["jaxlab_mamba2"].append(jaxlab_train_tokens_per_s(size, "mamba2", steps, workdir))
            row = {"size": size, "check": twin_check(torch_python, size, workdir), "runs": runs}
            row.update({f"{k}_tokens_per_s": statistics.median(v) for k, v in runs.items()})
            rows.append(row)
    return rows


ATTENTION_SHAPES = ((16, 128, 4, 32), (16, 256, 4, 32), (8, 512, 6, 64), (4, 1024, 4, 32))  # B, L, H, D


def bench_attention_tiles(torch_python: pathlib.Path | None, repeats: int) -> list[dict]:
    """Causal attention forward+backward at the training shapes: dense ``xla``, the tiled pass at tile edges
    64/128/256, what ``impl="auto"`` runs, and torch's ``scaled_dot_product_attention`` (its fused CPU
    kernel) when a torch venv is given."""
    import subprocess

    import jax
    import jax.numpy as jnp

    from jaxlab.kernels.attention import auto_tile, dot_product_attention

    rows = []
    for B, L, H, D in ATTENTION_SHAPES:
        q, k, v, do = (jax.random.normal(key, (B, L, H, D)) for key in jax.random.split(jax.random.PRNGKey(0), 4))
        seg = jnp.ones((B, L), jnp.int32)  # packed rows: the trainer always passes segment ids
        variants = {"xla": dict(impl="xla"), "auto": dict(impl="auto")}
        variants.update({f"tile {b}": dict(impl="blockwise", block_q=b, block_k=b) for b in (64, 128, 256) if b <= L})
        row = {"shape": [B, L, H, D], "auto_tile": auto_tile(B, H, L), "ms": {}}
        for name, kw in variants.items():
            def fwd_bwd(q, k, v, kw=kw):
                f = lambda q, k, v: dot_product_attention(q, k, v, causal=True, segment_ids=seg, **kw)  # noqa: E731
                return jax.vjp(f, q, k, v)[1](do)
            f = jax.jit(fwd_bwd)
            jax.block_until_ready(f(q, k, v))
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(f(q, k, v))
                best = min(best, time.perf_counter() - start)
            row["ms"][name] = 1e3 * best
        if torch_python:
            done = subprocess.run([str(torch_python), str(TWIN), "--attention", f"{B},{L},{H},{D}"], check=True,
                                  capture_output=True, text=True)
            row["ms"]["torch sdpa"] = json.loads(done.stdout.strip().splitlines()[-1])["fwd_bwd_ms"]
        rows.append(row)
    return rows


def _attention_lines(rows: list[dict]) -> list[str]:
    names = list(dict.fromkeys(n for r in rows for n in r["ms"]))
    lines = ["", "Causal attention forward+backward (ms, fp32, with segment ids as the trainer passes them) at the "
             "training shapes: dense `xla`, the tiled pass per tile edge, `auto` (its tile in the second column), "
             "and torch's fused `scaled_dot_product_attention`:", "",
             "| B, L, H, D | auto tile | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{r['ms'][n]:.1f}" if n in r["ms"] else "" for n in names]
        lines.append(f"| {', '.join(map(str, r['shape']))} | {r['auto_tile']} | " + " | ".join(cells) + " |")
    return lines


def _torch_lines(rows: list[dict]) -> list[str]:
    lines = ["", "Against PyTorch: tokens/s of `jaxlab train lm` (attention, SwiGLU; its data pipeline and loop "
             "included) and of the same model in PyTorch 2.13 (CPU build) eager and under torch.compile, fp32, "
             "medians of alternating runs; the Mamba-2 column is `jaxlab train lm --mixer mamba2`.", "",
             "| size | jaxlab | jaxlab, async dispatch on | torch eager | torch.compile | jaxlab / eager | "
             "jaxlab / compile | jaxlab mamba2 | twin check: loss jaxlab / torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, c = r["size"], r["check"]
        lines.append(f"| d={s['d_model']}, {s['num_layers']} layers, {s['num_heads']} heads, B{s['batch']} x "
                     f"L{s['seq_len']} | {r['jaxlab_tokens_per_s']:,.0f} | {r['jaxlab_async_tokens_per_s']:,.0f} | "
                     f"{r['torch_eager_tokens_per_s']:,.0f} | "
                     f"{r['torch_compile_tokens_per_s']:,.0f} | "
                     f"{r['jaxlab_tokens_per_s'] / r['torch_eager_tokens_per_s']:.2f} | "
                     f"{r['jaxlab_tokens_per_s'] / r['torch_compile_tokens_per_s']:.2f} | "
                     f"{r['jaxlab_mamba2_tokens_per_s']:,.0f} | {c['jaxlab_loss']:.6f} / {c['torch_loss']:.6f} |")
    return lines


def mfu_flops_per_token(num_params: int, num_layers: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token, PaLM's count: 6 N for the matmuls with weights (forward + backward)
    plus 12 n_layers d L for attention's QK^T and AV (causal masking not discounted)."""
    return 6 * num_params + 12 * num_layers * d_model * seq_len


def bench_mfu(repeats: int, model: dict = GPU_MODEL) -> dict:
    """MFU of the ~125M attention LM, per (layout, attention kernel); a failing one records its error."""
    import jax
    import numpy as np

    from jaxlab.models.lm import LMConfig
    from jaxlab.models.packing import pack_documents

    g = model
    B, L, V = g["batch"], g["seq_len"], g["vocab_size"]
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
    rng = np.random.default_rng(0)
    unpacked = [{k: v for k, v in _batch(rng.integers(0, V, (B, L))).items() if k in ("inputs", "targets", "mask")}
                for _ in range(2)]
    # Packed rows of documents of GPT-2-like lengths (geometric, mean L / 4), as a packed corpus gives.
    docs = [rng.integers(0, V, 1 + rng.geometric(4 / L)).astype(np.int32) for _ in range(16 * B)]
    rows = pack_documents(docs, L)
    packed = [_batch(rows["inputs"][i * B:(i + 1) * B], rows["segment_ids"][i * B:(i + 1) * B]) for i in range(2)]
    result = {"device": kind, "peak_tflops": peak, "model": g, "runs": []}
    for layout, impl, batches in (("one document per row", "cudnn", unpacked),
                                  ("one document per row", "pallas", unpacked),
                                  ("packed, segment ids", "pallas", packed)):
        run = {"layout": layout, "attention_impl": impl}
        try:
            cfg = LMConfig(vocab_size=V, d_model=g["d_model"], num_layers=g["num_layers"], num_heads=g["num_heads"],
                           mixer="attention", max_len=L, dtype="bfloat16", attention_impl=impl)
            step, state = _step_fn(cfg)
            t, state = _time_steps(step, state, batches, repeats)
        except Exception as e:  # noqa: BLE001 -- recorded, and the other configurations still run
            run["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            result["runs"].append(run)
            continue
        # All parameters: the tied embedding is counted once, as the output matmul (the lookup is free).
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
        achieved = mfu_flops_per_token(n, g["num_layers"], g["d_model"], L) * B * L / t / 1e12
        run.update(params=n, step_ms=1e3 * t, tokens_per_s=B * L / t, model_tflops=achieved,
                   mfu=achieved / peak if peak else None)
        result["runs"].append(run)
        del step, state
    return result


def _mixer_lines(result: dict) -> list[str]:
    lines = ["", f"Model: d_model={CPU_MODEL['d_model']}, {CPU_MODEL['num_layers']} layers, "
             f"{CPU_MODEL['num_heads']} heads, batch {CPU_MODEL['batch']} x {CPU_MODEL['seq_len']} bytes; one full "
             "training step (fwd+bwd+AdamW), best of interleaved rounds.", "",
             "| mixer | step ms | tokens/s | vs attention |", "|---|---|---|---|"]
    ref = next((r for r in result["mixers"] if r["mixer"] == "attention"), None)
    for r in result["mixers"]:
        ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
        lines.append(f"| {r['mixer']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {ratio:.2f} |")
    return lines


def _packing_lines(result: dict) -> list[str]:
    lines = ["", "Packed vs padded on the Python stdlib (attention, same step program and shape; real tokens/s = "
             "epoch-wide efficiency x B x L / step time, so the ratio is the efficiency gain times the "
             "step-time ratio, which only timing noise separates from 1):", "",
             "| L | packed eff. | pad-to-L eff. | pad-to-longest eff. | packed real tok/s | padded real tok/s | "
             "packed / padded |", "|---|---|---|---|---|---|---|"]
    for r in result["packing"]:
        lines.append(f"| {r['seq_len']} | {r['packed_efficiency']:.2%} | {r['pad_to_L_efficiency']:.2%} | "
                     f"{r['pad_to_longest_efficiency']:.2%} | {r['packed_real_tokens_per_s']:,.0f} | "
                     f"{r['padded_real_tokens_per_s']:,.0f} | "
                     f"{r['packed_real_tokens_per_s'] / r['padded_real_tokens_per_s']:.2f} |")
    return lines


def _mfu_lines(mfu: dict | None) -> list[str]:
    lines = ["", "MFU (~125M attention LM, L=2048, bf16; PaLM FLOP count against the dense bf16 peak): "
             + (f"on {mfu['device']}, peak {mfu['peak_tflops']} TFLOP/s." if mfu else "not measured (needs a GPU).")]
    if not mfu:
        return lines
    lines += ["", "| layout | attention | step ms | tokens/s | TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    for r in mfu["runs"]:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['attention_impl']} | failed: {r['error']} | | | |")
            continue
        share = f"{r['mfu']:.1%}" if r["mfu"] is not None else "(unknown peak)"
        lines.append(f"| {r['layout']} | {r['attention_impl']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['model_tflops']:.0f} | {share} |")
    return lines


CPU_NOTES = """
## Reading the PyTorch table across runs

Both sides of a row are measured in the same run, alternating, so a row's ratio compares like with like; rows
of different runs need not. The tables above (2026-12-06, an AMD EPYC machine with 2 cores) are the first run
since `jaxlab train lm` runs its steps inline with freed memory kept (below): 1.59x and 1.56x torch eager's
tokens/s, 1.48x and 1.45x torch.compile's. Runs before it gave 0.99x and 1.35x (the same machine, asynchronous
dispatch) and 0.57x and 0.64x (2026-12-05, host load 2.5, a machine whose CPU model was not recorded, with
jaxlab's attention, projections and optimizer as they are now): the ratio depends on the machine and its load
as much as on either program.

## What was changed for CPU speed, and why (profile of the default `jaxlab train lm` step, 2 cores)

Method: `jax.profiler.trace(..., create_perfetto_trace=True)` around training steps, summing each XLA
operation's time per step, and the compiled HLO (`jit(...).lower(...).compile().as_text()`) to map the costly
fusions to the model's lines. Before the changes a step (B16 x L256, d=128, 4 layers) took 376 ms against
PyTorch eager's 173 ms; without attention (`v` passed through) it took 187 ms against torch's 119 ms.

* **CPU computations inline, freed memory kept (`jaxlab.process_setup`, `jaxlab.host_memory`).** XLA:CPU
  mallocs every buffer of a step and frees it after; glibc handed the large ones back to the OS, so each step
  page-faulted its activations in anew. `keep_freed_memory` raises glibc's mmap and trim thresholds so freed
  buffers are reused, but only for the memory of the thread that runs the program: under JAX's asynchronous CPU
  dispatch, buffers are allocated and freed on other threads, in malloc arenas of their own that still hand
  memory back. `jaxlab train lm` had kept asynchronous dispatch (measured 1-5% faster before memory was kept),
  and then gained nothing from it. Measured at the default size (2 cores, 80 steps): asynchronous 20-22k tok/s,
  6.0 million page faults, 10.3 s of system time; inline 32-34k tok/s, 0.14 million, 1.4 s; at d=384 (B8 x
  L512) 3.0-3.1k against 3.7-3.9k tok/s. `MALLOC_ARENA_MAX=1` (one arena for every thread) brings the
  asynchronous faults down to 0.2 million but not all of its speed at d=384 (3.0k against 3.8k). So every
  `jaxlab` command and `reproduce`'s child processes now run inline (`setup_process`); the "async dispatch on"
  column above is the old choice.
* **Attention tiles (`kernels/attention.py`, `auto_tile`).** `impl="auto"` switched to the tiled pass only above
  8 MiB of scores, with 256-wide tiles: at L=256 one tile, i.e. the dense computation plus the recomputing
  backward. The dense scores [16, 4, 256, 256] (16 MiB) stream through memory several times per layer (mask,
  max, exp, sum; in the backward exp, dP - D, products), each pass ~5-10 ms. Tiles sized to ~1 MiB of scores
  stay in cache and causal tiles above the diagonal are skipped: attention forward+backward at that shape went
  from 38.5 ms (one tile) / 45.3 ms (dense) to 26.2 ms (64-wide tiles), and the step from 376 to ~320 ms. Torch's
  fused SDPA kernel does the same in ~11 ms (the table above): XLA:CPU does not fuse the two matmuls with the
  softmax between them, which is the remaining gap, and the one a fused CPU kernel would close.
* **Projections as row GEMMs (`models/layers.contract_last`).** `[B, L, d] x [d, f]` dot_generals made XLA:CPU
  insert transposed copies of the activations for the weight gradients (the SwiGLU backward wrote
  `[d_ff, B*L]` transposed, ~7 ms per layer); folding the leading axes into one row axis off a mesh gives
  plain GEMMs and their two backward GEMMs: the SwiGLU block's forward+backward 56.8 -> 34.6 ms, the step
  ~311 -> ~273 ms (0.88x), same losses. Under a mesh the axes stay apart for their shardings.
* **Checked and left:** XLA:CPU flags (`--xla_cpu_use_onednn`, `--xla_cpu_use_xnnpack=false`,
  `--xla_cpu_prefer_vector_width=512`, the concurrency-optimised scheduler) moved the step by under 5%, within
  noise; fast-math is not used (it changes numerics). Batch packing costs 0.05 ms per batch, so host-side data
  barely delays the step even when packed between steps (inline dispatch). A raw `[4096, 384] x [384, 1024]`
  GEMM runs at ~300 GFLOP/s under XLA, on par with torch's oneDNN, yet at the larger size the step without
  attention still took longer than torch's whole step: the GEMMs inside the step, their fusions and the
  elementwise passes between them are the next thing to profile there.

### Measured and dropped: attention restructurings; where the remaining time goes

Measured before the steps ran inline (above), as one-core CPU times; the per-component ratios still
say where XLA:CPU's step spends more than torch's.

Host load average 8-12 on 2 cores throughout (other jobs), so wall times were not comparable; variants were
compared by the process's CPU time per call (median of alternating rounds, in one process) and, for jaxlab
against torch, pinned to one core (`taskset -c 0`, one torch thread), where CPU time is the work done.

* **Unrolled tile pairs** (`attention_blockwise`: Python loops over the visited (query tile, key tile) pairs
  instead of `lax.map`/`fori_loop`/`scan`; static slices of pre-transposed `K^T`, `V^T`, `Q^T`, `dO^T`, every
  product a plain `[m, k] x [k, n]`, `dK^T`/`dV^T` accumulated transposed, unmasked full tiles): same values and
  gradients, but 42.2 vs 38.3 ms CPU at B16 x L256 (64-wide tiles) and 174.6 vs 166.6 ms at B8 x L512 x D64,
  and on one core 41.9 vs 33.4 ms and 164.5 vs 146.9 ms. It removes the loop form's copies (the `P^T`/`dS^T`
  transposes, dynamic slices, the `dQ` update), and XLA:CPU then spends more on the many smaller thunks.
* **Transposed dK/dV in the loop form** (`dV^T += dO^T P`, `dK^T += Q^T dS`: alone, as a batched product, the
  `P^T dO` form runs at half the GFLOP/s of `dO^T P`): 36.1 vs 37.4 ms, within noise.
* **Query tile x key prefix** (one softmax per query tile over all keys up to the diagonal, no online
  rescaling): 36-39 vs 39 ms at L256, slower at L512. **Tile shapes**: 64 x 64 stays best of
  32/64/128 x 32/64/128 (next 64x128 and 32x64, +10%). **`xla_cpu_experimental_ynn_fusion_type`** (dots only,
  reductions back to XLA's loops): within noise.
* **RoPE tables once per forward**: the rotary embedding's forward+backward at [16, 256, 4, 32] costs ~1 ms and
  does not change with the cos/sin tables materialised (`optimization_barrier`); **one GEMM for SwiGLU's gate
  and up** (weights concatenated): 43.4 vs 46.1 ms and 258.1 vs 258.7 ms CPU, within noise. Neither kept.
* **Whole step on one core, CPU ms (jaxlab / torch eager), as is and with the attention core replaced by
  `v + 0 (q + k)`:** B16 x L256, d=128: 509 / 389 (0.76x), without attention 337 / 302 (0.90x), so attention
  inside the step costs 172 / 87 ms (43 / 22 per layer, 2.0x) and is 71% of the gap; B8 x L512, d=384:
  3616 / 2778 (0.77x), without attention 2605 / 2132 (0.82x), attention 1011 / 646 ms (1.56x), 44% of the gap.
  The step's extras (non-finite check, metrics) and the segment ids cost nothing measurable: a bare `grad` +
  AdamW step without segment ids takes 480 ms against the full step's 489.
* **Per component in isolation, one core, CPU ms (jaxlab / torch eager):** B16 x L256 (two runs): causal
  attention forward+backward 35.5-39.2 / 22.1-23.5 (torch's fused SDPA); the rest of a block (norms, q/k/v/out,
  RoPE, SwiGLU) 70.1-73.6 / 64.6-73.0, of which SwiGLU 47.4-49.9 / 39.4-47.9; embedding, final norm, tied logits
  and loss 11.1-11.5 / 14.5-15.0; AdamW with clipping 4.4 / 5.4-6.1. B8 x L512: attention 137.9 / 98.1, rest of
  a block 402.6 / 374.4 (SwiGLU 266.3 / 228.3), embedding+loss 27.5 / 78.0, AdamW 39.7 / 47.1.
* **Where the remaining time goes.** (1) Attention: XLA:CPU runs the tiled pass as separate GEMM, reduction and
  elementwise thunks over 1 MiB tiles, where torch's fused kernel carries a tile in cache from `QK^T` to `PV`;
  inside the step it costs more than alone (43 vs 36 ms per layer at the first size) through the layout copies
  around it: the compiled step at the second size copies 765 MiB per step in 350 copy/transpose ops, 322 MiB of
  them the copies XLA inserts around the blockwise kernel's loops (loop state), 252 MiB the kernel's tile-layout
  transposes ([B, L, H, D] to [n, B, H, b, D] and back). A fused CPU kernel (an XLA FFI custom call) is what would
  close this part. (2) At the second size the rest of the model is more than half the gap (473 of 838 ms): SwiGLU
  (6 x 38 ms of it) and 108 MiB of transposed q/k/v activations copied for the projections' weight gradients. (3) Two-core
  scaling: from the table's runs, jaxlab's two-core step is 1.5-1.7x faster than its one-core CPU time, torch's
  2.0-2.1x, which turns the one-core 0.76-0.77x into that run's 0.57x and 0.64x; inferred from runs under
  different loads. Rechecked on the quiet host of the current table: data parallelism over two host devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=2`, so `jaxlab train lm` runs on a `data=2` mesh), with and
  without `--xla_cpu_multi_thread_eigen=false`, gave 19.2-19.9k and 19.0-19.3k tok/s against 19.5-21.1k on
  one device with XLA's intra-op threads (two alternating rounds): not faster, so not pursued.
"""


def _markdown(result: dict) -> str:
    lines = [f"# LM training throughput ({result['backend']}, {result['device']})", "",
             f"Host load average at start: {', '.join(f'{x:.1f}' for x in result['load_average'])} "
             f"({os.cpu_count()} CPUs); timings from a loaded host are not comparable."]
    if result["mixers"]:
        lines += _mixer_lines(result)
    if result["packing"]:
        lines += _packing_lines(result)
        if result.get("packing_rerun_note"):
            lines += ["", f"Note: {result['packing_rerun_note']}."]
    if result.get("torch"):
        lines += _torch_lines(result["torch"])
        if result.get("torch_rerun_note"):
            lines += ["", f"Note: {result['torch_rerun_note']}."]
    if result.get("attention_tiles"):
        lines += _attention_lines(result["attention_tiles"])
    if result.get("torch") or result.get("attention_tiles"):
        lines += CPU_NOTES.splitlines()
    lines += _mfu_lines(result.get("mfu"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    from jaxlab.process_setup import setup_process

    setup_process()  # the in-process timings run as the jaxlab command runs (inline CPU dispatch, memory kept)
    import jax

    repeats = args.repeats or (2 if args.quick else 5)
    backend = jax.default_backend()
    mixers = ("attention", "linear", "mamba2") if args.quick else MIXERS
    result = {"backend": backend, "device": jax.devices()[0].device_kind, "platform": platform.platform(),
              "load_average": os.getloadavg(), "quick": args.quick, "cpu_model": CPU_MODEL, "mixers": [],
              "packing": []}
    if backend == "cpu":
        result["attention_tiles"] = bench_attention_tiles(args.torch_python, repeats)
    if args.torch_python:
        result["torch"] = bench_torch(args.torch_python, args.torch_repeats, args.torch_steps)
    if not (args.mfu_only and backend == "gpu") and not args.torch_only:
        result["mixers"] = bench_mixers(mixers, repeats)
        result["packing"] = bench_packing((256,) if args.quick else (256, 1024), repeats)
    if backend == "gpu":
        result["mfu"] = bench_mfu(repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"lm-{backend}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
