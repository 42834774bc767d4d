"""``jaxlab train posttrain --init-from PATH``: post-training a Hugging Face checkpoint on the verifiable tasks.

A tiny random Llama (and GPT-2, for SFT's loss) saved by ``transformers`` with a byte-level BPE tokenizer trained here on arithmetic text
(so it merges digit pairs: the canonical encoding of a problem differs from its one-character pieces). The
task's prompts and answers are rendered through that tokenizer and verified on the decoded text; SFT's loss is
the checkpoint's own (by ``torch``) on the answer tokens; a GRPO run from the checkpoint through the CLI samples
its first step from the checkpoint's weights (the logged log-probabilities equal ``torch``'s on the same
rollout), and OUT/hf loads back in ``transformers`` with the trained weights.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxlab.cli import main as cli_main  # noqa: E402
from jaxlab.models.hub import HFTokenizer, load_pretrained  # noqa: E402
from jaxlab.models.sampling import sample  # noqa: E402
from jaxlab.rl.llm import posttrain as pt  # noqa: E402
from jaxlab.rl.llm.posttrain import PostTrainConfig, ProblemIterator  # noqa: E402
from jaxlab.rl.llm.task import TextTask  # noqa: E402
from jaxlab.train_state import create_train_state  # noqa: E402

CHAT = ("{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }} {{ eos_token }} "
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = [f"{a:02d}+{b:02d}={a + b}" for a in range(0, 100, 7) for b in range(0, 100, 11)]


def _tokenizer(folder):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    # special ids apart from the character task's PAD, BOS, EOS (0, 1, 2): a constant of that task used by
    # mistake shows
    specials = ["<|user|>", "<|assistant|>", "<unk>", "<pad>", "<s>", "</s>"]
    # a small vocabulary (the characters of the problems and templates, "Ġ" being ByteLevel's space, and a few
    # merges), so that a random model ends some responses with EOS: GRPO's groups then differ in length
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=32, special_tokens=specials,
                                             initial_alphabet=list("0123456789+=Ġ"))
    tok.train_from_iterator(TEXT, trainer)
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 4)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "<pad>", "chat_template": CHAT}))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub_ckpt")
    vocab = _tokenizer(folder)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=False, initializer_range=0.1)
    transformers.set_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(folder)
    return folder, hf


def _torch_logprobs(hf, tokens, prompt_len):
    """log p(tokens[:, t] | tokens[:, :t]) of the response positions t >= prompt_len, by transformers: [B, R]."""
    with torch.no_grad():
        logits = hf(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.double()
    logp = torch.log_softmax(logits, -1)[:, prompt_len - 1:-1]
    target = torch.tensor(np.asarray(tokens)[:, prompt_len:], dtype=torch.long)
    return torch.gather(logp, -1, target[..., None])[..., 0].numpy()


def test_prompts_answers_and_the_text_verifier(ckpt):
    folder, _ = ckpt
    tok = HFTokenizer.from_pretrained(folder)
    bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
    assert (bos, eos, pad) == (4, 5, 3)
    assert len(tok.encode("00+11=", add_special_tokens=False)) == 4  # the tokenizer merges digits: "00", "11"
    task = TextTask("add", 2, tok)
    piece = lambda c: int(tok.encode(c, add_special_tokens=False)[0])  # noqa: E731
    np.testing.assert_array_equal(task.encode_prompt("07+35="), [bos] + [piece(c) for c in "07+35="])
    assert (task.prompt_len, task.answer_len, task.eos_id, task.pad_id) == (7, 4, eos, pad)
    np.testing.assert_array_equal(task.encode_answer("42"), [piece("4"), piece("2"), eos, pad])

    prompts, answers = jax.jit(lambda k: task.sample(k, 16))(jax.random.PRNGKey(0))  # [16, 7], [16, 4]
    assert prompts.shape == (16, 7) and answers.shape == (16, 4)
    for p, a in zip(np.asarray(prompts), np.asarray(answers)):
        text = tok.decode(p, skip_special_tokens=True)  # "07+35="
        x, y = text[:-1].split("+")
        assert len(x) == len(y) == 2 and p[0] == bos
        np.testing.assert_array_equal(p, task.encode_prompt(text))
        np.testing.assert_array_equal(a, task.encode_answer(str(int(x) + int(y))))  # SFT targets: answer, EOS

    chat = TextTask("add", 2, tok, prompt_format="chat")
    assert tok.decode(chat.encode_prompt("07+35=")) == tok.apply_chat_template([{"role": "user",
                                                                                 "content": "07+35="}])
    assert chat.prompt_len == len(chat.encode_prompt("07+35="))

    # The verifier reads the decoded text before the first EOS: the merged token "44" is as right as "4", "4".
    answer = task.encode_answer("44")[None]
    merged = [int(t) for t in tok.encode("44", add_special_tokens=False)]
    four, three = piece("4"), piece("3")
    assert len(merged) == 1 and merged != [four]
    rows = {"pieces": [four, four, eos, pad, pad], "merged": [*merged, eos, pad, pad, pad],
            "wrong": [four, three, eos, pad, pad], "leading zero": [piece("0"), four, four, eos, pad],
            "unterminated": [four, four, four, four, four], "not digits": [four, piece("+"), eos, pad, pad]}
    response = jnp.asarray(list(rows.values()), jnp.int32)  # [6, 5]
    answers = jnp.repeat(answer, len(rows), axis=0)
    np.testing.assert_array_equal(jax.jit(task.is_correct)(response, answers), [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(jax.jit(task.format_ok)(response), [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(task.rewards(response, answers, 0.5), [1.5, 1.5, 0.5, 0.5, 0, 0])
    np.testing.assert_array_equal(task.response_lengths(response), [3, 2, 3, 4, 5, 3])
    cut = jnp.asarray([[four, four]], jnp.int32)  # the right digits, but the budget ran out before EOS
    assert float(task.is_correct(cut, answer)[0]) == float(task.format_ok(cut)[0]) == 0.0


def test_a_tokenizer_that_cannot_render_the_problems_is_an_error():
    from tokenizers import models, pre_tokenizers

    chars = ["<pad>", "</s>", *"0123456789+="]
    tok = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    words = HFTokenizer(tok, {"eos_token": "</s>", "pad_token": "<pad>"})  # WordLevel decodes with spaces
    with pytest.raises(ValueError, match="cannot render the problems one character at a time"):
        TextTask("add", 2, words)
    with pytest.raises(ValueError, match="names no eos_token"):
        TextTask("add", 2, HFTokenizer(tok, {}))


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub_gpt2")
    vocab = _tokenizer(folder)
    transformers.set_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2,
                                                              n_positions=32)).eval()
    hf.save_pretrained(folder)
    return folder, hf


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sft_step_loss_is_the_checkpoints_own_nll_of_the_answer(arch, request):
    folder, hf = request.getfixturevalue("ckpt" if arch == "llama" else "gpt2_ckpt")
    model, params, tok = load_pretrained(folder, dtype="float32")
    task = TextTask("add", 2, tok)
    prompts, answers = task.sample(jax.random.PRNGKey(1), 16)
    # the SFT stage's own step (posttrain's builder): its loss is taken before the update
    opt = pt.stage_optimizer_config(1e-3)
    step = pt._jit_step("sft", model.cfg, task, None, opt)
    state = create_train_state(params, pt._optimizer("sft", model.cfg, opt), jax.random.PRNGKey(0))
    _, metrics = step(state, {"prompts": prompts, "answers": answers}, jax.random.PRNGKey(0))
    loss = metrics["loss"]
    tokens = np.concatenate([prompts, answers], axis=1)
    logp = _torch_logprobs(hf, tokens, task.prompt_len)  # [16, Ra]
    mask = np.asarray(task.response_mask(answers))  # the answer's digits and its EOS
    assert 0 < mask.mean() < 1  # some answers are shorter than others: padding after their EOS
    np.testing.assert_allclose(float(loss), -(logp * mask).sum() / mask.sum(), rtol=1e-5)


def test_init_from_rejects_architecture_flags(ckpt, tmp_path, capsys):
    folder, _ = ckpt
    with pytest.raises(ValueError, match="num_layers=3 cannot be set with init_from"):
        PostTrainConfig(init_from=str(folder), num_layers=3)
    with pytest.raises(ValueError, match="prompt_format='chat' needs init_from"):
        PostTrainConfig(prompt_format="chat")
    assert cli_main(["train", "posttrain", "--init-from", str(folder), "--d-model", "32", "--out",
                     str(tmp_path)]) == 2
    assert "d_model=32 cannot be set with init_from" in capsys.readouterr().err


@pytest.fixture(scope="module")
def grpo_run(ckpt, tmp_path_factory):
    folder, _ = ckpt
    out = tmp_path_factory.mktemp("grpo_hub")
    args = ["--method", "grpo", "--init-from", str(folder), "--task", "add", "--num-digits", "1", "--sft-steps", "0",
            "--steps", "2", "--batch-size", "2", "--group-size", "4", "--lr", "0.01", "--length-penalty", "0.5",
            "--eval-problems", "8", "--eval-every", "2", "--log-every", "1", "--checkpoint-every", "2",
            "--no-progress", "--mesh", "data=1", "--fast-compile", "--out", str(out)]
    assert cli_main(["train", "posttrain", *args]) == 0
    return out, json.loads((out / "summary-grpo.json").read_text())


def test_grpo_from_the_checkpoint_samples_its_weights_and_exports_hf(ckpt, grpo_run):
    folder, hf = ckpt
    out, summary = grpo_run
    assert summary["exported"] == str(out / "hf")
    records = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["step"] == 1 and "entropy_proxy" in r)

    # Step 1's rollout again, from the checkpoint as load_pretrained reads it: the run's logged mean
    # log-probability of its samples is transformers' on the same tokens.
    cfg = PostTrainConfig(init_from=str(folder), task="add", num_digits=1, batch_size=2, group_size=4)
    model, params, tok = load_pretrained(folder, dtype="float32")
    task = TextTask("add", 1, tok)
    stream = lambda s: jax.random.fold_in(jax.random.PRNGKey(cfg.seed), s)  # noqa: E731
    prompts = next(ProblemIterator(task, cfg.batch_size, stream(pt._RL_DATA)))["prompts"]
    key = jax.random.fold_in(stream(pt._RL_KEY), 0)  # step_key at step 0
    roll = sample(model, params, jnp.repeat(prompts, cfg.group_size, axis=0), key, cfg.response_len_for(task),
                  eos_id=task.eos_id, pad_id=task.pad_id)
    mask = np.asarray(roll.mask)
    want = -(_torch_logprobs(hf, roll.tokens, task.prompt_len) * mask).sum() / mask.sum()
    np.testing.assert_allclose(first["entropy_proxy"], want, rtol=1e-4)

    # OUT/hf: transformers loads the trained weights (those of jaxlab's reader of the same folder), which moved.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "hf")
    _, trained, tok_out = load_pretrained(out / "hf", dtype="float32")
    q = reloaded.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(trained["block_0"]["mixer"]["query"]["kernel"]).reshape(32, -1).T, q)
    original = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(q - original).max() > 1e-4
    np.testing.assert_array_equal(reloaded.lm_head.weight.detach().numpy(), np.asarray(trained["head"]["kernel"]).T)
    assert tok_out.eos_id == tok.eos_id and tok_out.encode("07+35=").tolist() == tok.encode("07+35=").tolist()
