"""Smoke runs of the LM experiments at tiny sizes: they run, write their figure, and state claims that read their
metrics.
(One cheap mixer each: every mixer's training is covered by tests/models; here the experiment code is.)"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxlab.context import RunContext
from jaxlab.metrics import to_jsonable
from jaxlab.registry import get_experiment, get_trainer
from jaxlab.xla_options import FAST_COMPILE

TINY = {
    "mqar": dict(mixers=("attention",), widths=(16,), seq_lens=(16,), kv_pairs=(2,), vocab_size=16, steps=2,
                 batch_size=4, eval_batches=1),
    "selective-copying": dict(mixers=("attention",), seq_len=12, num_tokens=2, vocab_size=6, d_model=16, steps=2,
                              batch_size=4, eval_batches=1),
    "induction-heads": dict(mixers=("attention",), train_len=8, test_lens=(8, 16), d_model=16, steps=2, batch_size=4,
                            eval_batches=1),
    "remat": dict(depths=(2,), policies=("none", "every-sqrt"), d_model=16, seq_len=16, batch_size=2,
                  repeats=1),
    "lm-stdlib": dict(mixers=("attention",), steps=2, batch_size=2, seq_len=16, d_model=16, num_layers=1,
                      num_heads=2, warmup_steps=1, eval_every=2, eval_batches=1, max_documents=20),
    "moonlight-muon": dict(widths=(32,), num_layers=1, steps=4, batch_size=2, seq_len=16, warmup_steps=1, eval_every=2,
                           eval_batches=1, max_documents=20),
    "moe-balance": dict(steps=4, batch_size=2, seq_len=16, d_model=16, num_layers=1, num_heads=2, num_experts=4,
                        top_k=1, shared_experts=1, warmup_steps=1, eval_every=2, eval_batches=1, max_documents=20),
}


def test_trainer_registered():
    assert get_trainer("lm").config_cls.__name__ == "LMTrainConfig"


def test_mqar_smoke(tmp_path):
    result = _run_with_claims("mqar", tmp_path)
    acc = result.metrics["accuracy"]
    assert acc == {"attention": {"16": {"16": acc["attention"]["16"]["16"]}}}  # mixer -> length -> width
    a = acc["attention"]["16"]["16"]
    # The verdicts read the accuracies: attention's claim is its accuracy against 0.9, and the claims about
    # fixed-state mixers do not hold without one.
    attention, gap, rise = result.claims
    assert attention.holds == (a >= 0.9) and attention.evidence == f"d=16: {a:.3f}"
    assert not gap.holds and not rise.holds


def test_mqar_model_keeps_the_token_identity_in_the_residual_stream():
    # At the LM's default embedding std (0.02) the first block's O(1) output buries the token identity that
    # the second layer must match (2% of the residual stream) and 2-layer attention stays on the ln K plateau
    # at MQAR's quick size; the experiment's LM draws it at the scale of the normalised activations.
    from jaxlab.experiments.mqar import model_config
    from jaxlab.models.lm import LM, LMConfig, init_params

    cfg = get_experiment("mqar").quick
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 64), 0, cfg.vocab_size)

    def identity_share(model_cfg):  # RMS of the token embedding over the residual stream's after block 0
        model = LM(model_cfg)
        params = init_params(model, jax.random.PRNGKey(0), tokens)
        emb = params["embed"]["embedding"]
        _, aux = model.apply({"params": params}, tokens)
        return float(np.sqrt(np.mean(np.square(emb[tokens]))) / aux["residual_rms"][0]), float(np.std(emb))

    model_cfg = model_config(cfg, "attention", 64, 64)
    assert not model_cfg.tie_embeddings
    share, std = identity_share(model_cfg)
    assert share > 0.25 and std == pytest.approx(cfg.embed_init_std, rel=0.1)
    assert identity_share(dataclasses.replace(model_cfg, embed_init_std=0.02))[0] < 0.05
    with pytest.raises(ValueError, match="embed_init_std"):
        LMConfig(embed_init_std=0.0)
    with pytest.raises(ValueError, match="embed_init_std"):
        dataclasses.replace(cfg, embed_init_std=-1.0)


def test_mqar_reports_the_best_learning_rate_of_its_sweep(tmp_path):
    exp = get_experiment("mqar")
    cfg = dataclasses.replace(exp.quick, **{**TINY["mqar"], "lrs": (1e-3, 3e-2)})
    m = exp.fn(cfg, RunContext("mqar", tmp_path, quick=True, show_progress=False)).metrics
    by_lr = m["accuracy_by_lr"]["attention"]["16"]["16"]
    assert set(by_lr) == {"0.001", "0.03"}
    assert m["accuracy"]["attention"]["16"]["16"] == max(by_lr.values())
    assert by_lr[f"{m['best_lr']['attention']['16']['16']:g}"] == max(by_lr.values())
    with pytest.raises(ValueError, match="lrs"):
        dataclasses.replace(cfg, lrs=())
    with pytest.raises(ValueError, match="lrs"):
        dataclasses.replace(cfg, lrs=(1e-3, 0.0))


def test_selective_copying_and_induction_smoke(tmp_path):
    # Each claim compares mixers this tiny run lacks (Mamba, S4D; lengths beyond 2x the training length):
    # none may hold for want of its evidence.
    copying = _run_with_claims("selective-copying", tmp_path)
    acc = copying.metrics["accuracy"]["attention"]
    assert not any(c.holds for c in copying.claims) and copying.claims[0].evidence == "mamba not run"
    assert copying.comparisons[0].ours == round(acc, 4) and f"attention {acc:.2f}" in copying.summary
    induction = _run_with_claims("induction-heads", tmp_path)
    acc = induction.metrics["accuracy"]["attention"]
    assert list(acc) == ["8", "16"] and not any(c.holds for c in induction.claims)
    assert induction.comparisons[0].ours == round(acc["16"], 4)  # reported at the longest test length


def _run_with_claims(name, tmp_path):
    """Like ``_run``, and the result states its paper's claims."""
    from jaxlab.registry import Claim

    exp = get_experiment(name)
    result = exp.fn(dataclasses.replace(exp.quick, **TINY[name]), RunContext(name, tmp_path, quick=True,
                                                                            show_progress=False))
    assert (tmp_path / f"{name}.png").stat().st_size > 0 and result.summary and result.comparisons
    json.dumps(to_jsonable(result.metrics), allow_nan=False)
    assert result.claims and all(isinstance(c, Claim) for c in result.claims)
    return result


