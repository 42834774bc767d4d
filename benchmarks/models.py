"""Benchmark: the LM's token mixers and remat policies side by side; decoding speed against context.

    python benchmarks/models.py [--quick] [--out DIR]

Three tables, all from one run at one model size (CPU: d_model 128, 2 layers, fp32; GPU: d_model 1024,
8 layers, bf16):

* training step (forward + backward + AdamW) per mixer: wall time (best of interleaved repeats, so
  load spikes hit every mixer alike), tokens/s, and the temporary memory XLA's ``memory_analysis``
  reports for the compiled step;
* the same for the attention LM under every remat policy (time ratio and memory ratio to ``none``):
  checkpointing trades recomputation for activation memory;
* decode tokens/s per mixer after a prompt of each context length (a jitted ``lax.scan`` of
  single-token steps from the prefilled cache): attention's per-token cost grows with the KV cache,
  the recurrent mixers' (linear attention, SSMs) and the sliding window's do not.

Results go to ``benchmarks/results/models-<backend>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time
import warnings

MIXERS = ("attention", "sliding", "linear", "gau", "s4d", "s5", "mamba", "mamba2")
REMATS = ("none", "full", "dots", ("context", "ffn_out"), "offload")
SIZES = {
    "cpu": dict(model=dict(vocab_size=512, d_model=128, num_layers=2, num_heads=4, window=128, chunk_size=64,
                           d_state=16, ssm_head_dim=32, gau_qk_dim=64), batch=4, length=512,
                contexts=(128, 512, 2048), decode_steps=32),
    "gpu": dict(model=dict(vocab_size=32000, d_model=1024, num_layers=8, num_heads=16, window=512, chunk_size=128,
                           d_state=64, ssm_head_dim=64, gau_qk_dim=128, dtype="bfloat16"), batch=8, length=2048,
                contexts=(512, 2048, 8192, 32768), decode_steps=64),
}
QUICK = {"cpu": dict(batch=1, length=128, contexts=(64, 512), decode_steps=8),
         "gpu": dict(batch=4, length=1024, contexts=(1024, 8192), decode_steps=32)}


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller batch/contexts, fewer repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per entry (default 5, quick 1)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def _best_interleaved(fns: dict, repeats: int) -> dict:
    """Best wall time of each zero-arg callable over ``repeats`` interleaved rounds (after one warm-up)."""
    import jax
    for f in fns.values():
        jax.block_until_ready(f())
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jax
    import jax.numpy as jnp
    import optax

    from jaxlab.models.lm import LM, LMConfig, init_params, lm_loss

    backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
    size = dict(SIZES[backend], **(QUICK[backend] if args.quick else {}))
    repeats = args.repeats or (1 if args.quick else 5)
    B, L = size["batch"], size["length"]
    max_len = max(L, max(size["contexts"]) + size["decode_steps"])
    tx = optax.adamw(1e-3)
    key = jax.random.PRNGKey(0)
    tokens = jax.random.randint(key, (B, L), 0, size["model"]["vocab_size"])

    def train_step(cfg):
        model = LM(cfg)
        params = init_params(model, key, tokens[:, :8])
        opt_state = tx.init(params)

        def step(params, opt_state, tokens):
            (loss, _), grads = jax.value_and_grad(lambda p: lm_loss(model, p, tokens), has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        compiled = jax.jit(step).lower(params, opt_state, tokens).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        return (lambda: compiled(params, opt_state, tokens)), temp

    def cfg_for(**kw):
        return LMConfig(**dict(size["model"], max_len=max_len, **kw))

    # ---- training step per mixer ----
    print(f"[models] backend={backend} B={B} L={L} {size['model']}", flush=True)
    fns, temps = {}, {}
    for mixer in MIXERS:
        fns[mixer], temps[mixer] = train_step(cfg_for(mixer=mixer))
        print(f"  compiled train step: {mixer}", flush=True)
    times = _best_interleaved(fns, repeats)
    train_rows = [dict(mixer=m, step_ms=1e3 * times[m], tokens_per_s=B * L / times[m], temp_mib=temps[m] / 2**20)
                  for m in MIXERS]

    # ---- remat policies (attention) ----
    fns, temps = {}, {}
    for remat in REMATS:
        name = remat if isinstance(remat, str) else "+".join(remat)
        try:
            fns[name], temps[name] = train_step(cfg_for(mixer="attention", remat=remat))
        except Exception as e:  # e.g. a backend without host offloading
            print(f"  remat {name}: unavailable ({type(e).__name__}: {str(e)[:120]})", flush=True)
    times = _best_interleaved(fns, repeats)
    remat_rows = [dict(remat=k, step_ms=1e3 * times[k], temp_mib=temps[k] / 2**20,
                       time_vs_none=times[k] / times["none"], memory_vs_none=temps[k] / temps["none"]) for k in fns]

    # ---- decode tokens/s against context length ----
    steps = size["decode_steps"]
    decode_rows = []
    for mixer in MIXERS:
        cfg = cfg_for(mixer=mixer)
        model = LM(cfg)
        params = init_params(model, key, tokens[:1, :8])
        fns = {}
        for ctx in size["contexts"]:
            prompt = jax.random.randint(jax.random.fold_in(key, ctx), (1, ctx), 0, cfg.vocab_size)
            cache_len = ctx + steps

            @jax.jit
            def prefill(params, prompt, cache_len=cache_len):
                return model.apply({"params": params}, prompt, model.init_cache(1, cache_len), method=LM.decode)

            @jax.jit
            def decode(params, token, cache):
                def body(carry, _):
                    token, cache = carry
                    logits, cache = model.apply({"params": params}, token, cache, method=LM.decode)
                    return (jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), cache), None
                return jax.lax.scan(body, (token, cache), None, length=steps)[0][0]

            logits, cache = prefill(params, prompt)
            token = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
            fns[ctx] = (lambda d=decode, t=token, c=cache: d(params, t, c))
        times = _best_interleaved(fns, repeats)
        for ctx in size["contexts"]:
            decode_rows.append(dict(mixer=mixer, context=ctx, tokens_per_s=steps / times[ctx],
                                    ms_per_token=1e3 * times[ctx] / steps))
        print(f"  decode: {mixer}", flush=True)

    result = dict(benchmark="models", backend=backend, device=str(jax.devices()[0]), platform=platform.platform(),
                  jax=jax.__version__, quick=args.quick, batch=B, length=L, model=size["model"],
                  decode_steps=steps, repeats=repeats, train=train_rows, remat=remat_rows, decode=decode_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"models-{backend}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"models-{backend}.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _markdown(r) -> str:
    lines = [f"# models benchmark ({r['backend']}: {r['device']}, jax {r['jax']}{', quick' if r['quick'] else ''})",
             "", f"Model {r['model']}, training batch {r['batch']} x {r['length']} tokens, best of {r['repeats']}.",
             "", "## Training step per mixer", "", "| mixer | step ms | tokens/s | temp MiB |", "|---|---:|---:|---:|"]
    lines += [f"| {x['mixer']} | {x['step_ms']:.1f} | {x['tokens_per_s']:.0f} | {x['temp_mib']:.1f} |"
              for x in r["train"]]
    lines += ["", "## Remat policies (attention)", "", "| remat | step ms | temp MiB | time / none | memory / none |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {x['remat']} | {x['step_ms']:.1f} | {x['temp_mib']:.1f} | {x['time_vs_none']:.2f} | "
              f"{x['memory_vs_none']:.2f} |" for x in r["remat"]]
    contexts = sorted({x["context"] for x in r["decode"]})
    lines += ["", f"## Decode tokens/s after a prompt of each context length ({r['decode_steps']} steps, batch 1)", "",
              "| mixer | " + " | ".join(f"ctx {c}" for c in contexts) + " |", "|---|" + "---:|" * len(contexts)]
    for m in dict.fromkeys(x["mixer"] for x in r["decode"]):
        cells = {x["context"]: x["tokens_per_s"] for x in r["decode"] if x["mixer"] == m}
        lines.append(f"| {m} | " + " | ".join(f"{cells[c]:.0f}" for c in contexts) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
