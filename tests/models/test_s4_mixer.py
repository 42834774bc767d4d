"""The S4 (DPLR) mixer: decode == full forward (convolution), packed row == documents run separately, causal by
gradients within a segment, HiPPO-LegS initialisation; the LM with mixer "s4" decodes as it runs forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.kernels.hippo import hippo_legs
from jaxlab.kernels.s4_dplr import hippo_legs_dplr
from jaxlab.models.lm import LM, LMConfig, init_params, make_mixer
from jaxlab.models.s4_mixer import S4, S4State
from jaxlab.xla_options import FAST_COMPILE

B, L, D_MODEL, SPLIT, PREFILL = 2, 11, 8, 5, 4


def _cfg(**kw):
    base = dict(vocab_size=16, d_model=D_MODEL, num_layers=1, num_heads=2, mixer="s4", d_state=8, max_len=32)
    base.update(kw)
    return LMConfig(**base)


def test_s4_mixer_decodes_packs_and_is_causal():
    module = make_mixer(_cfg())
    assert isinstance(module, S4)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, L, D_MODEL)), jnp.float32)
    seg = jnp.broadcast_to((jnp.arange(L) >= SPLIT).astype(jnp.int32), (B, L))
    params = module.init(jax.random.PRNGKey(0), x)

    def run(params, x):
        apply = lambda x, **kw: module.apply(params, x, **kw)  # noqa: E731
        full, none_state = apply(x)                                       # FFT convolution
        state = module.init_state(B, L, D_MODEL)
        first, state = apply(x[:, :PREFILL], positions=jnp.broadcast_to(jnp.arange(PREFILL), (B, PREFILL)),
                             state=state)

        def step(carry, inputs):
            state, t = carry
            out, state = apply(inputs[:, None], positions=jnp.full((B, 1), t), state=state)
            return (state, t + 1), out[:, 0]

        (state, _), rest = jax.lax.scan(step, (state, PREFILL), jnp.swapaxes(x[:, PREFILL:], 0, 1))
        decoded = jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1)
        docs = jnp.concatenate([apply(x[:, :SPLIT])[0], apply(x[:, SPLIT:])[0]], axis=1)
        packed = apply(x, segment_ids=seg)[0]
        jac = jax.jacrev(lambda x: jnp.sum(apply(x, segment_ids=seg)[0], axis=(0, 2)))(x)  # [L(t), B, L(s), d]
        return full, none_state, decoded, state, docs, packed, jnp.abs(jac).sum(axis=(1, 3))

    full, none_state, decoded, state, docs, packed, sens = jax.jit(run, compiler_options=FAST_COMPILE)(params, x)
    assert none_state is None and isinstance(state, S4State) and state.h.shape == (B, D_MODEL, 4)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(decoded, full, **tol, err_msg="decode (recurrence) != full forward (convolution)")
    np.testing.assert_allclose(packed, docs, **tol, err_msg="packed row != documents run separately")
    t, s = np.arange(L)[:, None], np.arange(L)[None, :]
    visible = (s <= t) & ((t >= SPLIT) == (s >= SPLIT))
    sens = np.asarray(sens)
    assert np.all(sens[~visible] == 0), f"outputs depend on later tokens or other documents: {sens[~visible].max()}"
    assert np.all(sens[visible] > 0), "an earlier token of the document has no effect"


def test_s4_mixer_starts_at_hippo_legs():
    params = jax.jit(S4(d_state=8).init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(0), jnp.ones((1, 3, 2)))["params"]
    cplx = lambda name: np.asarray(params[name][0, 1], np.float64) + 1j * np.asarray(params[name][1, 1])  # noqa: E731
    Lam = -np.exp(np.asarray(params["log_A_real"][1], np.float64)) + 1j * np.asarray(params["A_imag"][1])
    V = hippo_legs_dplr(8)[3]
    V_f = np.concatenate([V, V.conj()], axis=1)                                     # back to the LegS basis
    p, b = V_f @ np.concatenate([cplx("P"), cplx("P").conj()]), V_f @ np.concatenate([cplx("B"), cplx("B").conj()])
    A = V_f @ np.diag(np.concatenate([Lam, Lam.conj()])) @ V_f.conj().T - np.outer(p, p.conj())
    A_legs, b_legs = (np.asarray(x, np.float64) for x in hippo_legs(8))
    np.testing.assert_allclose(A, A_legs, atol=1e-5)
    np.testing.assert_allclose(b, b_legs, atol=1e-5)


def test_lm_with_s4_decodes_like_its_forward():
    cfg = _cfg(num_layers=2)
    model = LM(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 16, (B, L)), jnp.int32)
    params = init_params(model, jax.random.PRNGKey(0), tokens)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(params):
        logits, _ = model.apply({"params": params}, tokens)
        apply = functools.partial(model.apply, {"params": params}, method=LM.decode)
        first, cache = apply(tokens[:, :PREFILL], model.init_cache(B, L))

        def step(cache, tok):
            out, cache = apply(tok[:, None], cache)
            return cache, out[:, 0]

        _, rest = jax.lax.scan(step, cache, tokens[:, PREFILL:].T)
        return logits, jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1)

    logits, decoded = run(params)
    np.testing.assert_allclose(decoded, logits, rtol=1e-4, atol=1e-4)
