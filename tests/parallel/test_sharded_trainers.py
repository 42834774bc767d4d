"""`jaxlab train lm` on a mesh: the same losses as one device, resumed onto another mesh and strategy,
gradient accumulation, the MoE on an expert axis, two processes launched with `jaxlab launch`, and clear
errors for meshes that do not fit.

Tolerance: losses rtol 1e-5 over 8 AdamW steps (the meshes sum in other orders than one device).
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlab.models.lm_training import LMTrainConfig, train_lm
from jaxlab.parallel import launch

STEPS = 8
TINY = LMTrainConfig(steps=STEPS, batch_size=8, seq_len=32, d_model=32, num_layers=2, num_heads=4, warmup_steps=2,
                     eval_every=STEPS, eval_batches=1, sample_every=0, log_every=1, checkpoint_every=4,
                     progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(24):
        words = rng.choice(["def", "return", "x", "=", "(", ")", ":", "\n", "    ", "if", "1"], size=80)
        (folder / f"f{i}.py").write_text(" ".join(words))
    return folder


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in rows if "loss" in r])


def _column(records, name):
    return np.array([r[name] for r in records if name in r])


def _train(corpus, out, **fields):
    summary = train_lm(dataclasses.replace(TINY, data=str(corpus), **fields), out)
    return summary, _losses(out)


@pytest.fixture(scope="module")
def single_device(corpus, tmp_path_factory):
    return _train(corpus, tmp_path_factory.mktemp("one"), mesh="data=1")


def test_three_axis_mesh_resumes_on_other_meshes_with_the_single_device_losses(corpus, single_device, tmp_path):
    """data=2 x model=2 x seq=2 under ZeRO-3 (8 devices), interrupted after step 4 and resumed on data=4 under
    ZeRO-1, interrupted again and resumed on one device: every run logs the single-device losses."""
    out = tmp_path / "run"
    _, first = _train(corpus, out, mesh="data=2,model=2,seq=2", strategy="zero3")
    np.testing.assert_allclose(first, single_device[1], rtol=1e-5)
    for mesh, strategy in (("data=4", "zero1"), ("data=1", "ddp")):
        shutil.rmtree(out / "checkpoints" / str(STEPS))  # the run died after step 4's checkpoint
        summary, resumed = _train(corpus, out, mesh=mesh, strategy=strategy)
        assert summary["resumed_from"] == 4 and summary["step"] == STEPS
        np.testing.assert_allclose(resumed, single_device[1], rtol=1e-5)
        assert summary["val_loss"] == pytest.approx(single_device[0]["val_loss"], rel=1e-5)


def test_grad_accum_equals_one_batch(corpus, single_device, tmp_path):
    """Each of 4 devices' 2 rows as 2 microbatches of 1, summed in one step."""
    _, accum = _train(corpus, tmp_path / "accum", mesh="data=4", strategy="zero2", grad_accum=2)
    np.testing.assert_allclose(accum, single_device[1], rtol=1e-5)


def test_expert_parallel_moe_equals_one_device(corpus, tmp_path):
    """--ffn moe on data=2 x expert=4 (tokens exchanged with all-to-all). Not combined with grad_accum: the
    load-balancing loss of a microbatch is not the microbatches' share of the batch's (it is a product of
    per-batch routing fractions), so accumulation changes that auxiliary term by design."""
    _, one = _train(corpus, tmp_path / "one", mesh="data=1", ffn="moe")
    _, ep = _train(corpus, tmp_path / "ep", mesh="data=2,expert=4", ffn="moe", strategy="zero1")
    np.testing.assert_allclose(ep, one, rtol=1e-5)


