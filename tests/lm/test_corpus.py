"""Corpus loading: each input kind, bad inputs skipped with counts, a clear error when nothing is usable,
the stable hash split, and the resumable packed iterator."""

import json

import numpy as np
import pytest

from jaxlab.models.corpus import PAD_ID, PackedIterator, decode, encode, load_corpus


def test_default_corpus_is_the_stdlib(stdlib_corpus):
    c = stdlib_corpus
    assert c.split == "hash" and len(c.train) > 500 and len(c.validation) > 10
    assert 0.02 < len(c.validation) / (len(c.train) + len(c.validation)) < 0.1
    assert all(d.dtype == np.uint8 and len(d) > 0 and PAD_ID not in d for d in c.train[:200])
    assert any("import " in decode(d[:4000]) for d in c.train[:20])


def test_folder_skips_empty_binary_and_unreadable(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}\n" * 5)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "nested.md").write_text("# nested ü\n")
    (tmp_path / "empty.txt").write_text("  \n\t")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "broken_link.txt").symlink_to(tmp_path / "missing")  # a listed file that cannot be read
    c = load_corpus(tmp_path)
    assert c.skipped == {"empty": 1, "binary": 2, "unreadable": 1}
    assert len(c.train) + len(c.validation) == 41 and c.split == "hash"
    texts = {decode(d) for d in c.train + c.validation}
    assert "# nested ü\n" in texts and "document 7\n" * 5 in texts
    again = load_corpus(tmp_path)  # deterministic
    assert [d.tobytes() for d in again.validation] == [d.tobytes() for d in c.validation]


def test_split_depends_on_names_not_order_or_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    for root, order in ((a, range(50)), (b, reversed(range(50)))):
        root.mkdir(parents=True)
        for i in order:
            (root / f"f{i}.txt").write_text(f"text {i}")
    va, vb = load_corpus(a, val_fraction=0.2).validation, load_corpus(b, val_fraction=0.2).validation
    assert 0 < len(va) < 50 and [decode(d) for d in va] == [decode(d) for d in vb]


def test_single_text_file_holds_out_its_tail(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("abcdefghij" * 100)
    c = load_corpus(path, val_fraction=0.1)
    assert c.split == "tail" and len(c.train) == len(c.validation) == 1
    assert decode(c.train[0]) + decode(c.validation[0]) == "abcdefghij" * 100
    assert len(c.validation[0]) == 100


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": f"line {i} é"} for i in range(30)] + [{"text": ""}, {"other": 1}, {"text": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n\n")
    c = load_corpus(path)
    assert c.skipped == {"empty": 1, "binary": 0, "unreadable": 3}
    assert sorted(decode(d) for d in c.train + c.validation) == sorted(f"line {i} é" for i in range(30))


def test_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "blank.txt").write_text("\n")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"no usable document \(skipped: empty=1, binary=1"):
        load_corpus(tmp_path)
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        load_corpus(tmp_path / "missing")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(tmp_path, val_fraction=1.0)


def test_encode_decode_round_trip():
    text = "def f(x):\n    return 'ü' * x  # ✓\n"
    tokens = encode(text)
    assert tokens.dtype == np.uint8 and len(tokens) == len(text.encode()) and decode(tokens) == text


def test_packed_iterator_resumes_exactly():
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 256, rng.integers(5, 90)).astype(np.uint8) for _ in range(25)]
    it = PackedIterator(docs, batch_size=3, seq_len=32, seed=7)
    batches = [next(it) for _ in range(20)]  # more than an epoch, reshuffled
    assert it.get_state()["epoch"] >= 1
    it2 = PackedIterator(docs, batch_size=3, seq_len=32, seed=7)
    for _ in range(5):
        next(it2)
    state = it2.get_state()
    it3 = PackedIterator(docs, batch_size=3, seq_len=32, seed=7)
    it3.set_state(state)
    for expected in batches[5:]:
        got = next(it3)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    assert all((b["segment_ids"] > 0).all() for b in batches)  # never any padding
    other = next(PackedIterator(docs, batch_size=3, seq_len=32, seed=8))
    assert not np.array_equal(other["inputs"], batches[0]["inputs"])
