"""Smoke run of ``zoo-recall`` at a tiny size (three cheap mixers: every mixer's training is covered by
tests/models), and its per-mixer bookkeeping (widths matched in parameters, state sizes) over every mixer."""

import dataclasses
import json
import math

import pytest

from jaxlab.context import RunContext
from jaxlab.metrics import to_jsonable
from jaxlab.models.lm import MIXERS
from jaxlab.registry import Claim, get_experiment

TINY = dict(mixers=("attention", "sliding", "linear"), d_model=32, seq_len=16, kv_pairs=2, window=4, steps=2,
            batch_size=4, eval_batches=1, max_documents=20, max_train_windows=64)


def test_zoo_recall_smoke(tmp_path):
    exp = get_experiment("zoo-recall")
    cfg = dataclasses.replace(exp.quick, **TINY)
    result = exp.fn(cfg, RunContext("zoo-recall", tmp_path, quick=True, show_progress=False))
    assert (tmp_path / "zoo-recall.png").stat().st_size > 0 and result.summary
    json.dumps(to_jsonable(result.metrics), allow_nan=True)
    rows = result.metrics["mixers"]
    assert list(rows) == list(TINY["mixers"])
    assert [c.quantity.split(" ")[0] for c in result.comparisons] == list(TINY["mixers"])
    target = result.metrics["target_block_params"]
    for mixer, r in rows.items():
        assert 0.0 <= r["mqar_accuracy"] <= 1.0 and r["tokens_per_s"] > 0 and r["state_floats"] > 0
        # After 2 steps the LM is near uniform over 256 bytes: 8 bits (plus the spread of std-1 logits); nats
        # (about 6) or a mean over other than bytes would be outside.
        assert 7.0 < r["bits_per_byte"] < 10.0, (mixer, r["bits_per_byte"])
        assert abs(r["block_params"] / target - 1) < 0.25, (mixer, r["block_params"], target)
    # State floats per layer for one sequence of L=16, by hand: attention's KV cache 2 L d; the sliding
    # window's ring of W=4 slots 2 W d; linear attention (elu + 1 features, H heads of D) H (D^2 + D).
    L, W = TINY["seq_len"], TINY["window"]
    assert rows["attention"]["d_model"] == 32 and rows["attention"]["state_floats"] == 2 * L * 32
    assert rows["sliding"]["state_floats"] == 2 * W * rows["sliding"]["d_model"]
    d = rows["linear"]["d_model"]
    H = max(1, d // 32)
    assert rows["linear"]["state_floats"] == H * ((d // H) ** 2 + d // H)
    assert rows["attention"]["state_floats"] > rows["sliding"]["state_floats"]
    assert result.metrics["fixed_state"] == ["sliding", "linear"] and not rows["attention"]["fixed_state"]
    # The claims read these numbers: attention's accuracy against 0.9; no rank correlation over two
    # fixed-state mixers; the median relative gaps in the evidence.
    solves, ranks, gap = result.claims
    assert all(isinstance(c, Claim) for c in result.claims)
    assert solves.holds == (rows["attention"]["mqar_accuracy"] >= 0.9)
    assert math.isnan(result.metrics["spearman"]) and not ranks.holds
    attn = rows["attention"]
    medians = result.metrics["median_relative_gap"]
    if attn["mqar_accuracy"] > 0:
        recall = [(attn["mqar_accuracy"] - rows[m]["mqar_accuracy"]) / attn["mqar_accuracy"]
                  for m in ("sliding", "linear")]
        lm = [(rows[m]["bits_per_byte"] - attn["bits_per_byte"]) / attn["bits_per_byte"] for m in ("sliding", "linear")]
        assert medians["mqar"] == pytest.approx(sum(recall) / 2)
        assert medians["bits_per_byte"] == pytest.approx(sum(lm) / 2)
        assert gap.holds == (medians["mqar"] > medians["bits_per_byte"])
    else:  # a gap relative to an accuracy of 0 is undefined: no verdict for it
        assert math.isnan(medians["mqar"]) and not gap.holds


def test_median_relative_gaps_by_hand():
    from jaxlab.experiments.zoo_recall import median_relative_gaps

    rows = {"attention": {"mqar_accuracy": 1.0, "bits_per_byte": 2.0},
            "a": {"mqar_accuracy": 0.25, "bits_per_byte": 2.2}, "b": {"mqar_accuracy": 0.5, "bits_per_byte": 2.1},
            "c": {"mqar_accuracy": 1.0, "bits_per_byte": 1.9}}
    assert median_relative_gaps(rows, ["a", "b", "c"]) == pytest.approx((0.5, 0.05))  # medians of 3 each
    assert median_relative_gaps(rows, ["a", "b"]) == pytest.approx((0.625, 0.075))  # means of the middle two
    rows["attention"]["mqar_accuracy"] = 0.0
    assert all(math.isnan(g) for g in median_relative_gaps(rows, ["a"]))
    assert all(math.isnan(g) for g in median_relative_gaps({"a": rows["a"]}, ["a"]))


def test_every_mixer_has_a_matched_width_and_a_state_size():
    from jaxlab.experiments.zoo_recall import block_params, matched_width, model_config, state_floats

    exp = get_experiment("zoo-recall")
    assert exp.quick.mixers == MIXERS and exp.config_cls().mixers == MIXERS  # the table covers every mixer
    cfg = exp.quick
    target = block_params(model_config(cfg, "attention", cfg.d_model))
    L = cfg.seq_len
    for mixer in MIXERS:
        d, params = matched_width(cfg, mixer, target)
        assert d % 8 == 0 and abs(params / target - 1) < 0.15, (mixer, d, params, target)
        mcfg = model_config(cfg, mixer, d)
        size, doubled = state_floats(mcfg, L), state_floats(mcfg, 2 * L)
        assert size > 0 and doubled >= size, (mixer, size, doubled)
        if mixer in ("attention", "sparse", "lsh"):  # a cache of every earlier key and value
            assert size == 2 * L * d and doubled == 2 * size, (mixer, size)
        if mixer == "mamba":  # conv window (d_conv - 1) x E and SSM state E x N, E = 2 d, N = 16
            assert size == 3 * 2 * d + 2 * d * 16, size
        if mixer not in ("attention", "sparse", "lsh"):
            assert doubled == size, mixer  # fixed-size state


def test_spearman_uses_average_ranks():
    from jaxlab.experiments.zoo_recall import spearman

    assert spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    assert spearman([1, 2, 3, 4], [0.1, 0.1, 0.5, 0.9]) == pytest.approx(0.9486833, rel=1e-6)
    assert math.isnan(spearman([1, 2, 3], [0.2, 0.2, 0.2]))


def test_config_rejects_bad_sizes():
    exp = get_experiment("zoo-recall")
    for bad in (dict(batch_size=0), dict(kv_pairs=20, seq_len=32), dict(mixers=("nope",)), dict(lrs=()),
                dict(mqar_vocab=6, kv_pairs=4)):
        with pytest.raises(ValueError):
            dataclasses.replace(exp.quick, **bad)