def test_remat_smoke(tmp_path):
    rows = _run_with_claims("remat", tmp_path).metrics["rows"]
    assert [r["resolved"] for r in rows] == ["none", "every-1"]
    assert all(r["temp_mib"] > 0 and r["step_ms"] > 0 for r in rows)


def test_lm_stdlib_smoke(tmp_path):
    metrics = _run_with_claims("lm-stdlib", tmp_path).metrics
    bpb = metrics["final_bpb"]["attention"]
    # After 2 steps the model is still close to uniform over the 256 byte values: log2(256) = 8 bits per byte
    # (nats, or a loss averaged over other than bytes, would be far from 8).
    assert abs(bpb - 8) < 0.5 and tuple(metrics["curves"]["attention"][-1]) == (2, bpb)


def test_moonlight_muon_smoke(tmp_path):
    """Both optimizers train at each width from the same start; the FLOPs ratio is read off the curves."""
    from jaxlab.experiments.moonlight_muon import flops_to_reach

    m = _run_with_claims("moonlight-muon", tmp_path).metrics
    adamw, muon = m["curves"]["d32-adamw"], m["curves"]["d32-muon"]
    assert [x for x, _ in adamw] == [x for x, _ in muon] and len(adamw) == 2
    assert adamw[-1][0] == pytest.approx(6 * m["num_params"][32] * 4 * 2 * 16)  # 6 N D after 4 steps of 2x16
    ratio = m["flops_ratio"][32]
    expected = flops_to_reach(muon, adamw[-1][1]) / adamw[-1][0]
    assert (ratio is None and expected == float("inf")) or ratio == pytest.approx(expected)


