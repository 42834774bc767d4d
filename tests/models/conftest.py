"""Shared check of the LM's recurrent-mixer contract (``mixer(x, positions, segment_ids, state) -> (y, state)``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.xla_options import FAST_COMPILE


def _mixer_contract(module, *, batch: int, length: int, d_model: int, split: int, prefill: int, tol: float) -> dict:
    """One compiled program runs ``module`` every way the LM does: the full forward (no state), the decode
    (``prefill`` tokens, then one token at a time from ``init_state``), the two documents ``[:split]`` and
    ``[split:]`` alone, the packed row of both, and the Jacobian of the packed row's outputs. Asserts decode ==
    full forward and packed == documents (within ``tol``), and that output t depends on input s exactly when
    s <= t in the same document. Returns the forms for the caller's own checks."""
    B, L = batch, length
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, L, d_model)), jnp.float32)
    seg = jnp.broadcast_to((jnp.arange(L) >= split).astype(jnp.int32), (B, L))
    params = module.init(jax.random.PRNGKey(0), x)

    def run(params, x):
        apply = lambda x, **kw: module.apply(params, x, **kw)  # noqa: E731
        full, none_state = apply(x)
        state = module.init_state(B, L, d_model)
        first, state = apply(x[:, :prefill], positions=jnp.broadcast_to(jnp.arange(prefill), (B, prefill)),
                             state=state)

        def step(carry, inputs):
            state, t = carry
            out, state = apply(inputs[:, None], positions=jnp.full((B, 1), t), state=state)
            return (state, t + 1), out[:, 0]

        (state, _), rest = jax.lax.scan(step, (state, prefill), jnp.swapaxes(x[:, prefill:], 0, 1))
        decoded = jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1)
        docs = jnp.concatenate([apply(x[:, :split])[0], apply(x[:, split:])[0]], axis=1)
        packed = apply(x, segment_ids=seg)[0]
        jac = jax.jacrev(lambda x: jnp.sum(apply(x, segment_ids=seg)[0], axis=(0, 2)))(x)  # [L(t), B, L(s), d]
        return dict(full=full, none_state=none_state, decoded=decoded, state=state, docs=docs, packed=packed,
                    sens=jnp.abs(jac).sum(axis=(1, 3)))

    forms = jax.jit(run, compiler_options=FAST_COMPILE)(params, x)
    assert forms["none_state"] is None  # a whole sequence without a state returns none
    np.testing.assert_allclose(forms["decoded"], forms["full"], rtol=tol, atol=tol, err_msg="decode != full forward")
    np.testing.assert_allclose(forms["packed"], forms["docs"], rtol=tol, atol=tol,
                               err_msg="packed row != documents run separately")
    t, s = np.arange(L)[:, None], np.arange(L)[None, :]
    visible = (s <= t) & ((t >= split) == (s >= split))
    sens = np.asarray(forms["sens"])
    assert np.all(sens[~visible] == 0), f"outputs depend on later tokens or other documents: {sens[~visible].max()}"
    assert np.all(sens[visible] > 0), "an earlier token of the document has no effect"
    return forms


@pytest.fixture
def mixer_contract():
    """:func:`_mixer_contract`: decode == forward, packed == separate, causal by gradients, in one program."""
    return _mixer_contract
