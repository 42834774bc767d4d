"""``jaxlab.models.hub`` files: bf16 checkpoints, clear errors for broken folders, the tokenizer and its chat
template against ``transformers``, and `jaxlab generate`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxlab.models.hub import HFTokenizer, load_pretrained, save_pretrained  # noqa: E402
from jaxlab.models.lm import LM, LMConfig  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32)


@pytest.fixture
def llama(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    hf.save_pretrained(tmp_path)
    return hf, tmp_path


def _bits(x):
    return np.asarray(x).view(np.uint16)


def test_bf16_checkpoint_loads_in_bf16_and_round_trips(llama, tmp_path_factory):
    hf, _ = llama
    folder = tmp_path_factory.mktemp("bf16")
    hf.to(torch.bfloat16).save_pretrained(folder)
    model, params, _ = load_pretrained(folder)
    assert model.cfg.param_dtype == model.cfg.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    torch_q = hf.model.layers[0].self_attn.q_proj.weight.detach()
    np.testing.assert_array_equal(_bits(params["block_0"]["mixer"]["query"]["kernel"]).reshape(32, 32).T,
                                  torch_q.view(torch.int16).numpy().view(np.uint16))
    _, params32, _ = load_pretrained(folder, dtype="float32")  # dtype casts
    assert params32["embed"]["embedding"].dtype == jnp.float32
    np.testing.assert_array_equal(params32["embed"]["embedding"],
                                  hf.model.embed_tokens.weight.detach().float().numpy())
    out = tmp_path_factory.mktemp("bf16_out")
    save_pretrained(model, params, out)
    _, again, _ = load_pretrained(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)), params, again)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, torch_q)


def _rewrite_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_unknown_architecture_and_missing_config(llama, tmp_path_factory):
    _, folder = llama
    _rewrite_config(folder, architectures=["BertForMaskedLM"])
    with pytest.raises(ValueError, match="BertForMaskedLM.*not supported"):
        load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path_factory.mktemp("empty"))


def test_corrupt_truncated_and_missing_weights(llama):
    _, folder = llama
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_pretrained(folder)
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")  # a header that is not JSON
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_pretrained(folder)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_pretrained(folder)


def test_each_header_is_parsed_once_and_checked(llama, tmp_path_factory, monkeypatch):
    """Loading a sharded folder parses every file's header exactly once (shapes, dtypes and offsets all come from
    that parse), and a header whose offsets disagree with its shapes or the file's length is a clear error."""
    import struct

    from jaxlab.models.hub import safetensors_io

    hf, _ = llama
    folder = tmp_path_factory.mktemp("sharded_once")
    hf.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    parsed = []
    real_loads = json.loads

    def counting_loads(text, *args, **kwargs):
        if isinstance(text, bytes):  # a safetensors header (the index and config.json are read as str)
            parsed.append(text[:16])
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(safetensors_io.json, "loads", counting_loads)
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("a second parse by safe_open"))
    _, params, _ = load_pretrained(folder)
    assert len(parsed) == len(shards) > 1
    np.testing.assert_array_equal(params["final_norm"]["scale"], hf.model.norm.weight.detach().numpy())
    monkeypatch.undo()

    path = folder / shards[0]
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    lo, hi = header[name]["data_offsets"]
    header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]  # more elements than bytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(ValueError, match=f"{shards[0]}: not a readable safetensors file .*'{name}'.*spans {hi - lo} "
                                         "bytes"):
        load_pretrained(folder)
    path.write_bytes(data + b"\0" * 8)  # bytes past the last tensor
    with pytest.raises(ValueError, match=f"{shards[0]}: not a readable safetensors file .*truncated or padded"):
        load_pretrained(folder)


def test_missing_unexpected_and_misshapen_tensors(llama):
    _, folder = llama
    path = folder / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.0.mlp.up_proj.weight"}
    safetensors.numpy.save_file(missing, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks tensors \['model.layers.0.mlp.up_proj.weight'\]"):
        load_pretrained(folder)
    safetensors.numpy.save_file({**tensors, "model.layers.0.extra.weight": np.zeros(3, np.float32)}, path,
                                metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.extra.weight'\]"):
        load_pretrained(folder)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    _rewrite_config(folder, intermediate_size=48)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                                        r"\(64, 32\).*expects \(48, 32\)"):
        load_pretrained(folder)


def test_missing_shard_and_bad_index(llama, tmp_path_factory):
    hf, _ = llama
    folder = tmp_path_factory.mktemp("sharded")
    hf.save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    model, params, _ = load_pretrained(folder)  # transformers' own sharding reads
    np.testing.assert_array_equal(params["final_norm"]["scale"], hf.model.norm.weight.detach().numpy())
    last = (folder / shards[-1]).read_bytes()
    (folder / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard .*{shards[-1]} listed in .*index.json is missing"):
        load_pretrained(folder)
    (folder / shards[-1]).write_bytes(last)
    name = next(iter(index["weight_map"]))
    wrong = shards[0] if index["weight_map"][name] != shards[0] else shards[1]
    index["weight_map"][name] = wrong
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"lists tensor '{name}' in {wrong}, which does not hold it"):
        load_pretrained(folder)


def test_save_rejects_configs_without_a_hugging_face_layout(tmp_path):
    model = LM(LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, mixer="mamba"))
    with pytest.raises(ValueError, match="mixer='mamba'.*no Hugging Face architecture"):
        save_pretrained(model, {}, tmp_path)
    model = LM(LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, ffn="gelu"))
    with pytest.raises(ValueError, match=r"\{'ffn': 'gelu'\} cannot be written as LlamaForCausalLM"):
        save_pretrained(model, {}, tmp_path)


