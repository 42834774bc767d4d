"""Muon in the optimizer factory: orthogonalisation against the SVD polar factor, Moonlight's update RMS,
which leaves are matrices (from logical axis names), decoupled decay by name, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers

from jaxlab.optim import OptimizerConfig, make_optimizer, muon_dimensions


def _polar(m):
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return u @ vt


def _first_update(cfg, params, grads, dims):
    tx = make_optimizer(cfg, muon_dims=dims, no_decay=("scale",))
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_newton_schulz_direction_is_the_polar_factor_at_rms_0p2():
    """One Muon step on a [64, 256] and a [256, 32] matrix: the update is -lr * 0.2 * sqrt(max(m, n)) * O
    with O close to U V^T of the gradient (the quintic Newton-Schulz of Muon leaves singular values in
    about [0.7, 1.2], not exactly 1), so its RMS is about 0.2 * lr whatever the shape (Moonlight eq. 4)."""
    key = jax.random.key(0)
    shapes = {"a": (64, 256), "b": (256, 32)}
    grads = {k: jax.random.normal(jax.random.fold_in(key, i), s) * 10.0 ** (i - 1)
             for i, (k, s) in enumerate(shapes.items())}
    params = jax.tree.map(jnp.zeros_like, grads)
    lr = 1e-2
    cfg = OptimizerConfig(lr=lr, algorithm="muon", clip_norm=0.0, muon_momentum=0.0)
    dims = {k: MuonDimensionNumbers(0, 1) for k in shapes}
    updates = _first_update(cfg, params, grads, dims)
    for k, (m, n) in shapes.items():
        u = -np.asarray(updates[k]) / (lr * 0.2 * np.sqrt(max(m, n)))
        polar = _polar(np.asarray(grads[k]))
        cos = np.sum(u * polar) / (np.linalg.norm(u) * np.linalg.norm(polar))
        assert cos > 0.97, (k, cos)
        s = np.linalg.svd(u, compute_uv=False)
        assert 0.6 < s.min() and s.max() < 1.3, (k, s.min(), s.max())
        rms = np.sqrt(np.mean(np.square(np.asarray(updates[k])))) / lr
        # exactly 0.2 * rms(singular values of O): 0.2 for a perfect polar factor
        np.testing.assert_allclose(rms, 0.2 * np.sqrt(np.mean(s ** 2)), rtol=1e-3)
        assert 0.15 < rms < 0.25, (k, rms)


def test_batch_axes_are_orthogonalised_independently_and_other_leaves_take_adamw():
    """A [layers, embed, heads, head_dim] kernel is one [d, H * Dh] matrix per layer; an embedding takes
    the AdamW branch (optax's, with Nesterov momentum) at the same learning rate."""
    key = jax.random.key(1)
    L, d, H, Dh, V = 3, 32, 4, 16, 50
    grads = {"q": jax.random.normal(key, (L, d, H, Dh)),
             "embedding": jax.random.normal(jax.random.fold_in(key, 1), (V, d))}
    params = jax.tree.map(jnp.zeros_like, grads)
    axes = {"q": P("layers", "embed", "heads", "head_dim"), "embedding": P("vocab", "embed")}
    dims = muon_dimensions(axes)
    assert dims["q"] == MuonDimensionNumbers(reduction_axis=1, output_axis=(2, 3)) and dims["embedding"] is None
    lr = 1e-2
    updates = _first_update(OptimizerConfig(lr=lr, algorithm="muon", clip_norm=0.0, muon_momentum=0.0),
                            params, grads, dims)
    for layer in range(L):
        g = np.asarray(grads["q"][layer]).reshape(d, H * Dh)
        u = -np.asarray(updates["q"][layer]).reshape(d, H * Dh)
        cos = np.sum(u * _polar(g)) / (np.linalg.norm(u) * np.linalg.norm(_polar(g)))
        assert cos > 0.97, (layer, cos)
    # one SVD over all layers at once would mix them: the layers' updates are each a polar factor
    adamw = optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, nesterov=True)
    expected, _ = adamw.update(grads["embedding"], adamw.init(params["embedding"]), params["embedding"])
    np.testing.assert_allclose(updates["embedding"], expected, rtol=1e-5)


def test_muon_dimensions_from_logical_axes():
    axes = {"out": P("heads", "head_dim", "embed"), "up": P("embed", "mlp"), "down": P("mlp", "embed"),
            "w_gate": P("experts", "embed", "mlp"), "scale": P("embed"), "head": P("embed", "vocab"),
            "A_log": P("heads", "state"), "stacked_down": P("layers", "experts", "mlp", "embed")}
    dims = muon_dimensions(axes)
    assert dims["out"] == MuonDimensionNumbers((0, 1), 2)
    assert dims["up"] == MuonDimensionNumbers(0, (1,))
    assert dims["down"] == MuonDimensionNumbers((0,), 1)
    assert dims["w_gate"] == MuonDimensionNumbers(1, (2,))
    assert dims["stacked_down"] == MuonDimensionNumbers((2,), 3)
    assert dims["scale"] is None and dims["head"] is None and dims["A_log"] is None
    # a Dense kernel without axis names is an [in, out] matrix when its shape is known (a scanned one has a
    # leading layers axis); other unnamed leaves stay with AdamW
    unnamed = {"mixer": {"kernel": P()}, "stacked": {"kernel": P("layers")}, "decay": P(), "conv": {"kernel": P()}}
    shapes = {"mixer": {"kernel": jnp.zeros((8, 16))}, "stacked": {"kernel": jnp.zeros((3, 8, 16))},
              "decay": jnp.zeros((8, 16)), "conv": {"kernel": jnp.zeros((4, 1, 8))}}
    dims = muon_dimensions(unnamed, shapes)
    assert dims["mixer"]["kernel"] == MuonDimensionNumbers(0, 1)
    assert dims["stacked"]["kernel"] == MuonDimensionNumbers(1, 2)
    assert dims["decay"] is None and dims["conv"]["kernel"] is None
    assert muon_dimensions(unnamed)["mixer"]["kernel"] is None


def test_muon_weight_decay_is_decoupled_scaled_by_lr_and_masked_by_name():
    """With a zero gradient the update is the decay alone: -lr * wd * W on decayed leaves, in both
    branches (matrix and AdamW), and nothing on a leaf named in no_decay."""
    params = {"w": jnp.ones((8, 8)), "bias": jnp.ones((8,)), "scale": jnp.ones((8,))}
    grads = jax.tree.map(jnp.zeros_like, params)
    dims = {"w": MuonDimensionNumbers(0, 1), "bias": None, "scale": None}
    lr, wd = 0.1, 0.5
    updates = _first_update(OptimizerConfig(lr=lr, algorithm="muon", weight_decay=wd, clip_norm=0.0),
                            params, grads, dims)
    np.testing.assert_allclose(updates["w"], -lr * wd * np.ones((8, 8)), rtol=1e-5)
    np.testing.assert_allclose(updates["bias"], -lr * wd * np.ones(8), rtol=1e-5)
    np.testing.assert_allclose(updates["scale"], 0.0, atol=1e-7)


def test_muon_config_errors():
    with pytest.raises(ValueError, match="muon_dims"):
        make_optimizer(OptimizerConfig(algorithm="muon"))
    with pytest.raises(ValueError, match="muon_rms"):
        OptimizerConfig(algorithm="muon", muon_rms=0.0)
    with pytest.raises(ValueError, match="muon_momentum"):
        OptimizerConfig(algorithm="muon", muon_momentum=1.5)
    with pytest.raises(ValueError, match="ns_steps"):
        OptimizerConfig(algorithm="muon", ns_steps=0)