def test_flops_to_reach_interpolates_between_evaluations():
    from jaxlab.experiments.moonlight_muon import flops_to_reach

    curve = [(1.0, 5.0), (2.0, 4.0), (4.0, 3.0)]
    assert flops_to_reach(curve, 6.0) == 1.0
    assert flops_to_reach(curve, 4.5) == pytest.approx(1.5)
    assert flops_to_reach(curve, 3.5) == pytest.approx(3.0)
    assert flops_to_reach(curve, 2.9) == float("inf")


def test_moe_balance_smoke(tmp_path):
    """Dense and the two balanced MoEs train; the imbalance is read from the MoE runs' load metrics only."""
    from jaxlab.experiments.moe_balance import load_imbalance

    m = _run_with_claims("moe-balance", tmp_path).metrics
    assert set(m["final_loss"]) == {"dense", "moe-aux", "moe-bias"} and set(m["imbalance"]) == {"moe-aux", "moe-bias"}
    assert m["num_params"]["moe-aux"] > m["num_params"]["dense"]  # more total, equal active parameters
    records = [{"step": 1, "moe/max_load": 9.0, "moe/load_cv": 9.0}, {"step": 3, "moe/max_load": 1.5, "moe/load_cv": 0.2},
               {"step": 4, "moe/max_load": 1.25, "moe/load_cv": 0.4}, {"step": 4, "eval/loss": 1.0}]
    assert load_imbalance(records, steps=4) == pytest.approx({"max_vio": 0.375, "load_cv": 0.3})
    for v in m["imbalance"].values():
        assert v["max_vio"] >= 0 and v["load_cv"] >= 0


@pytest.mark.parametrize("name", sorted(TINY))
def test_quick_configs_are_valid(name):
    """The quick size differs from the full one, and the config class validates its fields in
    ``__post_init__``, so registering the quick size (building it at import) validated them."""
    exp = get_experiment(name)
    assert exp.quick != exp.config_cls()  # the full size validates too
    with pytest.raises(ValueError, match="batch_size=0"):
        dataclasses.replace(exp.quick, batch_size=0)


def _scanned_grad(depth, policy, tokens):
    from jaxlab.experiments.remat_tradeoff import policy_model
    from jaxlab.models.lm import LMConfig, init_params, next_token_loss, shifted_targets

    cfg = LMConfig(vocab_size=32, d_model=32, num_layers=depth, num_heads=2, max_len=64, attention_impl="xla")
    model = policy_model(cfg, policy)
    params = init_params(model, jax.random.PRNGKey(0), tokens)

    def loss(p):
        return next_token_loss(model.apply({"params": p}, tokens)[0][:, :-1], *shifted_targets(tokens))[0]

    compiled = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE).lower(params).compile()
    return compiled(params), compiled.memory_analysis().temp_size_in_bytes


def test_remat_policies_keep_gradients_and_flatten_memory_growth_with_depth():
    """The remat experiment's model: the same gradients under every policy, and checkpointed segments
    make temporary memory grow far slower with depth than storing everything (the point of Chen et al.)."""
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 64), 0, 32)
    grads, temp = {}, {}
    for depth in (2, 6):
        for policy in ("none", "full", "dots"):
            grads[depth, policy], temp[depth, policy] = _scanned_grad(depth, policy, tokens)
    for policy in ("full", "dots"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads[6, "none"],
                     grads[6, policy])
    growth = {p: temp[6, p] - temp[2, p] for p in ("none", "full", "dots")}
    assert growth["full"] < 0.2 * growth["none"], temp
    assert growth["full"] <= growth["dots"] < growth["none"], temp
