"""VQ-VAE image tokenizer (van den Oord et al. 2017, "Neural Discrete Representation Learning"), the image
tokenizer of early-fusion models (Chameleon Team 2024, "Chameleon: Mixed-Modal Early-Fusion Foundation
Models", §2.1: images become discrete codes from a codebook, read and written by the LM as tokens).

    images [B, H, W, C] --Encoder (f x f patches, MLP + 3x3 convs)--> z_e [B, h, w, D]      h = H / f, w = W / f
    z_e --nearest code--> codes [B, h, w] in [0, K), z_q = codebook[codes] [B, h, w, D]
    z_q (straight-through) --Decoder (3x3 convs + MLP to f x f patches)--> recon [B, H, W, C]

Vector quantisation (eq. 1-3 of the paper): ``codes = argmin_k ||z_e - e_k||^2``, computed as
``||z||^2 - 2 z.e_k + ||e_k||^2`` (one matmul; :func:`vector_quantize`) and checked against the brute-force
distance table of :func:`vector_quantize_reference`. The decoder reads ``z_e + stop_gradient(z_q - z_e)``
(the straight-through estimator: its value is ``z_q``, its gradient passes to ``z_e`` unchanged, so
``d recon / d z_e = d recon / d z_q``). The loss is

    L = ||x - recon||^2 + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2          (eq. 3, beta = 0.25)

(means over elements): the codebook loss moves the codes towards the encoder outputs and is the codebook's
only gradient; the commitment loss keeps the encoder near its codes. With ``codebook_update="ema"`` the codes
are instead moving averages of the encoder outputs assigned to them (appendix A.1, :func:`ema_update`). Dead codes (never chosen) are restarted
by :func:`train_vqvae` every ``restart_every`` steps onto random encoder outputs of the batch (a common
remedy for codebook collapse, e.g. Dhariwal et al. 2020, "Jukebox", §3.2). Codebook usage is reported as
the perplexity ``exp(H(p))`` of the code frequencies ``p`` (K when all codes are equally used) and the
fraction of codes used at least once.

    vq = VQVAE(VQVAEConfig(codebook_size=256, downsample=4))
    params, metrics = train_vqvae(vq, images, VQTrainConfig(steps=300), key)   # images float [N, H, W, 3]
    codes = vq.apply({"params": params}, images, method=VQVAE.encode)            # [N, H/4, W/4]
    pixels = vq.apply({"params": params}, codes, method=VQVAE.decode)            # [N, H, W, 3]
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlab.validation import check_choice, check_greater, check_positive, check_range

__all__ = ["CODEBOOK_UPDATES", "EMAState", "VQTrainConfig", "VQVAE", "VQVAEConfig", "codebook_usage", "ema_update",
           "evaluate_vqvae", "patchify", "restart_dead_codes", "straight_through", "train_vqvae", "unpatchify",
           "vector_quantize", "vector_quantize_reference", "vq_losses"]


CODEBOOK_UPDATES = ("loss", "ema")


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Configuration of :class:`VQVAE`."""

    codebook_size: int = 256
    """Codes K in the codebook (Chameleon: 8192)."""
    code_dim: int = 32
    """Width D of a code (and of the encoder output)."""
    hidden: int = 64
    """Width of the encoder's and decoder's layers."""
    downsample: int = 4
    """Side f of the pixel block one code stands for (images [H, W] give [H / f, W / f] codes)."""
    beta: float = 0.25
    """Weight of the commitment loss (the paper's beta)."""
    codebook_update: str = "loss"
    """How the codes learn: "loss" (the codebook loss, eq. 3) or "ema" (exponential moving averages of the
    encoder outputs assigned to each code, the paper's appendix A.1: :func:`ema_update` in :func:`train_vqvae`;
    the codebook loss is then reported, not trained on)."""
    ema_decay: float = 0.99
    """Decay gamma of the "ema" codebook update."""
    num_channels: int = 3
    """Image channels C."""

    def __post_init__(self):
        check_positive(self, "codebook_size", "code_dim", "hidden", "downsample", "num_channels", integer=True)
        check_range(self, "beta", 0.0, math.inf)
        check_choice(self, "codebook_update", CODEBOOK_UPDATES)
        check_range(self, "ema_decay", 0.0, 1.0, open_high=True)


