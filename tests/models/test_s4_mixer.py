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


def test_s4_mixer_decodes_packs_and_is_causal(mixer_contract):
    """Decode (the O(N) recurrence) == full forward (the FFT convolution), packed == separate, causal."""
    module = make_mixer(_cfg())
    assert isinstance(module, S4)
    forms = mixer_contract(module, batch=B, length=L, d_model=D_MODEL, split=SPLIT, prefill=PREFILL, tol=1e-4)
    assert isinstance(forms["state"], S4State) and forms["state"].h.shape == (B, D_MODEL, 4)


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