@pytest.mark.parametrize("fields, message", [
    (dict(mesh="data=2,dat=4"), "unknown axis 'dat'"),
    (dict(mesh="data=3"), "not divisible by the mesh's data"),          # 8 rows over 3 devices
    (dict(mesh="model=8"), "heads=4 not divisible by model=8"),
    (dict(mesh="data=4", grad_accum=4), "not divisible"),               # 2 rows per microbatch over 4 devices
    (dict(batch_size=8, grad_accum=3), "batch_size=8 must be divisible by grad_accum=3"),
    (dict(strategy="zero4"), "strategy='zero4' must be one of"),
])
def test_bad_meshes_fail_before_training(corpus, tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        _train(corpus, tmp_path / "bad", **fields)
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_two_process_launch_trains_resumes_and_matches_one_process(corpus, tmp_path):
    """`jaxlab launch --nproc 2 -- train lm --mesh data=2`: two processes (one CPU device each) joined by
    jax.distributed write one run folder (metrics once, one checkpoint per step), resume after the
    step-8 checkpoint is lost, and log the losses of one process with two devices."""
    fields = dict(TINY.__dict__, data=str(corpus), mesh="data=2")
    flags = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            flags += [flag, str(value)]
    out = tmp_path / "launched"
    argv = ["--nproc", "2", "--cpu-devices", "1", "--", "train", "lm", "--out", str(out), *flags]
    assert launch.main(argv) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    shutil.rmtree(out / "checkpoints" / str(STEPS))
    assert launch.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["step"] == STEPS
    _, one_process = _train(corpus, tmp_path / "one", mesh="data=2")
    launched = _losses(out)
    assert len(launched) == STEPS  # process 1 wrote nothing
    np.testing.assert_allclose(launched, one_process, rtol=1e-6)


def test_posttrain_on_a_data_mesh_equals_one_device(tmp_path):
    """`jaxlab train posttrain --mesh data=2 --strategy zero1`: SFT then GRPO (sampling, the frozen reference
    replicated in the batch) log the one-device losses."""
    from jaxlab.rl.llm.posttrain import PostTrainConfig, posttrain

    cfg = PostTrainConfig(task="sort", num_digits=3, d_model=32, num_layers=1, num_heads=2, sft_steps=6,
                          sft_batch_size=8, steps=4, batch_size=4, group_size=4, eval_problems=8, eval_every=4,
                          log_every=1, checkpoint_every=4, progress=False, method="grpo", format_weight=0.5,
                          fast_compile=True)
    runs = {}
    for mesh, strategy in (("data=1", "ddp"), ("data=2", "zero1")):
        out = tmp_path / mesh
        posttrain(dataclasses.replace(cfg, mesh=mesh, strategy=strategy), out)
        runs[mesh] = {stage: [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
                      for stage in ("sft", "grpo")}
    one, two = runs["data=1"], runs["data=2"]
    assert len(one["sft"]) == 6 and len([r for r in one["grpo"] if "loss" in r]) == 4
    np.testing.assert_allclose(_column(two["sft"], "loss"), _column(one["sft"], "loss"), rtol=1e-5)
    # the same responses sampled (rewards, lengths) and the same update (the GRPO loss is ~0 by
    # construction: group-normalised advantages; its gradient is not)
    assert _column(one["grpo"], "grad_norm").min() > 0  # the format reward gives the groups a signal
    for name in ("reward", "grad_norm"):
        np.testing.assert_allclose(_column(two["grpo"], name), _column(one["grpo"], name), rtol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="data and model axes only"):
        dataclasses.replace(cfg, mesh="data=2,expert=2")


def test_posttrain_tensor_parallel_ppo_rlhf_equals_one_device(tmp_path):
    """`--mesh data=2,model=2 --strategy zero3`: every PPO-RLHF stage (SFT, the reward model, then PPO with
    its value model) with the heads and MLP units split over model logs the one-device numbers, and the
    trained policy is laid out by its logical axes."""
    from jaxlab.rl.llm.posttrain import PostTrainConfig, posttrain, stage_param_axes

    cfg = PostTrainConfig(task="sort", num_digits=3, d_model=32, num_layers=1, num_heads=2, sft_steps=40,
                          sft_batch_size=16, sft_lr=1e-2, steps=2, batch_size=4, group_size=4, eval_problems=8,
                          eval_every=2, log_every=1, checkpoint_every=2, progress=False, method="ppo-rlhf",
                          rm_steps=2, pair_prompts=64, fast_compile=True)
    runs = {}
    for mesh, strategy in (("data=1", "ddp"), ("data=2,model=2", "zero3")):
        out = tmp_path / mesh
        posttrain(dataclasses.replace(cfg, mesh=mesh, strategy=strategy), out)
        runs[mesh] = {stage: [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
                      for stage in ("sft", "reward_model", "ppo-rlhf")}
    one, tp = runs["data=1"], runs["data=2,model=2"]
    for stage, name in (("sft", "loss"), ("reward_model", "loss"), ("ppo-rlhf", "rm_score"), ("ppo-rlhf", "grad_norm")):
        np.testing.assert_allclose(_column(tp[stage], name), _column(one[stage], name), rtol=2e-4, err_msg=stage + name)
    # the stage's state is split by its logical axes: query heads over model, the tiny vocabulary whole
    from jaxlab.parallel.mesh import mesh_from_spec
    from jaxlab.rl.llm import posttrain as pt

    model_cfg = cfg.model_config()
    axes = stage_param_axes("ppo-rlhf", model_cfg)
    assert axes["value"]["lm"]["block_0"]["mixer"]["query"]["kernel"] == P("embed", "heads", "head_dim")
    params = pt.init_params(pt.LM(model_cfg), jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    opt = pt.stage_optimizer_config(1e-3)
    state = pt.create_train_state(params, pt._optimizer("sft", model_cfg, opt), jax.random.PRNGKey(1))
    state, _ = pt._mesh_stage("sft", model_cfg, pt.Task(cfg.task, cfg.num_digits), None, opt, state,
                              mesh_from_spec("data=2,model=2"), "ddp")
    assert state.params["block_0"]["mixer"]["query"]["kernel"].sharding.spec == P(None, "model", None)
    assert state.params["embed"]["embedding"].sharding.spec == P(None, None)
