"""JSONL metrics, JSON conversion, and progress reporting from inside jit (never once per step)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.metrics import JitProgress, MetricsWriter, to_jsonable


def test_jsonl_roundtrip_and_strict_json(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    with MetricsWriter(path) as w:
        w.write(1, {"loss": jnp.float32(0.5), "acc": np.array([1.0, 2.0]), "bad": jnp.nan})
        w.write(2, {"loss": 0.25})
    records = MetricsWriter.read(path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 0.5 and records[0]["acc"] == [1.0, 2.0] and records[0]["bad"] is None
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_to_jsonable_types():
    assert to_jsonable({"a": (1, 2), "b": np.int64(3), "c": math.inf}) == {"a": [1, 2], "b": 3, "c": None}
    assert to_jsonable(jnp.array([1 + 2j])) == {"real": [1.0], "imag": [2.0]}
    with pytest.raises(TypeError, match="cannot convert object"):
        to_jsonable(object())


def test_tensorboard_needs_the_extra(tmp_path):
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"jaxlab\[tensorboard\]"):
            MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    else:
        with MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb") as w:
            w.write(1, {"loss": 1.0})
        assert any((tmp_path / "tb").iterdir())


def test_jit_progress_calls_back_every_n_steps_only():
    total, every = 100, 10
    progress = JitProgress(total=total, every=every, disable=True)

    @jax.jit
    def run(x):
        def body(carry, i):
            progress.update(i)
            return carry + i, None
        return jax.lax.scan(body, x, jnp.arange(total))[0]

    assert int(run(jnp.int32(0))) == sum(range(total))
    jax.effects_barrier()
    assert progress.calls == total // every
    assert progress.done == total
    progress.close()


def test_jit_progress_under_vmap_of_seeds():
    progress = JitProgress(total=20, every=5, disable=True)

    def train(key):
        def body(carry, i):
            progress.update(i)
            return carry + jax.random.normal(jax.random.fold_in(key, i)), None
        return jax.lax.scan(body, 0.0, jnp.arange(20))[0]

    out = jax.jit(jax.vmap(train))(jax.random.split(jax.random.PRNGKey(0), 4))
    jax.effects_barrier()
    assert out.shape == (4,) and progress.done == 20 and progress.calls == 4
    with pytest.raises(ValueError, match="every=0"):
        JitProgress(total=10, every=0)
