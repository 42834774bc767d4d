"""Logical axis names of the LM: every parameter's names (``param_logical_axes``), the scanned ``layers`` axis,
activation constraints that are no-ops without rules, and Megatron tensor parallelism from the rules on a
``data=2, model=4`` mesh: the same logits as one device, one all-reduce after each attention and each MLP."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlab.models.attention import Attention
from jaxlab.models.layers import FeedForward
from jaxlab.models.lm import LM, LMConfig, init_params, param_logical_axes
from jaxlab.parallel.collectives import count_collectives
from jaxlab.xla_options import FAST_COMPILE

RULES = (("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "model"))
# GQA (8 query heads, 4 key/value heads), QK-norm, an untied head: every named parameter kind of the LM.
CFG = LMConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=8, num_kv_heads=4, qk_norm=True,
               tie_embeddings=False, max_len=8, attention_impl="xla")
BLOCK = {
    "mixer_norm/scale": P("embed"),
    "mixer/query/kernel": P("embed", "heads", "head_dim"),
    "mixer/key/kernel": P("embed", "kv_heads", "head_dim"),
    "mixer/value/kernel": P("embed", "kv_heads", "head_dim"),
    "mixer/query_norm/scale": P("head_dim"),
    "mixer/key_norm/scale": P("head_dim"),
    "mixer/out/kernel": P("heads", "head_dim", "embed"),
    "ffn_norm/scale": P("embed"),
    "ffn/gate/kernel": P("embed", "mlp"),
    "ffn/up/kernel": P("embed", "mlp"),
    "ffn/down/kernel": P("mlp", "embed"),
}


def _is_spec(x):
    return isinstance(x, P)


def _by_path(tree):
    """{"a/b/c": leaf} of a nested dict of PartitionSpecs."""
    return {"/".join(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_spec)}


def _shapes(module, *args):
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"]


def test_every_parameter_has_its_logical_axes():
    want = {"embed/embedding": P("vocab", "embed"), "final_norm/scale": P("embed"), "head/kernel": P("embed", "vocab")}
    want.update({f"block_{i}/{name}": spec for i in range(CFG.num_layers) for name, spec in BLOCK.items()})
    assert _by_path(param_logical_axes(LM(CFG))) == want

    scanned = LMConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=8, num_kv_heads=4, scan_layers=True,
                       remat="full", max_len=8)
    want = {"embed/embedding": P("vocab", "embed"), "final_norm/scale": P("embed")}
    want.update({f"blocks/block_0/{name}": P("layers", *spec) for name, spec in BLOCK.items()
                 if name not in ("mixer/query_norm/scale", "mixer/key_norm/scale")})  # no QK-norm here
    assert _by_path(param_logical_axes(LM(scanned))) == want

    # The building blocks alone, biases included (the encoder-decoder uses them).
    ffn = nn.get_partition_spec(_shapes(FeedForward(16, "gelu", use_bias=True), jnp.zeros((2, 8))))
    assert _by_path(ffn) == {"up/kernel": P("embed", "mlp"), "up/bias": P("mlp"),
                             "down/kernel": P("mlp", "embed"), "down/bias": P("embed")}
    attn = nn.get_partition_spec(_shapes(Attention(4, use_bias=True, rope_base=None), jnp.zeros((1, 3, 8))))
    assert _by_path(attn) == {
        "query/kernel": P("embed", "heads", "head_dim"), "query/bias": P("heads", "head_dim"),
        "key/kernel": P("embed", "kv_heads", "head_dim"), "key/bias": P("kv_heads", "head_dim"),
        "value/kernel": P("embed", "kv_heads", "head_dim"), "value/bias": P("kv_heads", "head_dim"),
        "out/kernel": P("heads", "head_dim", "embed"), "out/bias": P("embed")}


def test_specs_match_the_plain_parameters():
    model = LM(LMConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=2, mixer_pattern=("mamba", "attention"),
                        scan_layers=True, max_len=8))
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), tokens))
    specs = param_logical_axes(model)
    assert jax.tree.structure(specs, is_leaf=_is_spec) == jax.tree.structure(params)
    for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=_is_spec), jax.tree.leaves(params)):
        assert isinstance(leaf, jax.ShapeDtypeStruct) and len(spec) in (0, leaf.ndim), (spec, leaf)
    # The Mamba mixer's parameters carry no names but the scanned stack's layer axis (replicated otherwise);
    # its norm and FFN around it are named.
    named = _by_path(specs)
    assert named["blocks/block_0/mixer/in_proj/kernel"] == P("layers", None, None)
    assert named["blocks/block_0/mixer/A_log"] == P("layers", *(None,) * (params["blocks"]["block_0"]["mixer"]["A_log"].ndim - 1))
    assert named["blocks/block_0/ffn/up/kernel"] == P("layers", "embed", "mlp")


def _forward(model):
    return lambda p, t: model.apply({"params": p}, t)[0]


def test_activation_constraints_need_a_mesh_and_rules():
    model = LM(CFG)
    tokens = jnp.zeros((4, 8), jnp.int32)
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), tokens))
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def constraints():
        return str(jax.make_jaxpr(_forward(model))(params, tokens)).count("sharding_constraint")

    assert constraints() == 0
    with nn.logical_axis_rules(RULES):
        assert constraints() == 0  # rules without a mesh
    with jax.set_mesh(mesh):
        assert constraints() == 0  # a mesh without rules
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        # per block: 5 residual, q, k, v, per-head output, MLP hidden; the embedded tokens, the final norm, logits
        assert constraints() == CFG.num_layers * 10 + 3


@pytest.mark.parametrize("scan_layers", [False, True])
def test_tensor_parallel_forward_matches_one_device_with_one_allreduce_per_attention_and_mlp(scan_layers):
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers, remat="full" if scan_layers else "none")
    model = LM(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 8), 0, cfg.vocab_size)
    params = init_params(model, jax.random.PRNGKey(1), tokens)
    want = jax.jit(_forward(model), compiler_options=FAST_COMPILE)(params, tokens)

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shardings = nn.logical_to_mesh_sharding(param_logical_axes(model), mesh, RULES)
    block, stacked = (shardings["blocks"]["block_0"], (None,)) if scan_layers else (shardings["block_0"], ())
    assert block["mixer"]["query"]["kernel"].spec == P(*stacked, None, "model", None)
    assert block["ffn"]["down"]["kernel"].spec == P(*stacked, "model", None)
    sharded = jax.device_put(params, shardings)
    rows = jax.device_put(tokens, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        created = init_params(model, jax.random.PRNGKey(1), tokens)
        compiled = jax.jit(_forward(model)).lower(sharded, rows).compile(FAST_COMPILE)
        got = compiled(sharded, rows)
    for new, placed in zip(jax.tree.leaves(created), jax.tree.leaves(sharded), strict=True):  # created sharded
        np.testing.assert_array_equal(new, placed)
        assert new.sharding.is_equivalent_to(placed.sharding, new.ndim), (new.sharding, placed.sharding)
    assert got.sharding.spec == P("data", None, "model")  # batch on data, the vocabulary on model
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # Megatron: column- then row-parallel, so the forward all-reduces once after each attention output
    # projection and once after each MLP down projection, plus once for the vocabulary-parallel embedding
    # lookup (each device gathers the rows of its vocabulary shard). Nothing else communicates. The scanned
    # stack holds one block, run num_layers times by the loop.
    hlo = compiled.as_text()
    blocks = ["blocks/block_0"] if scan_layers else [f"block_{i}" for i in range(cfg.num_layers)]
    where = ["embed/"] + [f"{b}/{part}/" for b in blocks for part in ("mixer/out", "ffn/down")]
    counts = count_collectives(hlo)
    assert counts["all-reduce"] == len(where) and sum(counts.values()) == len(where), counts
    names = ["/" + re.search(r'op_name="[^"]*?LM\._run/([^"]*)"', line).group(1)
             for line in hlo.splitlines() if " all-reduce(" in line]
    assert sorted(w for w in where for name in names if f"/{w}" in name) == sorted(where), names


def test_init_params_equals_model_init_bitwise():
    """The same numbers as ``model.init`` (a faster-compiling init changed the normal sampler's last bit, and
    with it every training run that starts there)."""
    model = LM(LMConfig(vocab_size=16, d_model=64, num_layers=2, num_heads=4, max_len=32))
    tokens, key = jnp.zeros((1, 8), jnp.int32), jax.random.PRNGKey(0)
    ours, flax_init = init_params(model, key, tokens), nn.unbox(jax.jit(model.init)(key, tokens))["params"]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_init)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
