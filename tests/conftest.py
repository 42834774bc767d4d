"""Test-wide setup: 8 simulated CPU devices, fixed seeds, GPU marker handling.

The device count must be fixed before JAX initialises its backend, hence at import time here.
"""

import os
import pathlib
import sys

# `python -m pytest` from the repository root puts the root on sys.path, which makes the source folders
# (kernels/, models/, rl/, ...) importable as top-level packages that shadow installed ones of the same names
# (transformers imports Hugging Face's `kernels`). jaxlab is tested as installed, so the root comes off.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if pathlib.Path(p or os.getcwd()).resolve() != _ROOT]

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Inline CPU dispatch, as the `jaxlab` CLI runs: host callbacks from jitted loops (progress bars) can
# hang under asynchronous CPU dispatch (jax-ml/jax#25861).
jax.config.update("jax_cpu_enable_async_dispatch", False)


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_seeds():
    np.random.seed(0)
    yield


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