# ---- tokenizer -------------------------------------------------------------------------------------------
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} "
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer_folder(folder, chat_template=CHAT):
    from tokenizers import models, pre_tokenizers, processors

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "hello", "world", "how", "are", "you"]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_tokenizer_matches_transformers_and_renders_the_chat_template(llama):
    hf, folder = llama
    _tokenizer_folder(folder)
    _, _, tok = load_pretrained(folder)
    want = transformers.AutoTokenizer.from_pretrained(folder)
    text = "hello world how are you"
    np.testing.assert_array_equal(tok.encode(text), want(text)["input_ids"])
    np.testing.assert_array_equal(tok.encode(text, add_special_tokens=False), want(text, add_special_tokens=False)
                                  ["input_ids"])
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == want.decode(want(text)["input_ids"],
                                                                                 skip_special_tokens=True)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (len(want), want.eos_token_id,
                                                                     want.pad_token_id, want.bos_token_id) \
        == (11, 2, 0, 1)
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "how are you"}]
    prompt = tok.apply_chat_template(messages)
    assert prompt == want.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|> hello world </s> <|assistant|> how are you </s> <|assistant|>"
    np.testing.assert_array_equal(tok.encode(prompt, add_special_tokens=False),
                                  want.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
                                  ["input_ids"])


def test_tokenizer_round_trip_and_absent_tokenizer(llama, tmp_path_factory):
    hf, folder = llama
    model, params, tok = load_pretrained(folder)
    assert tok is None  # no tokenizer.json
    _tokenizer_folder(folder, chat_template=None)
    model, params, tok = load_pretrained(folder)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])
    out = tmp_path_factory.mktemp("with_tokenizer")
    save_pretrained(model, params, out, tok)
    again = HFTokenizer.from_pretrained(out)
    assert (again.vocab_size, again.eos_id, again.pad_id) == (tok.vocab_size, tok.eos_id, tok.pad_id)
    np.testing.assert_array_equal(again.encode("hello you"), tok.encode("hello you"))
    assert isinstance(transformers.AutoTokenizer.from_pretrained(out), transformers.PreTrainedTokenizerBase)


def test_cli_generate_matches_transformers_greedy(tmp_path, capsys):
    """`jaxlab generate PATH --prompt ...` (greedy, KV cache) prints what transformers' greedy search gives."""
    from jaxlab.cli import main

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "vocab_size": 11},
                                                                initializer_range=0.5)).eval()
    folder = tmp_path
    hf.save_pretrained(folder)
    _tokenizer_folder(folder)
    assert main(["generate", str(folder), "--prompt", "hello world", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed  # random weights still give some text before any EOS
    want_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([want_tok("hello world")["input_ids"]])
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                       eos_token_id=want_tok.eos_token_id, pad_token_id=want_tok.pad_token_id)
    response = [t for t in want[0, ids.shape[1]:].tolist() if t not in (want_tok.eos_token_id, want_tok.pad_token_id)]
    assert printed == want_tok.decode(response, skip_special_tokens=True)
    assert main(["generate", str(folder / "nowhere"), "--prompt", "hello"]) == 2
    assert "config.json does not exist" in capsys.readouterr().err


def test_gpt2_base_model_names_and_old_buffers(tmp_path):
    """The original GPT-2 files name tensors without the ``transformer.`` prefix and store the causal-mask
    buffers ``h.{i}.attn.bias``: both load."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2,
                                                              n_positions=16)).eval()
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in safetensors.numpy.load_file(path).items()
               if k != "lm_head.weight"}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    _, params, _ = load_pretrained(tmp_path)
    np.testing.assert_array_equal(params["pos_embed"]["embedding"], hf.transformer.wpe.weight.detach().numpy())
    np.testing.assert_array_equal(params["block_0"]["mixer"]["value"]["bias"].reshape(-1),
                                  hf.transformer.h[0].attn.c_attn.bias.detach().numpy()[64:])
