"""Packing: hand-made cases (segments, positions, masks, efficiency), segment isolation in the model,
the resumable stream, and >= 98% real tokens on the default corpus against the pad-to-longest baseline."""

import functools

import jax
import numpy as np
import pytest

from jaxlab.models.lm import LM, LMConfig, init_params
from jaxlab.models.packing import (StreamPacker, target_mask_from_segments, pack_documents, packing_stats,
                                   pad_documents, padded_efficiency)
from jaxlab.xla_options import FAST_COMPILE

DOCS = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 30)]  # lengths 5, 3, 10


def test_stream_packing_hand_made():
    rows = pack_documents(DOCS, 8)
    np.testing.assert_array_equal(rows["inputs"], [[1, 2, 3, 4, 5, 10, 11, 12],
                                                   [20, 21, 22, 23, 24, 25, 26, 27],
                                                   [28, 29, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["targets"], [[2, 3, 4, 5, 10, 11, 12, 0],
                                                    [21, 22, 23, 24, 25, 26, 27, 0],
                                                    [29, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1, 1, 2, 2, 2], [1] * 8, [1, 1] + [0] * 6])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 3, 4, 0, 1, 2], list(range(8)), [0, 1] + [0] * 6])
    # targets[t] = inputs[t + 1], masked at the last token of a piece, in padding and at L - 1
    np.testing.assert_array_equal(rows["mask"].astype(int), [[1, 1, 1, 1, 0, 1, 1, 0],
                                                                   [1, 1, 1, 1, 1, 1, 1, 0],
                                                                   [1, 0, 0, 0, 0, 0, 0, 0]])
    stats = packing_stats(rows)
    assert (stats.real_tokens, stats.slots, stats.targets) == (18, 24, 14)
    assert stats.efficiency == pytest.approx(0.75)
    # pad-to-longest, 2 pieces per batch: pieces 5, 3 | 8, 2 -> slots 2*5 + 2*8 = 26
    base = padded_efficiency([5, 3, 10], batch_size=2, seq_len=8)
    assert (base.real_tokens, base.slots, base.targets) == (18, 26, 14)
    # the padded rows themselves measure the same way
    padded = pad_documents([np.arange(1, 6), np.arange(10, 13)])
    assert packing_stats(padded).slots == 10 and packing_stats(padded).real_tokens == 8


def test_best_fit_keeps_documents_whole():
    docs = [np.full(n, i + 1) for i, n in enumerate([6, 2, 5, 3, 4, 12])]  # 12 > L: cut into 8 + 4
    rows = pack_documents(docs, 8, strategy="best_fit")
    seg, tok = rows["segment_ids"], rows["inputs"]
    assert packing_stats(rows).real_tokens == 32 and len(tok) == 4  # 32 tokens fit 4 rows exactly
    for r in range(len(tok)):
        for s in np.unique(seg[r][seg[r] > 0]):
            piece = tok[r][seg[r] == s]
            assert len(set(piece.tolist())) == 1  # one document per segment
            np.testing.assert_array_equal(rows["positions"][r][seg[r] == s], np.arange(len(piece)))
    lengths = sorted(int((tok == i + 1).sum()) for i in range(6))
    assert lengths == sorted([6, 2, 5, 3, 4, 12])


def test_stream_packer_resumes_and_matches_one_shot():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 250, rng.integers(1, 40)) for _ in range(30)]
    full = pack_documents(docs, 16)
    packer = StreamPacker(docs, 16, epochs=1)
    first = packer.next_rows(3)
    state = packer.get_state()
    resumed = StreamPacker(docs, 16, epochs=1)
    resumed.set_state(state)
    rest = resumed.next_rows(1000)
    for k in full:
        np.testing.assert_array_equal(np.concatenate([first[k], rest[k]]), full[k])
    # an endless stream wraps into the next epoch inside a row: no padding ever
    endless = StreamPacker(docs, 16, order=lambda e: np.random.default_rng(e).permutation(len(docs)))
    rows = endless.next_rows(len(full["inputs"]) + 5)
    assert (rows["segment_ids"] > 0).all() and endless.epoch >= 1


def test_target_mask_and_bad_input():
    np.testing.assert_array_equal(target_mask_from_segments(np.array([[1, 1, 2, 2, 2, 0, 0]])),
                                  [[True, False, True, True, False, False, False]])
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(DOCS, 1)
    with pytest.raises(ValueError, match="strategy"):
        pack_documents(DOCS, 8, strategy="greedy")
    with pytest.raises(ValueError, match="non-empty"):
        pack_documents([np.zeros(0, int)], 8)


@pytest.mark.parametrize("mixer", ["attention"])  # every mixer: tests/models/test_lm.py
def test_packed_row_equals_documents_run_alone(mixer, key):
    """Segments are isolated: the logits of a packed row equal those of each document on its own
    (attention masks across segments; the recurrent mixer resets its state)."""
    cfg = LMConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, max_len=16, attention_impl="xla",
                   mixer=mixer, d_state=4)
    model = LM(cfg)
    docs = [np.arange(1, 7) % 32, np.arange(3, 12) % 32]
    packed, alone = pack_documents(docs, 16), pad_documents(docs, length=16)  # [1, 16] and [2, 16]

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def both(key):
        params = init_params(model, key, packed["inputs"])
        apply = lambda rows: model.apply({"params": params}, rows["inputs"], segment_ids=rows["segment_ids"],  # noqa: E731
                                         positions=rows["positions"])[0]
        return apply(packed), model.apply({"params": params}, alone["inputs"])[0]  # alone: no segment ids

    packed_logits, alone_logits = both(key)
    np.testing.assert_allclose(packed_logits[0, :6], alone_logits[0, :6], atol=2e-5)
    np.testing.assert_allclose(packed_logits[0, 6:15], alone_logits[1, :9], atol=2e-5)


def test_training_loss_of_one_document_per_row_needs_no_segment_ids(key):
    """Rows without ``segment_ids``/``positions`` (the layout fused kernels without segment masks take)
    train on the same loss as rows that carry one segment each."""
    from jaxlab.models.lm_training import make_loss_fn

    model = LM(LMConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, max_len=16, attention_impl="xla"))
    rows = pack_documents([np.arange(1, 17) % 32, np.arange(5, 21) % 32], 16)  # two full rows: one segment each
    plain = {k: rows[k] for k in ("inputs", "targets", "mask")}

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def both(key):
        params = init_params(model, key, rows["inputs"])
        loss_fn = make_loss_fn(model)
        return loss_fn(params, rows, key)[0], loss_fn(params, plain, key)[0]

    with_segments, without = both(key)
    np.testing.assert_allclose(without, with_segments, rtol=1e-6)


def test_default_corpus_packs_at_least_98_percent_real(stdlib_corpus):
    lengths = [len(d) for d in stdlib_corpus.train]
    stats = packing_stats(pack_documents(stdlib_corpus.train, 1024))
    baseline = padded_efficiency(lengths, batch_size=8, seq_len=1024)
    assert stats.real_tokens == baseline.real_tokens == sum(lengths)
    assert stats.efficiency >= 0.98
    assert stats.efficiency > baseline.efficiency
    assert stats.target_fraction >= 0.98
