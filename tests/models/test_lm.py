"""LM: for every mixer, decode == full forward, packed == separate documents, causality by gradients,
and the model overfits a tiny batch; config validation (sampling: test_sampling.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.models.lm import LM, MIXERS, NO_DECAY_PARAMS, LMConfig, init_params
from jaxlab.optim import OptimizerConfig, decay_mask, make_optimizer
from jaxlab.xla_options import FAST_COMPILE

V = 32


def small_cfg(mixer, **kw):  # window 6 < L: the sliding layer's cache wraps while decoding
    base = dict(vocab_size=V, d_model=32, num_layers=1, num_heads=4, mixer=mixer, window=6, attention_impl="xla",
                max_len=64, d_state=8, ssm_head_dim=16, chunk_size=8, gau_qk_dim=16, num_features=16)
    base.update(kw)
    return LMConfig(**base)


# Every mixer in one hybrid stack (layer i uses CONTRACT_MIXERS[i]): one compiled program checks them all,
# as any layer that peeks at the future, leaks across documents or decodes differently breaks the
# stack's contract. Attention adds GQA and QK-norm, linear attention FAVOR+ features, the sparse mixer the
# "fixed" pattern with blocks of 4, the FFN is MoE (its dispatch against the dense reference is in
# test_moe.py); the sliding window's ring buffer by tests/models/test_sampling.py (window 4, 11 tokens).
# "lsh" has no decoding and its sorted chunks depend on the whole row: tests/models/test_sparse_mixers.py.
CONTRACT_MIXERS = tuple(m for m in MIXERS if m != "lsh")
HYBRID = dict(mixer_pattern=CONTRACT_MIXERS, num_layers=len(CONTRACT_MIXERS), num_kv_heads=2, qk_norm=True,
              feature_map="favor", sparse_pattern="fixed", sparse_stride=4, sparse_summary=2, ffn="moe",
              num_experts=4, experts_per_token=2)


def _contract(cfg, key, a, L=20, split=9, prefill=7, steps=60):
    """Three compiled programs per config (init, training, decoding); compiles dominate run time.

    The batch has L + 1 rows: rows 0..L-2 the sequence ``a``, row L-1 ``a`` packed as two documents
    (split at ``split``), row L the second document alone (``a`` rotated). The scan over training
    steps differentiates w.r.t. the parameters and w.r.t. a perturbation of the embedded inputs; at
    step 0 row r's loss is only the prediction at t = r, so that step's input gradients give the
    causality matrix (prediction t vs input s), and its logits (initial parameters) the packing check.
    Decoding with the initial parameters, and the plain forward without segment ids (the
    mixers' fast paths: FFT for S4D, the chunked kernel for GAU), then reproduce step 0's logits.
    """
    model = LM(cfg)
    tx = optax.adam(optax.cosine_decay_schedule(3e-2, steps))
    R = L + 1
    rows = jnp.stack([a] * (L - 1) + [a, jnp.roll(a, -split)])
    seg = jnp.zeros((R, L), jnp.int32).at[L - 1].set((jnp.arange(L) >= split).astype(jnp.int32))
    params = init_params(model, key, rows)

    def loss_fn(params, delta, mask, aux_weight):
        logits, aux = model.apply({"params": params, "perturbations": {"embedded": delta}}, rows, segment_ids=seg)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, rows[:, 1:, None], axis=-1)[..., 0]  # [R, L-1]
        mask = mask * (seg[:, 1:] == seg[:, :-1])  # no target across a document boundary
        return jnp.sum(nll * mask) / jnp.sum(mask) + aux_weight * aux["aux_loss"], logits

    def train(params):
        onehot = jnp.zeros((R, L - 1)).at[jnp.arange(L - 1), jnp.arange(L - 1)].set(1.0).at[L - 1:].set(1.0)
        masks = jnp.concatenate([onehot[None], jnp.ones((steps - 1, R, L - 1))])  # per-step loss masks

        def train_step(carry, mask):
            params, opt_state, step = carry
            delta = jnp.zeros((R, L, cfg.d_model), cfg.compute_dtype)
            grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
            (loss, logits), (grads, d_delta) = grad_fn(params, delta, mask, (step > 0).astype(jnp.float32))
            updates, opt_state = tx.update(grads, opt_state)
            sens = jnp.abs(d_delta).sum(-1)  # [R, L]: |d loss / d x_s|, row r = prediction at t = r (step 0)
            return (optax.apply_updates(params, updates), opt_state, step + 1), (loss, logits, sens)

        carry = (params, tx.init(params), jnp.zeros((), jnp.int32))
        _, (losses, logits, sens) = jax.lax.scan(train_step, carry, masks)
        return losses, logits[0], sens[0, :L - 1]

    def decode(params, tokens):  # prefill a chunk, then one token at a time
        plain = model.apply({"params": params}, tokens)[0]
        apply = functools.partial(model.apply, {"params": params}, method=LM.decode)
        first, cache = apply(tokens[:, :prefill], model.init_cache(2, L))

        def decode_step(cache, tok):
            out, cache = apply(tok[:, None], cache)
            return cache, out[:, 0]

        _, rest = jax.lax.scan(decode_step, cache, tokens[:, prefill:].T)
        return jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1), plain

    losses, logits, sens = jax.jit(train, compiler_options=FAST_COMPILE)(params)
    decoded, plain = jax.jit(decode, compiler_options=FAST_COMPILE)(params, rows[jnp.array([0, L])])  # two sequences
    return losses, logits, sens, decoded, plain


def test_every_mixer_contract():
    """Overfits a tiny batch; decode == full forward, packed == separate, causal by gradients."""
    cfg = small_cfg("attention", **HYBRID)
    L, split = 20, 9
    a = jax.random.randint(jax.random.PRNGKey(1), (L,), 0, V)
    losses, logits, sens, decoded, plain = _contract(cfg, jax.random.PRNGKey(0), a, L, split)

    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses)) and losses[1] > 2.5 and losses[-1] < 0.3, (losses[1], losses[-1])
    tol = dict(atol=1e-4 * max(1.0, float(jnp.max(jnp.abs(logits)))), rtol=1e-4)
    np.testing.assert_allclose(decoded, logits[jnp.array([0, L])], **tol, err_msg="decode != full forward")
    np.testing.assert_allclose(plain, logits[jnp.array([0, L])], **tol, err_msg="forward without segment ids")
    np.testing.assert_allclose(logits[L - 1, :split], logits[0, :split], **tol, err_msg="packed: first document")
    np.testing.assert_allclose(logits[L - 1, split:], logits[L, :L - split], **tol, err_msg="packed: 2nd document")

    sens = np.asarray(sens)  # [t, s] for t < L - 1
    future = np.triu(np.ones(sens.shape, bool), k=1)
    assert np.all(sens[future] == 0), f"predictions depend on future inputs: max {sens[future].max()}"
    assert np.all(sens[~future] > 0)  # the present and the whole past matter


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=30, num_heads=4), "d_model=30 must be divisible by num_heads=4"),
    (dict(num_heads=4, num_kv_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
    (dict(num_experts=4, experts_per_token=5), "experts_per_token=5 must be <= num_experts=4"),
    (dict(mixer="lstm"), "mixer='lstm'"),
    (dict(mixer_pattern=("mamba", "lstm")), "mixer_pattern=('mamba', 'lstm')"),
    (dict(ffn="relu"), "ffn='relu'"),
    (dict(remat="some"), "remat='some'"),
    (dict(remat=("query_proj", "nope")), "nope"),
    (dict(attention_impl="flash"), "attention_impl='flash'"),
    (dict(dtype="float8"), "dtype='float8'"),
    (dict(num_layers=0), "num_layers=0"),
    (dict(mixer="mamba2", d_model=24, num_heads=4, ssm_head_dim=20), "ssm_head_dim=20"),
    (dict(mixer_pattern=("s4d", "mamba2"), d_model=24, num_heads=4, ssm_head_dim=20), "ssm_head_dim=20"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        LMConfig(**kwargs)


def test_config_is_frozen_and_derives_sizes():
    cfg = LMConfig(d_model=96, num_heads=4, num_kv_heads=1)
    assert (cfg.head_dim, cfg.kv_heads, cfg.ffn_hidden) == (24, 1, 256)
    hybrid = LMConfig(num_layers=5, mixer_pattern=("mamba", "attention"))
    assert hybrid.layer_mixers == ("mamba", "attention", "mamba", "attention", "mamba")
    with pytest.raises(Exception):
        cfg.d_model = 64  # frozen
    model = LM(cfg)
    with pytest.raises(ValueError, match="max_len"):
        model.init_cache(1, cfg.max_len + 1)


@pytest.mark.parametrize("mixer", ["mamba", "s4d", "s4", "lru", "gau", "attention", "linear"])
def test_weight_decay_spares_vectors_and_ssm_dynamics_and_decays_matrices(mixer):
    cfg = LMConfig(vocab_size=16, d_model=32, num_layers=1, num_heads=2, mixer=mixer, max_len=16, d_state=4,
                   ssm_head_dim=8, chunk_size=8, feature_map="favor")
    params = jax.eval_shape(lambda: init_params(LM(cfg), jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    mask = decay_mask(params, NO_DECAY_PARAMS)
    named = {jax.tree_util.keystr(path): (leaf, decays) for (path, leaf), decays in
             zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(mask))}
    for path, (leaf, decays) in named.items():
        if leaf.ndim < 2:  # norm scales, biases, D, dt_bias, log_dt
            assert not decays, path
        if path.split("'")[-2] in ("embedding", "kernel"):
            assert decays, path
    spared = {path.split("'")[-2] for path, (leaf, d) in named.items() if leaf.ndim >= 2 and not d}
    assert spared == {"mamba": {"A_log"}, "s4d": {"log_A_real", "A_imag", "B"}, "gau": {"gamma", "beta"},
                      "s4": {"log_A_real", "A_imag", "P", "B"}, "lru": set(),
                      "attention": set(), "linear": {"favor_projection"}}[mixer]
    # The optimizer factory with these names leaves a spared parameter where it was when its gradient is zero.
    real = init_params(LM(cfg), jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    tx = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=1.0, clip_norm=0.0), no_decay=NO_DECAY_PARAMS)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, real), tx.init(real), real)
    for (path, u), p, decays in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree_util.tree_leaves(real),
                                    jax.tree_util.tree_leaves(mask)):
        moved = bool(jnp.any(u != 0))
        assert moved == (decays and bool(jnp.any(p != 0))), jax.tree_util.keystr(path)
