"""A tiny MLP regression problem shared by the parallel tests and the 2-process worker script.

Shapes are chosen so that ZeRO splits most leaves over 8 devices and one leaf (``b2``, 6
entries) is not divisible and stays replicated, exercising the fallback. ``PARAM_AXES`` names the
parameters' dimensions logically: the hidden layer is Megatron's column-then-row pair over ``mlp``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxlab.train_state import TrainState, create_train_state, make_train_step, step_key

D_IN, D_HIDDEN, D_OUT = 16, 32, 6
BATCH = 32
STEPS = 3


def init_params(seed: int = 0) -> dict:
    """Host-side (numpy) initialisation: no PRNG program to compile."""
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.normal(size=(D_IN, D_HIDDEN)) / np.sqrt(D_IN)).astype(np.float32),  # [D_in, H]
        "b1": np.zeros(D_HIDDEN, np.float32),
        "w2": (rng.normal(size=(D_HIDDEN, D_OUT)) / np.sqrt(D_HIDDEN)).astype(np.float32),
        "b2": np.full(D_OUT, 0.1, np.float32),
    }


PARAM_AXES = {"w1": P("embed", "mlp"), "b1": P("mlp"), "w2": P("mlp", None), "b2": P(None)}
"""Logical axes of ``init_params``: w1 column-parallel, w2 row-parallel over ``mlp`` (-> ``model``)."""


def loss_fn(params: dict, batch: tuple, key: jax.Array) -> tuple[jax.Array, dict]:
    """Mean squared error of a tanh MLP over the batch ``x [B, D_in] -> y [B, D_out]``.

    Metrics: the mean absolute error (a mean over rows, so sharded steps must average it over
    devices) and ``draw``, one uniform number from ``key`` (equal to the reference's only when every
    device got the step's key).
    """
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])  # [B, H]
    err = h @ params["w2"] + params["b2"] - y  # [B, D_out]
    return jnp.mean(err**2), {"abs_err": jnp.mean(jnp.abs(err)), "draw": jax.random.uniform(key)}


TX = optax.adamw(3e-2, weight_decay=1e-2)


@jax.jit
def _create(params: dict) -> TrainState:
    return create_train_state(params, TX, jax.random.PRNGKey(7))


def make_state(seed: int = 0) -> TrainState:
    """Fresh parameters, AdamW state and base key as host (numpy) arrays.

    One compiled program rather than many eager ops; host arrays are placed on any mesh
    without compiling device-to-device resharding programs.
    """
    return jax.device_get(_create(init_params(seed)))


def batches(steps: int = STEPS, batch: int = BATCH, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
    out = []
    for _ in range(steps):
        x = rng.normal(size=(batch, D_IN)).astype(np.float32)
        out.append((x, np.sin(x @ w).astype(np.float32)))
    return out


_reference_step = jax.jit(make_train_step(loss_fn, TX))


def reference_train(state: TrainState, data: list) -> tuple[TrainState, list[dict]]:
    """Plain single-device training with the spine's unsharded step: what every strategy must
    reproduce. Returns the final state and every step's metrics (as floats)."""
    history = []
    for batch in data:
        state, metrics = _reference_step(state, batch, step_key(state))
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history
