"""One process of the 2-process test: ``jaxlab launch --nproc 2 -- python _mp_worker.py OUT``.

Joins the job, trains the toy MLP under ZeRO-3 on a mesh spanning both processes' devices,
saves a sharded checkpoint (each process writes its shards) and, on process 0, the gathered
final parameters and the losses.
"""

import json
import pathlib
import sys

from jaxlab.parallel.launch import maybe_initialize_distributed

assert maybe_initialize_distributed(), "expected the launcher's environment"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import _parallel_toy as toy  # noqa: E402
from jaxlab.parallel import make_mesh, shard_train_state  # noqa: E402
from jaxlab.parallel.checkpoint import save_checkpoint  # noqa: E402
from jaxlab.train_state import make_train_step, step_key  # noqa: E402

out = pathlib.Path(sys.argv[1])
strategy = sys.argv[2]
mesh = make_mesh(data=jax.device_count())
state = shard_train_state(toy.make_state(), mesh, strategy)
step = make_train_step(toy.loss_fn, toy.TX, mesh=mesh, strategy=strategy)
losses = []
for batch in toy.batches():
    state, metrics = step(state, batch, step_key(state))  # the same global numpy batch on every process
    losses.append(float(metrics["loss"]))
save_checkpoint(out / "ckpt", state)
params = multihost_utils.process_allgather(state.params, tiled=True)
if jax.process_index() == 0:
    np.savez(out / "params.npz", **{k: np.asarray(v) for k, v in params.items()})
    (out / "result.json").write_text(json.dumps({
        "losses": losses, "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count()}))
