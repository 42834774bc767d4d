"""A small resumable training run, driven as a subprocess by test_checkpoint_resume.py.

    python resumable_train.py OUT_DIR NUM_STEPS [--sleep SECONDS] [--checkpoint-every N]

Trains a 2-layer MLP with AdamW on a fixed regression set, with key-dependent noise in the loss
(so the PRNG state matters) and a shuffling data iterator (so the data position matters), then
writes OUT_DIR/final_params.npz and OUT_DIR/result.json.
"""

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.loop import ArrayIterator, LoopConfig, fit
from jaxlab.optim import OptimizerConfig, make_optimizer
from jaxlab.train_state import create_train_state, jit_train_step, make_train_step


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (4, 32)) * 0.5, "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 1)) * 0.2, "b2": jnp.zeros(1)}


def loss_fn(params, batch, key):
    x, y = batch
    x = x + 0.1 * jax.random.normal(key, x.shape)            # input noise drawn from the step key
    h = jnp.tanh(x @ params["w1"] + params["b1"])             # [B, 32]
    pred = (h @ params["w2"] + params["b2"])[:, 0]            # [B]
    return jnp.mean((pred - y) ** 2), {}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("num_steps", type=int)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (np.sin(x[:, 0]) + x[:, 1] * x[:, 2]).astype(np.float32)
    data = ArrayIterator((x, y), batch_size=16, seed=1)        # 12 batches per epoch
    tx = make_optimizer(OptimizerConfig(lr=3e-3, decay_steps=args.num_steps, min_lr_ratio=0.0, weight_decay=1e-4))
    state = create_train_state(init_params(jax.random.PRNGKey(0)), tx, jax.random.PRNGKey(42))
    train_step = jit_train_step(make_train_step(loss_fn, tx))
    if args.sleep:
        inner = train_step

        def train_step(state, batch, key):                    # slow the run down so a test can kill it
            time.sleep(args.sleep)
            return inner(state, batch, key)

    cfg = LoopConfig(num_steps=args.num_steps, log_every=1, checkpoint_every=args.checkpoint_every,
                     keep_checkpoints=2, progress=False)
    result = fit(train_step, state, data, cfg, args.out_dir)
    params = jax.device_get(result.state.params)
    np.savez(args.out_dir / "final_params.npz", **params)
    (args.out_dir / "result.json").write_text(json.dumps({
        "step": int(result.state.step), "resumed_from": result.resumed_from,
        "preempted": result.preempted}))


if __name__ == "__main__":
    main()
