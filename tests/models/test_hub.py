"""Hugging Face checkpoints through ``jaxlab.models.hub``: tiny random Llama (llama3 rope scaling, a head dim
other than d_model / heads), Qwen2 (tied and untied), Mistral (a sliding window shorter than the sequence)
and GPT-2 models built with ``transformers`` and saved to a temporary folder (nothing is downloaded). For each:
logits, loss and gradients equal torch's on a right-padded batch, greedy generation gives the same tokens,
save -> load is bit-exact through sharded safetensors and loads back into transformers."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlab.models.hub import load_pretrained, save_pretrained  # noqa: E402
from jaxlab.models.hub.weights import tensor_maps  # noqa: E402
from jaxlab.models.lm import next_token_loss  # noqa: E402
from jaxlab.models.sampling import sample  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    # head_dim 32 != 64 / 4; llama3 rope scaling with a short original context so every band is exercised
    "llama": lambda: transformers.LlamaConfig(**SMALL, head_dim=32, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=4),  # window < sequence length
    "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=1, eos_token_id=2),
}
B, L, PAD_FROM = 2, 12, 7  # row 1 is right-padded after 7 tokens


def _hf_model(config, seed=0):
    """A transformers model with every weight random (norm scales near 1): biases and norms matter."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    """(arch, transformers model, folder it was saved to)."""
    hf = _hf_model(ARCHS[request.param]())
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, size=(B, L)).astype(np.int64)
    mask = np.ones((B, L), np.int64)
    mask[1, PAD_FROM:] = 0
    tokens[1, PAD_FROM:] = 0
    return tokens, mask


def _torch_loss_and_logits(hf, tokens, mask):
    labels = torch.tensor(np.where(mask == 1, tokens, -100))
    out = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), labels=labels)
    return out.loss, out.logits


def _jax_loss(model, params, tokens, mask):
    logits, _ = model.apply({"params": params}, tokens)
    loss, _ = next_token_loss(logits[:, :-1], tokens[:, 1:], mask[:, 1:])
    return loss, logits


def test_logits_loss_and_gradients_match_transformers(checkpoint):
    arch, hf, folder = checkpoint
    model, params, tokenizer = load_pretrained(folder)
    assert tokenizer is None and jax.tree.leaves(params)[0].dtype == jnp.float32
    tokens, mask = _batch()
    (loss, logits), grads = jax.jit(jax.value_and_grad(lambda p: _jax_loss(model, p, tokens, mask), has_aux=True))(
        params)
    hf.zero_grad()
    t_loss, t_logits = _torch_loss_and_logits(hf, tokens, mask)
    t_loss.backward()
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[keep], t_logits.detach().numpy()[keep], atol=1e-4, rtol=0)
    np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5)
    torch_grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    maps = {m.name: m for m in tensor_maps(model.cfg, hf.config.architectures[0])}
    for name in [next(iter(maps)), *(n for n in maps if n.endswith(("q_proj.weight", "c_attn.weight")))][:2]:
        m = maps[name]
        ours = m.from_params(*(np.asarray(_get(grads, p)) for p in m.params))
        theirs = torch_grads[name]
        assert np.linalg.norm(ours - theirs) <= 1e-4 * np.linalg.norm(theirs), name


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_greedy_generation_matches_transformers(checkpoint):
    arch, hf, folder = checkpoint
    model, params, _ = load_pretrained(folder)
    prompts = np.random.default_rng(1).integers(3, 128, size=(B, 5))
    out = sample(model, params, jnp.asarray(prompts, jnp.int32), jax.random.key(0), 16, temperature=0.0)
    want = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                       do_sample=False, max_new_tokens=16, min_new_tokens=16, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), want.numpy())


def test_save_load_round_trip_is_bit_exact_and_transformers_loads_it(checkpoint, tmp_path):
    arch, hf, folder = checkpoint
    model, params, _ = load_pretrained(folder)
    files = save_pretrained(model, params, tmp_path, max_shard_bytes=40_000)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == hf.config.architectures
    model2, params2, _ = load_pretrained(tmp_path)
    assert model2.cfg == model.cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    want = hf.state_dict()
    got = reloaded.state_dict()
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def _logits_match(hf, model, params):
    tokens, mask = _batch()
    logits, _ = jax.jit(model.apply)({"params": params}, tokens)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[keep], want[keep], atol=1e-4, rtol=0)


def test_qwen2_untied_head(tmp_path):
    hf = _hf_model(transformers.Qwen2Config(**SMALL, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path)
    model, params, _ = load_pretrained(tmp_path)
    assert not model.cfg.tie_embeddings and model.cfg.qkv_bias and not model.cfg.attn_out_bias
    np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]), hf.lm_head.weight.detach().numpy().T)
    _logits_match(hf, model, params)


def test_scan_layers_and_mesh_placement(tmp_path):
    """The stacked layout of scan_layers, each parameter placed on its NamedSharding of a data x model mesh by
    the default rules (mesh= alone)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxlab.parallel.rules import rules_for_mesh

    hf = _hf_model(ARCHS["qwen2"]())
    hf.save_pretrained(tmp_path)
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model, params, _ = load_pretrained(tmp_path, scan_layers=True, mesh=mesh)  # the repository's rule table
    assert model.cfg.scan_layers
    query = params["blocks"]["block_0"]["mixer"]["query"]["kernel"]
    assert query.shape == (2, 64, 4, 16)  # [layers, d, Hq, D]
    assert query.sharding == NamedSharding(mesh, P(None, None, "model", None))
    assert params["embed"]["embedding"].sharding == NamedSharding(mesh, P("model", None))
    np.testing.assert_array_equal(np.asarray(query[1]).reshape(64, 64).T,
                                  hf.model.layers[1].self_attn.q_proj.weight.detach().numpy())
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for_mesh(mesh)):
        _logits_match(hf, model, params)


def test_new_parameters_have_logical_axes_and_configs_validate():
    """Biases, LayerNorm offsets and the learned position table carry logical names (so meshes shard them);
    the new LMConfig fields reject bad values naming the field."""
    from jax.sharding import PartitionSpec as P

    from jaxlab.models.layers import RopeScaling
    from jaxlab.models.lm import LM, LMConfig, param_logical_axes
    from jaxlab.parallel.rules import logical_to_mesh_specs

    cfg = LMConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, max_len=8, norm="layer", ffn="gelu_tanh",
                   position_embedding="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True)
    axes = param_logical_axes(LM(cfg))
    block = axes["block_0"]
    assert axes["pos_embed"]["embedding"] == P(None, "embed") and axes["final_norm"]["bias"] == P("embed")
    assert block["mixer"]["query"]["bias"] == P("heads", "head_dim")
    assert block["mixer"]["key"]["bias"] == P("kv_heads", "head_dim")
    assert block["mixer"]["out"]["bias"] == P("embed") and block["ffn"]["up"]["bias"] == P("mlp")
    assert block["mixer_norm"]["bias"] == block["ffn"]["down"]["bias"] == P("embed")
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = logical_to_mesh_specs(axes, mesh)
    assert specs["block_0"]["mixer"]["query"]["bias"] == P("model", None)
    assert all(len(s) for s in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, P)))
    for field, value in (("position_embedding", "alibi"), ("norm", "batch"), ("d_head", 0)):
        with pytest.raises(ValueError, match=field):
            LMConfig(**{field: value})
    with pytest.raises(ValueError, match="high_freq_factor"):
        RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match="mlp_bias"):
        LMConfig(ffn="moe", mlp_bias=True)