# ---- the quantiser --------------------------------------------------------------------------------
def vector_quantize_reference(z, codebook):
    """Nearest code of each vector by the full distance table: z [..., D], codebook [K, D] -> codes int32 [...]
    (ties: the smaller index)."""
    dist = jnp.sum((z[..., None, :] - codebook) ** 2, axis=-1)  # [..., K]
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def vector_quantize(z, codebook):
    """Nearest code of each vector: z [..., D], codebook [K, D] -> (codes int32 [...], z_q [..., D]).

    ``||z - e_k||^2 = ||z||^2 - 2 z.e_k + ||e_k||^2`` with one matmul (the ``||z||^2`` term, the same for
    every k, is dropped); equal to :func:`vector_quantize_reference` up to floating-point ties."""
    if z.shape[-1] != codebook.shape[-1] or codebook.ndim != 2:
        raise ValueError(f"z [..., D] and codebook [K, D] must share D, got z {z.shape} and codebook {codebook.shape}")
    cross = jnp.einsum("...d,kd->...k", z, codebook)  # [..., K]
    dist = jnp.sum(codebook ** 2, axis=-1) - 2.0 * cross  # [..., K]
    codes = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    return codes, codebook[codes]


def vq_losses(z_e, z_q) -> tuple[jax.Array, jax.Array]:
    """(codebook loss ``mean (sg[z_e] - z_q)^2``, commitment loss ``mean (z_e - sg[z_q])^2``), unweighted."""
    codebook = jnp.mean((jax.lax.stop_gradient(z_e) - z_q) ** 2)
    commitment = jnp.mean((z_e - jax.lax.stop_gradient(z_q)) ** 2)
    return codebook, commitment


def straight_through(z_e, z_q):
    """``z_e + sg[z_q - z_e]``: the value of ``z_q``, the gradient passed to ``z_e`` as it is."""
    return z_e + jax.lax.stop_gradient(z_q - z_e)


def codebook_usage(codes, codebook_size: int) -> dict[str, jax.Array]:
    """``perplexity`` (exp of the entropy of the code frequencies) and ``usage`` (fraction of the codes that
    occur) of codes int [...]."""
    counts = jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)  # [K]
    p = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"perplexity": jnp.exp(entropy), "usage": jnp.mean((counts > 0).astype(jnp.float32))}


# ---- the model ------------------------------------------------------------------------------------
class _Residual(nn.Module):
    """``x + Dense(relu(Conv3x3(relu(x))))`` at the latent grid (each code sees its 3 x 3 neighbourhood)."""

    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.hidden, (3, 3))(nn.relu(x))  # [B, h, w, hidden]
        return x + nn.Dense(x.shape[-1])(nn.relu(h))


