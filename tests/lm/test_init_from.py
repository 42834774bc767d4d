"""``jaxlab train lm --init-from PATH``: continued training from a Hugging Face checkpoint folder.

A tiny random Llama saved by ``transformers`` with a byte-level BPE tokenizer trained here: the first step's
loss is the checkpoint's own loss on the first batch (the run starts from its weights, through its
tokenizer), training moves the weights, and OUT/hf holds the trained weights in the same format.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxlab.models.corpus import PackedIterator, decode, load_corpus  # noqa: E402
from jaxlab.models.lm_training import LMTrainConfig, from_pretrained, make_loss_fn, train_lm  # noqa: E402

TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "for i in range(10):\n    print(i * i)\n", "import os\nprint(os.getcwd())\n",
        "while True:\n    break\n", "with open('f') as f:\n    data = f.read()\n"] * 3


def _checkpoint(folder):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    transformers.set_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    ckpt = _checkpoint(root / "ckpt")
    data = root / "data"
    data.mkdir()
    for i, text in enumerate(TEXT):
        (data / f"doc{i}.py").write_text(text)
    cfg = LMTrainConfig(init_from=str(ckpt), data=str(data), steps=4, batch_size=2, seq_len=32, lr=1e-2,
                        warmup_steps=0, eval_every=4, eval_batches=1, sample_every=4, sample_tokens=4,
                        sample_prompt="def", log_every=1, checkpoint_every=4, progress=False, val_fraction=0.2,
                        mesh="data=1")
    summary = train_lm(cfg, root / "out")
    return cfg, ckpt, root / "out", summary


def test_first_step_loss_is_the_checkpoints_and_weights_train(run):
    cfg, ckpt, out, summary = run
    model, params, tokenizer = from_pretrained(cfg)
    corpus = load_corpus(cfg.data, val_fraction=cfg.val_fraction)
    docs = [np.asarray(tokenizer.encode(decode(d)), np.int32) for d in corpus.train]
    batch = next(PackedIterator(docs, cfg.batch_size, cfg.seq_len, seed=cfg.seed))
    loss, _ = make_loss_fn(model)(params, batch, jax.random.PRNGKey(0))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in lines if r["step"] == 1)
    np.testing.assert_allclose(first["cross_entropy"], float(loss), rtol=1e-5)
    assert summary["step"] == 4 and np.isfinite(summary["val_bpb"])
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[-1]["text"].startswith("def")


def test_trained_weights_are_exported_in_the_checkpoints_format(run):
    _, ckpt, out, summary = run
    assert summary["exported"] == str(out / "hf")
    before = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    after = transformers.AutoModelForCausalLM.from_pretrained(out / "hf")
    assert type(after).__name__ == "LlamaForCausalLM"
    w0, w1 = (m.model.layers[0].mlp.up_proj.weight.detach().numpy() for m in (before, after))
    assert w0.shape == w1.shape and not np.allclose(w0, w1)  # trained, in the same layout
    assert (out / "hf" / "tokenizer.json").exists()


def test_init_from_rejects_architecture_flags_and_a_folder_without_tokenizer(run, tmp_path):
    _, ckpt, _, _ = run
    with pytest.raises(ValueError, match="d_model=64 cannot be set with init_from"):
        LMTrainConfig(init_from=str(ckpt), d_model=64)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ckpt.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json"):
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="no tokenizer.json"):
        from_pretrained(LMTrainConfig(init_from=str(bare)))
