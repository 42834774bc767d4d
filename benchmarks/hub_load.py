"""Benchmark: loading a ~1B-parameter Hugging Face checkpoint, jaxlab against transformers.

    python benchmarks/hub_load.py [--quick] [--dir DIR] [--out DIR]

Writes a random Llama checkpoint of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 key-value
heads, FFN 8192, vocabulary 128256, tied embeddings: 1.24B parameters, bf16, 2.47 GB in 1 GB shards with an
index), then loads it in fresh child processes, alternating, each load timed and its peak resident memory
(``VmHWM``) taken above the process's resident size after its imports:

* jaxlab: ``jaxlab.models.hub.load_pretrained(path)`` (bf16 parameters on the CPU device);
* transformers: ``AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)`` (needs torch and
  transformers, jaxlab's test extra).

Goals: jaxlab's peak host memory at most 1.2x one copy of the weights, its load time within 2x of
transformers'. ``--quick``: a 4-layer model of the same width (0.56B parameters). Results go to
``benchmarks/results/hub_load-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
            tie_word_embeddings=True, rms_norm_eps=1e-5)
SHARD_BYTES = 2**30


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 layers instead of 16, 2 rounds instead of 3")
    p.add_argument("--dir", type=pathlib.Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "results")
    p.add_argument("--child", choices=("jaxlab", "transformers"), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_checkpoint(folder: pathlib.Path, config: dict) -> int:
    """A random bf16 Llama checkpoint in HF's layout (shards of at most SHARD_BYTES and an index); returns the
    bytes of its tensors. Tensors are drawn one at a time, so writing needs about one shard of memory."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    d, f, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    H, Hkv, V = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    D = d // H
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (H * D, d), p + "self_attn.k_proj.weight": (Hkv * D, d),
                       p + "self_attn.v_proj.weight": (Hkv * D, d), p + "self_attn.o_proj.weight": (d, H * D),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size, total = [], {}, 0, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            save_file(current, str(folder / f"shard-{len(shards)}.safetensors"))
            current, size = {}, 0
        value = np.ones(shape, np.float32) if len(shape) == 1 else rng.standard_normal(shape, np.float32) * 0.02
        current[name] = value.astype(ml_dtypes.bfloat16)
        size += nbytes
        total += nbytes
    shards.append(current)
    save_file(current, str(folder / f"shard-{len(shards)}.safetensors"))
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        new = f"model-{i:05d}-of-{n:05d}.safetensors"
        (folder / f"shard-{i}.safetensors").rename(folder / new)
        weight_map.update({name: new for name in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False, **config}
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    return total


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM: of its own address space, unlike ``ru_maxrss``, which
    on Linux keeps the parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(kind: str, folder: pathlib.Path) -> dict:
    """One load in this (fresh) process: seconds and peak resident bytes above the post-import baseline."""
    if kind == "jaxlab":
        import jax

        from jaxlab.models.hub import load_pretrained

        jax.numpy.zeros(1).block_until_ready()  # the CPU client exists before the baseline
        base = _rss_bytes()
        start = time.perf_counter()
        _, params, _ = load_pretrained(folder)
        jax.block_until_ready(params)
    else:
        import torch
        import transformers

        base = _rss_bytes()
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        assert next(model.parameters()).dtype == torch.bfloat16
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes()
    return {"seconds": seconds, "peak_bytes": peak - base, "final_bytes": _rss_bytes() - base}


def main(argv=None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(child(args.child, args.dir)))
        return 0
    config = {**FULL, "num_hidden_layers": 4} if args.quick else FULL
    rounds = 2 if args.quick else 3
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = pathlib.Path(tmp) / "llama"
        start = time.perf_counter()
        weight_bytes = write_checkpoint(folder, config)
        print(f"wrote {weight_bytes / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        runs: dict[str, list[dict]] = {"jaxlab": [], "transformers": []}
        for _ in range(rounds):
            for kind in runs:
                done = subprocess.run([sys.executable, __file__, "--child", kind, "--dir", str(folder)],
                                      check=True, capture_output=True, text=True)
                runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(kind, runs[kind][-1], flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_bytes", "final_bytes")}
           for k, v in runs.items()}
    result = {"config": config, "weight_bytes": weight_bytes, "runs": runs, "median": med,
              "load_average": os.getloadavg(),
              "peak_over_weights": med["jaxlab"]["peak_bytes"] / weight_bytes,
              "time_over_transformers": med["jaxlab"]["seconds"] / med["transformers"]["seconds"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hub_load-cpu.json").write_text(json.dumps(result, indent=2))
    n_params = weight_bytes // 2
    lines = [f"# Loading a {n_params / 1e9:.2f}B-parameter Llama checkpoint (bf16, {weight_bytes / 1e9:.2f} GB, "
             f"{config['num_hidden_layers']} layers, sharded safetensors)", "",
             f"Medians of {rounds} loads each in fresh processes, alternating; peak resident memory above the "
             "process's size after its imports. Goals: jaxlab peak <= 1.2x the weights, time <= 2x transformers'.",
             "transformers leaves the weights memory-mapped from the safetensors files (pages are read when first "
             "used), so its resident memory stays small until the model runs; jaxlab reads each tensor into its "
             "own aligned buffer, which becomes the CPU jax.Array without a copy.",
             f"Load average at the end: {', '.join(f'{x:.1f}' for x in result['load_average'])}.", "",
             "| loader | seconds | peak memory (GB) | peak / weights | memory after (GB) |", "|---|---|---|---|---|"]
    for kind, m in med.items():
        lines.append(f"| {kind} | {m['seconds']:.2f} | {m['peak_bytes'] / 1e9:.2f} | "
                     f"{m['peak_bytes'] / weight_bytes:.2f} | {m['final_bytes'] / 1e9:.2f} |")
    lines += ["", f"jaxlab / transformers load time: **{result['time_over_transformers']:.2f}**; jaxlab peak / weights: "
              f"**{result['peak_over_weights']:.2f}**."]
    (args.out / "hub_load-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