def patchify(images, f: int):
    """[B, H, W, C] -> [B, H/f, W/f, f*f*C] (each f x f block flattened, rows then columns then channels)."""
    B, H, W, C = images.shape
    x = images.reshape(B, H // f, f, W // f, f, C).transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, f, f, C]
    return x.reshape(B, H // f, W // f, f * f * C)


def unpatchify(x, f: int, channels: int):
    """Inverse of :func:`patchify`: [B, h, w, f*f*C] -> [B, h*f, w*f, C]."""
    B, h, w, _ = x.shape
    x = x.reshape(B, h, w, f, f, channels).transpose(0, 1, 3, 2, 4, 5)  # [B, h, f, w, f, C]
    return x.reshape(B, h * f, w * f, channels)


class VQVAE(nn.Module):
    """``apply(params, images [B, H, W, C]) -> (recon [B, H, W, C], aux)``; H and W multiples of ``downsample``.

    Encoder: each ``f x f`` pixel block flattened (:func:`patchify`), a Dense layer, two residual blocks
    with a 3 x 3 convolution over the latent grid, a Dense layer to ``code_dim``; the decoder mirrors it back
    to ``f * f * C`` pixels per code (:func:`unpatchify`). A patch-MLP tokenizer rather than strided
    convolutions at pixel resolution: a convolutional decoder's last layers at full resolution cost ~20x
    the FLOPs, too many for CPU runs.

    ``aux``: ``codes`` [B, h, w], ``latents`` (z_e [B, h, w, D]), ``recon_mse``, ``codebook_loss``,
    ``commitment_loss`` (unweighted), ``loss`` (``recon_mse + codebook_loss + beta * commitment_loss``, the
    training objective; without ``codebook_loss`` under the "ema" update), ``perplexity``, ``usage``."""

    cfg: VQVAEConfig

    def setup(self):
        cfg = self.cfg
        self.enc_in = nn.Dense(cfg.hidden)
        self.enc_res = [_Residual(cfg.hidden, name=f"enc_res_{i}") for i in range(2)]
        self.enc_out = nn.Dense(cfg.code_dim)
        limit = 1.0 / cfg.codebook_size
        self.codebook = self.param("codebook", nn.initializers.uniform(2 * limit),
                                   (cfg.codebook_size, cfg.code_dim))
        self.dec_in = nn.Dense(cfg.hidden)
        self.dec_res = [_Residual(cfg.hidden, name=f"dec_res_{i}") for i in range(2)]
        self.dec_out = nn.Dense(cfg.downsample ** 2 * cfg.num_channels)

    def _check_images(self, images):
        f, C = self.cfg.downsample, self.cfg.num_channels
        if getattr(images, "ndim", None) != 4 or images.shape[-1] != C or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"images must be [B, H, W, {C}] with H and W multiples of downsample={f}, "
                             f"got {getattr(images, 'shape', images)}")

    def encode_latents(self, images):
        """Encoder outputs z_e [B, h, w, D] of images [B, H, W, C]."""
        self._check_images(images)
        x = self.enc_in(patchify(images.astype(jnp.float32) - 0.5, self.cfg.downsample))  # [B, h, w, hidden]
        for block in self.enc_res:
            x = block(x)
        return self.enc_out(nn.relu(x))  # [B, h, w, D]

    def decode_latents(self, z_q):
        """Pixels [B, H, W, C] of quantised latents [B, h, w, D]."""
        x = self.dec_in(z_q)  # [B, h, w, hidden]
        for block in self.dec_res:
            x = block(x)
        x = self.dec_out(nn.relu(x))  # [B, h, w, f*f*C]
        return unpatchify(x, self.cfg.downsample, self.cfg.num_channels)  # [B, H, W, C]

    def encode(self, images):
        """Codes int32 [B, h, w] of images [B, H, W, C]."""
        return vector_quantize(self.encode_latents(images), self.codebook)[0]

    def decode(self, codes):
        """Pixels [B, H, W, C] (about [0, 1]; not clipped) of codes int [B, h, w] in [0, codebook_size)."""
        if getattr(codes, "ndim", None) != 3 or not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"codes must be an int array [B, h, w], got {getattr(codes, 'shape', codes)}")
        return self.decode_latents(self.codebook[codes])  # [B, h, w, D] -> [B, H, W, C]

    def __call__(self, images):
        z_e = self.encode_latents(images)  # [B, h, w, D]
        codes, z_q = vector_quantize(z_e, self.codebook)
        codebook_loss, commitment_loss = vq_losses(z_e, z_q)
        recon = self.decode_latents(straight_through(z_e, z_q))
        recon_mse = jnp.mean((recon - images.astype(jnp.float32)) ** 2)
        loss = recon_mse + self.cfg.beta * commitment_loss
        if self.cfg.codebook_update == "loss":  # "ema": the codes move by ema_update, outside the gradient
            loss = loss + codebook_loss
        return recon, {"codes": codes, "latents": z_e, "recon_mse": recon_mse, "codebook_loss": codebook_loss,
                       "commitment_loss": commitment_loss, "loss": loss,
                       **codebook_usage(codes, self.cfg.codebook_size)}


