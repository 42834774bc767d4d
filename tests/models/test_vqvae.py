"""VQ-VAE: nearest-code assignment against brute force, the straight-through gradient, the codebook and
commitment losses and the EMA update by hand (and which parameters each loss reaches), codebook usage, dead-code
restarts, and a short training run whose reconstruction error falls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models import vqvae
from jaxlab.models.vqvae import VQTrainConfig, VQVAE, VQVAEConfig

CFG = VQVAEConfig(codebook_size=16, code_dim=4, hidden=8, downsample=4)


@pytest.fixture(scope="module")
def model_and_params():
    model = VQVAE(CFG)
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 12, 3))

    @jax.jit
    def init(key):
        params = model.init(key, images)["params"]
        # a codebook spread around the encoder outputs, so that several codes are chosen
        z = model.apply({"params": params}, images, method=VQVAE.encode_latents)
        book = z.reshape(-1, CFG.code_dim)[:1] + 0.3 * jax.random.normal(jax.random.PRNGKey(2), (16, CFG.code_dim))
        return {**params, "codebook": book}

    return model, init(jax.random.PRNGKey(0)), images


def test_nearest_code_matches_brute_force(key):
    z = jax.random.normal(key, (3, 5, 7, 6))
    codebook = jax.random.normal(jax.random.fold_in(key, 1), (40, 6))
    codes, z_q = vqvae.vector_quantize(z, codebook)
    brute = np.argmin(((np.asarray(z)[..., None, :] - np.asarray(codebook)) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(codes, brute)
    np.testing.assert_array_equal(codes, vqvae.vector_quantize_reference(z, codebook))
    np.testing.assert_array_equal(z_q, np.asarray(codebook)[brute])
    # a case by hand: the nearest code is not the one with the largest dot product
    book = jnp.array([[0.0, 0.0], [3.0, 3.0]])
    assert int(vqvae.vector_quantize(jnp.array([[1.0, 1.0]]), book)[0][0]) == 0
    with pytest.raises(ValueError, match=r"must share D, got z \(1, 3\) and codebook \(2, 2\)"):
        vqvae.vector_quantize(jnp.ones((1, 3)), book)


def test_losses_by_hand_and_which_parameters_they_reach():
    z_e = jnp.array([[1.0, 2.0], [0.0, -1.0]])
    z_q = jnp.array([[1.5, 2.0], [0.0, 0.0]])
    codebook_loss, commitment = vqvae.vq_losses(z_e, z_q)
    # mean over the 4 elements of (z_e - z_q)^2 = (0.25 + 0 + 0 + 1) / 4
    assert float(codebook_loss) == pytest.approx(0.3125) and float(commitment) == pytest.approx(0.3125)
    g_e = jax.grad(lambda e: vqvae.vq_losses(e, z_q)[0])(z_e)  # the codebook loss does not move the encoder
    g_q = jax.grad(lambda q: vqvae.vq_losses(z_e, q)[1])(z_q)  # the commitment loss does not move the codes
    np.testing.assert_array_equal(g_e, 0.0)
    np.testing.assert_array_equal(g_q, 0.0)
    np.testing.assert_allclose(jax.grad(lambda q: vqvae.vq_losses(z_e, q)[0])(z_q), (z_q - z_e) / 2)
    np.testing.assert_allclose(jax.grad(lambda e: vqvae.vq_losses(e, z_q)[1])(z_e), (z_e - z_q) / 2)
    # EMA update by hand: code 0 gets z = 1 and 3, code 1 gets 5, code 2 nothing
    state = vqvae.EMAState(jnp.array([1.0, 1.0, 1.0]), jnp.array([[2.0], [4.0], [6.0]]))
    z, codes = jnp.array([[1.0], [3.0], [5.0]]), jnp.array([0, 0, 1])
    new, book = vqvae.ema_update(state, z, codes, decay=0.5, eps=0.0)
    np.testing.assert_allclose(new.counts, [1.5, 1.0, 0.5])  # 0.5 * 1 + 0.5 * n
    np.testing.assert_allclose(new.sums, [[3.0], [4.5], [3.0]])  # 0.5 * m + 0.5 * sum of its z
    np.testing.assert_allclose(book, [[2.0], [4.5], [6.0]])  # m / N: an unused code stays where it was
    _, mean = vqvae.ema_update(state, z, codes, decay=0.0, eps=0.0)
    np.testing.assert_allclose(mean[:2], [[2.0], [5.0]])  # decay 0: the mean of the assigned outputs
    usage = vqvae.codebook_usage(jnp.array([[0, 0], [1, 1]]), 4)
    assert float(usage["perplexity"]) == pytest.approx(2.0) and float(usage["usage"]) == 0.5


def test_straight_through_and_codebook_gradients(model_and_params):
    model, params, images = model_and_params

    @jax.jit  # one program for every gradient below
    def gradients(params):
        _, aux = model.apply({"params": params}, images)
        z_e, z_q = aux["latents"], params["codebook"][aux["codes"]]
        decode = lambda z: jnp.sum(model.apply({"params": params}, z, method=VQVAE.decode_latents) ** 2)  # noqa: E731
        loss = lambda name: jax.grad(lambda p: model.apply({"params": p}, images)[1][name])(params)  # noqa: E731
        return {"aux": aux, "z_q": z_q, "st": vqvae.straight_through(z_e, z_q),
                "g_st": jax.grad(lambda e: decode(vqvae.straight_through(e, z_q)))(z_e), "g_q": jax.grad(decode)(z_q),
                **{name: loss(name) for name in ("recon_mse", "commitment_loss", "codebook_loss")}}

    out = gradients(params)
    aux = out["aux"]
    assert len(np.unique(aux["codes"])) > 1
    # d recon / d z_e through the straight-through estimator equals d recon / d z_q
    np.testing.assert_allclose(out["g_st"], out["g_q"], rtol=1e-5, atol=1e-6)  # z_e + (z_q - z_e) rounds
    assert float(jnp.abs(out["g_st"]).max()) > 0
    np.testing.assert_allclose(out["st"], out["z_q"], atol=1e-6)
    recon, commit, book = out["recon_mse"], out["commitment_loss"], out["codebook_loss"]
    # the codebook's only gradient is the codebook loss's; the reconstruction reaches the encoder (straight through)
    np.testing.assert_array_equal(recon["codebook"], 0.0)
    np.testing.assert_array_equal(commit["codebook"], 0.0)
    assert float(jnp.abs(book["codebook"]).max()) > 0
    encoder_decoder = {k: v for k, v in book.items() if k != "codebook"}
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(encoder_decoder))
    assert float(jnp.abs(recon["enc_in"]["kernel"]).max()) > 0 and float(jnp.abs(commit["enc_in"]["kernel"]).max()) > 0
    np.testing.assert_allclose(aux["loss"], aux["recon_mse"] + aux["codebook_loss"] + 0.25 * aux["commitment_loss"],
                               rtol=1e-6)


def test_encode_decode_shapes_restart_and_errors(model_and_params):
    model, params, images = model_and_params
    codes = model.apply({"params": params}, images, method=VQVAE.encode)
    assert codes.shape == (2, 2, 3) and codes.dtype == jnp.int32
    assert model.apply({"params": params}, codes, method=VQVAE.decode).shape == (2, 8, 12, 3)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 6, 2))
    np.testing.assert_array_equal(vqvae.unpatchify(vqvae.patchify(x, 2), 2, 2), x)
    book = jnp.arange(8.0).reshape(4, 2)
    z = jnp.full((1, 2, 1, 2), 100.0)
    new = vqvae.restart_dead_codes(book, jnp.array([3.0, 0.0, 1.0, 0.0]), z, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(new[jnp.array([0, 2])], book[jnp.array([0, 2])])
    np.testing.assert_array_equal(new[jnp.array([1, 3])], 100.0)
    with pytest.raises(ValueError, match=r"H and W multiples of downsample=4, got \(1, 6, 8, 3\)"):
        model.apply({"params": params}, jnp.zeros((1, 6, 8, 3)))
    with pytest.raises(ValueError, match="codebook_size=0 must be an int >= 1"):
        VQVAEConfig(codebook_size=0)
    with pytest.raises(ValueError, match=r"codebook_update='kmeans' must be one of \('loss', 'ema'\)"):
        VQVAEConfig(codebook_update="kmeans")


def test_training_reduces_reconstruction_error():
    from jaxlab.models.vision_data import ShapesConfig, make_scenes

    scenes = make_scenes(jax.random.PRNGKey(0), 32, ShapesConfig(min_size=24, max_size=24, size_multiple=8))
    images = np.stack([s.image for s in scenes]).astype(np.float32) / 255.0
    model = VQVAE(VQVAEConfig(codebook_size=32, code_dim=8, hidden=16, downsample=4))
    params, metrics = vqvae.train_vqvae(model, images, VQTrainConfig(steps=60, batch_size=16, lr=1e-2, restart_every=10,
                                                                     log_every=10), jax.random.PRNGKey(1))
    history = metrics["history"]
    assert history["step"] == [10, 20, 30, 40, 50, 60]
    assert history["recon_mse"][-1] < 0.8 * history["recon_mse"][0], history["recon_mse"]
    # well below predicting each image's mean colour everywhere, with more than a handful of codes in use
    assert metrics["recon_mse"] < 0.6 * float(images.var(axis=(1, 2)).mean()), metrics
    assert metrics["usage"] > 0.25 and metrics["perplexity"] > 4, metrics
