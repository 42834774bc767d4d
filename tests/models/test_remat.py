"""Remat policies: identical gradients under every policy, less temporary memory with checkpointing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models.lm import LM, LMConfig, init_params, lm_loss
from jaxlab.models.remat import CHECKPOINT_NAMES, remat_policy, validate_remat
from jaxlab.xla_options import FAST_COMPILE

POLICIES = ("none", "full", "dots", ("context", "ffn_out"), "offload")


def _compiled_grad(remat, tokens):
    cfg = LMConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=2, max_len=64, attention_impl="xla",
                   d_ff=128, remat=remat)
    model = LM(cfg)
    grad = jax.jit(jax.grad(lambda p, t: lm_loss(model, p, t)[0]), compiler_options=FAST_COMPILE)
    return model, grad.lower(jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), tokens)), tokens).compile()


def test_policies_give_identical_gradients_and_save_memory():
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 64), 0, 32)
    model, _ = _compiled_grad("none", tokens)
    params = init_params(model, jax.random.PRNGKey(0), tokens)
    grads, temp = {}, {}
    for remat in POLICIES:
        _, compiled = _compiled_grad(remat, tokens)
        grads[remat] = compiled(params, tokens)
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    for remat in POLICIES[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads["none"],
                     grads[remat])
    # storing nothing inside a block needs the least temporary memory, storing everything the most
    assert temp["full"] < temp["none"], temp
    assert temp["full"] <= temp[("context", "ffn_out")] < temp["none"], temp


def test_validate_and_policy():
    assert remat_policy("none") is None
    for name in ("full", "dots", "offload", CHECKPOINT_NAMES[:2]):
        assert callable(remat_policy(name))
    for bad, match in (("some", "remat='some'"), ((), "non-empty"), (("query_proj", "nope"), "nope"),
                       (["context"], "tuple")):
        with pytest.raises(ValueError, match=match):
            validate_remat(bad)