# ---- training -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VQTrainConfig:
    """Training of :class:`VQVAE` by :func:`train_vqvae`."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    """Adam learning rate (constant after a 5% warmup)."""
    restart_every: int = 50
    """Every this many steps, codes unused since the last restart move onto random encoder outputs of the
    batch (0: never)."""
    log_every: int = 25
    """Steps between the entries of the returned history."""

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "log_every", integer=True)
        check_positive(self, "restart_every", minimum=0, integer=True)
        check_greater(self, "lr")


def restart_dead_codes(codebook, counts, z_e, key):
    """Codes with ``counts == 0`` replaced by encoder outputs of ``z_e [..., D]`` drawn at random."""
    flat = z_e.reshape(-1, z_e.shape[-1])  # [N, D]
    pick = jax.random.randint(key, (codebook.shape[0],), 0, flat.shape[0])
    return jnp.where((counts == 0)[:, None], flat[pick], codebook)


class EMAState(NamedTuple):
    """Moving averages of the "ema" codebook update: ``counts`` [K] (assignments per code) and ``sums`` [K, D]
    (sum of the encoder outputs assigned to each code)."""

    counts: jax.Array
    sums: jax.Array


def ema_update(state: EMAState, z_e, codes, decay: float, eps: float = 1e-5) -> tuple[EMAState, jax.Array]:
    """One EMA step (van den Oord et al. 2017, appendix A.1, eqs. 6-8) from encoder outputs z_e [..., D] and
    their codes [...]: ``N_k <- g N_k + (1 - g) n_k``, ``m_k <- g m_k + (1 - g) sum_{i: code i = k} z_i``,
    ``e_k = m_k / N_k`` (``N`` Laplace-smoothed by ``eps`` so unused codes stay finite). Returns
    ``(new state, new codebook [K, D])``."""
    K = state.counts.shape[0]
    flat, ids = z_e.reshape(-1, z_e.shape[-1]), codes.reshape(-1)  # [N, D], [N]
    n = jnp.zeros((K,), jnp.float32).at[ids].add(1.0)  # [K]
    sums = jax.ops.segment_sum(flat, ids, num_segments=K)  # [K, D]
    state = EMAState(decay * state.counts + (1 - decay) * n, decay * state.sums + (1 - decay) * sums)
    total = jnp.sum(state.counts)
    smoothed = (state.counts + eps) / (total + K * eps) * total  # [K]
    return state, state.sums / smoothed[:, None]


def train_vqvae(model: VQVAE, images, cfg: VQTrainConfig, key) -> tuple[dict, dict]:
    """Train ``model`` on images float [N, H, W, C] in [0, 1] (Adam; minibatches drawn with replacement,
    batch t from ``fold_in(key, t)``). Returns ``(params, metrics)``: the final ``recon_mse``, ``perplexity`` and
    ``usage`` over all the images (encode -> decode), and ``history``, the per-step training metrics every
    ``log_every`` steps."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a non-empty float array [N, H, W, C], got {images.shape}")
    init_key, loop_key = jax.random.split(key)
    params = jax.jit(model.init)(init_key, images[:1])["params"]
    tx = optax.adam(optax.linear_schedule(0.0, cfg.lr, max(1, cfg.steps // 20)))

    def loss_fn(params, batch):
        _, aux = model.apply({"params": params}, batch)
        return aux["loss"], aux

    ema = model.cfg.codebook_update == "ema"

    def step(params, opt_state, counts, ema_state, images, t):
        k_batch, k_restart = jax.random.split(jax.random.fold_in(loop_key, t))
        batch = images[jax.random.randint(k_batch, (cfg.batch_size,), 0, images.shape[0])]  # [b, H, W, C]
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema:  # the codebook has no gradient: it moves by the moving averages
            ema_state, book = ema_update(ema_state, aux["latents"], aux["codes"], model.cfg.ema_decay)
            params = {**params, "codebook": book}
        counts = counts.at[aux["codes"].reshape(-1)].add(1.0)  # [K]: uses since the last restart
        if cfg.restart_every:
            due = (t + 1) % cfg.restart_every == 0
            restarted = restart_dead_codes(params["codebook"], counts, aux["latents"], k_restart)
            dead = due & (counts == 0)  # [K]
            params = {**params, "codebook": jnp.where(dead[:, None], restarted, params["codebook"])}
            if ema:  # a restarted code starts its averages afresh at its new place
                ema_state = EMAState(jnp.where(dead, 1.0, ema_state.counts),
                                     jnp.where(dead[:, None], restarted, ema_state.sums))
            counts = jnp.where(due, 0.0, counts)
        metrics = {k: aux[k] for k in ("loss", "recon_mse", "codebook_loss", "commitment_loss", "perplexity",
                                       "usage")}
        return params, opt_state, counts, ema_state, metrics

    # a host loop over one jitted step: XLA:CPU runs these convolutions ~10x slower inside a lax.scan
    step = jax.jit(step, donate_argnums=(0, 1, 2, 3))
    opt_state, counts = tx.init(params), jnp.zeros((model.cfg.codebook_size,), jnp.float32)
    ema_state = EMAState(jnp.ones_like(counts), params["codebook"] + 0.0)  # N = 1, m = the initial codes
    history: dict[str, list] = {"step": []}
    for t in range(cfg.steps):
        params, opt_state, counts, ema_state, metrics = step(params, opt_state, counts, ema_state, images,
                                                             jnp.int32(t))
        if (t + 1) % cfg.log_every == 0 or t + 1 == cfg.steps:
            history["step"].append(t + 1)
            for k, v in jax.device_get(metrics).items():
                history.setdefault(k, []).append(float(v))
    return params, {**evaluate_vqvae(model, params, images), "history": history}


def evaluate_vqvae(model: VQVAE, params, images, batch_size: int = 256) -> dict[str, float]:
    """``recon_mse`` of encode -> decode over images [N, H, W, C], and the codebook ``perplexity``/``usage``
    of all their codes."""
    images = jnp.asarray(images, jnp.float32)

    @jax.jit
    def one(params, batch):
        recon, aux = model.apply({"params": params}, batch)
        return jnp.sum((recon - batch) ** 2), aux["codes"]

    sq, codes = 0.0, []
    for start in range(0, images.shape[0], batch_size):
        s, c = one(params, images[start:start + batch_size])
        sq, codes = sq + float(s), codes + [c]
    usage = codebook_usage(jnp.concatenate(codes), model.cfg.codebook_size)
    return {"recon_mse": sq / images.size, **{k: float(v) for k, v in usage.items()}}
