"""Smoke test of the ``linear-scaling`` experiment at a tiny size, and its crossover/exponent helpers."""

import json
import math

import pytest

from jaxlab.context import RunContext
from jaxlab.experiments import linear_scaling as ls
from jaxlab.registry import Claim, get_experiment


def test_helpers():
    assert ls.fit_exponent([256, 512, 1024], [1.0, 4.0, 16.0]) == pytest.approx(2.0)
    assert ls.fit_exponent([256], [1.0]) is None
    rows = [dict(mixer=m, seq_len=L, fwd_ms=t) for m, times in
            (("attention", (1.0, 4.0, 16.0)), ("mamba", (2.0, 3.0, 5.0))) for L, t in zip((1, 2, 4), times)]
    assert ls.crossover(rows, "mamba") == 2
    length, how = ls.crossover_length(rows, "mamba")  # ratio 2 at L=1, 0.75 at L=2: log-log interpolation
    assert how == "interpolated" and length == pytest.approx(2 ** (math.log(2) / math.log(2 / 0.75)))
    fast = [dict(r, fwd_ms=r["fwd_ms"] / 10) if r["mixer"] == "mamba" else r for r in rows]
    length, how = ls.crossover_length(fast, "mamba")  # faster everywhere: extrapolated from the power laws
    assert how == "below the sweep" and length < 1
    slow = [dict(r, fwd_ms=100.0 * r["seq_len"]) if r["mixer"] == "mamba" else r for r in rows]
    length, how = ls.crossover_length(slow, "mamba")
    assert how == "above the sweep" and length > 4
    with pytest.raises(ValueError, match="mixers"):
        ls.LinearScalingConfig(mixers=("rwkv",))
    with pytest.raises(ValueError, match="seq_lens"):
        ls.LinearScalingConfig(seq_lens=())


def test_tiny_run(tmp_path):
    exp = get_experiment("linear-scaling")
    mixers = ("attention", "mamba2")  # the two extremes; every mixer runs in the --quick size
    cfg = ls.LinearScalingConfig(seq_lens=(32, 128), mixers=mixers, d_model=16, num_heads=2, backward=False,
                                 repeats=1)
    result = exp.fn(cfg, RunContext("linear-scaling", tmp_path, quick=True, show_progress=False))
    rows = result.metrics["rows"]
    assert {(r["mixer"], r["seq_len"]) for r in rows} == {(m, L) for m in mixers for L in (32, 128)}
    assert all(r["fwd_ms"] > 0 and r["temp_mib_fwd"] >= 0 for r in rows)
    att = {r["seq_len"]: r["temp_mib_fwd"] for r in rows if r["mixer"] == "attention"}
    assert att[128] > 4 * att[32]  # dense scores: memory grows faster than L
    assert set(result.metrics["crossover"]) == {"mamba2"} and set(result.metrics["crossover_length"]) == {"mamba2"}
    assert len(result.claims) == 3 and all(isinstance(c, Claim) for c in result.claims)
    json.dumps(result.metrics)  # JSON-able
    assert (tmp_path / "linear-scaling.png").exists()
