"""The post-training driver: SFT, then DPO, PPO-RLHF (reward model, then PPO) or GRPO, resumable.

    cfg = PostTrainConfig(method="grpo", steps=100)          # `jaxlab train posttrain --method grpo`
    summary = posttrain(cfg, "runs/posttrain")
    cfg = PostTrainConfig(method="grpo", init_from="ckpt/")  # `... --init-from ckpt/`: a Hugging Face folder

The configuration (:class:`PostTrainConfig`, every field a flag) lives in :mod:`jaxlab.rl.llm.posttrain_config`.

Each stage is one run of the foundation's loop (:func:`jaxlab.loop.fit`) in its own folder under
``out_dir`` (``sft/``, ``reward_model/``, then ``dpo/``, ``ppo-rlhf/`` or ``grpo/``) with checkpoints,
``metrics.jsonl`` and a progress bar, so an interrupted run resumes mid-stage bit-for-bit, and runs of
several methods in one ``out_dir`` share the SFT start (and the reference model it defines). Problems
are drawn from the step index (:class:`ProblemIterator`), preference pairs are rebuilt from the seed,
and every key is a ``fold_in`` of ``PRNGKey(seed)``. Evaluation (a fixed problem set) reports the
verifier's accuracy of sampled (temperature 1) and greedy answers, the mean response length and the
sequence-level KL to the reference, ``E_pi[log pi(y|x) - log pi_ref(y|x)]``.

GRPO may instead train on a fixed pool of ``problem_pool`` problems (:class:`ProblemPool`), each step's drawn by
Kimi k1.5's sampling strategies (``problem_sampling``: a curriculum over difficulty levels, prioritised by
failure; :mod:`jaxlab.rl.llm.problem_sampling`) from per-problem outcome counts that travel with the data
position in every checkpoint, and log its rollouts as text (``log_rollouts``: ``grpo/rollouts.jsonl``). Both
read the rollout the jitted step returns (``GRPOSpec.return_rollout``) on the host, between steps.

GRPO on partial rollouts (``rollout_budget``, Kimi k1.5 section 2.6.2; :mod:`jaxlab.rl.llm.partial_rollout`):
each step advances a pool of rollouts in flight by that many tokens and trains on the groups that have finished;
the pool is part of the stage's train state, so checkpoints hold it and a resumed run continues it exactly.
``long2short`` (section 2.4; :mod:`jaxlab.rl.llm.long2short`) then shortens the GRPO policy in a
``long2short-<mode>/`` stage: SFT on the shortest correct of ``long2short_samples`` samples per problem
(``rejection``) or DPO of the shortest correct against a longer response (``dpo``); the summary's
``long2short`` holds the evaluation before and after (accuracy, mean response length).

``pretrain_steps`` (task ``think-add``): a ``pretrain/`` stage first makes a base model, next-token loss on the
task's base corpus (:mod:`jaxlab.rl.llm.base_corpus`: the pieces of the task, never a problem with its answer);
with ``sft_steps=0`` and ``method="grpo"`` that is DeepSeek-R1-Zero's setting, RL from the base model, which is
also the reference (DeepSeek-AI 2025, section 2.2). With ``sft_long_cot`` the SFT stage trains on answers that
check their steps at the corpus's rates (:class:`~jaxlab.rl.llm.base_corpus.LongCoTIterator`), Kimi k1.5's long-CoT
warm-up (section 2.2). ``clip_eps_high`` and ``dynamic_sampling`` are DAPO's
options of the GRPO loss (Yu et al. 2025).

``init_from``: the policy is a Hugging Face checkpoint folder's model (architecture and weights, read by
:func:`jaxlab.models.lm_training.load_for_training`, the loader of ``jaxlab train lm --init-from``) instead of a
freshly initialised small LM, and the task is posed in its vocabulary (:class:`~jaxlab.rl.llm.task.TextTask`:
the problem's text through the checkpoint's tokenizer, optionally inside its chat template; responses decoded
and verified on the text; SFT's targets the answer's tokens then the tokenizer's EOS). Every method runs from
it (SFT, DPO, GRPO, and PPO-RLHF, whose reward model and critic are the checkpoint with a scalar head), and
the final policy is written back as a Hugging Face folder, ``out_dir/hf``, loadable by
:func:`jaxlab.models.hub.load_pretrained` and ``transformers``.

Every stage is the training spine unchanged: each method's step is ``train_step(state, batch, key)``
(:func:`jaxlab.train_state.make_train_step`, or the spine's ``loss_and_grads`` and ``apply_update`` in a
``lax.scan`` for the several epochs of GRPO and PPO), passed to ``fit`` as it is, and every stage's
optimizer is :func:`jaxlab.optim.make_optimizer` of :func:`stage_optimizer_config` (clip the global norm
to 1, then Adam with ``b2 = 0.999``, ``eps = 1e-8`` at a constant learning rate). The frozen parameters a step
reads (the SFT reference of GRPO and PPO-RLHF, PPO's reward model) travel in its batch: the stage's data
iterator adds them (:class:`WithFrozen`). They are inputs of the compiled step rather than constants
closed over (which would bake them into the program), and the loop checkpoints only the train state and
the data position, never a batch, so they cost nothing on disk.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxlab.loop import ArrayIterator, DataIterator, LoopConfig, fit
from jaxlab.metrics import to_jsonable
from jaxlab.models.lm import LM, LMConfig, init_params, param_logical_axes
from jaxlab.models.lm_training import load_for_training
from jaxlab.models.sampling import response_logprobs, sample
from jaxlab.optim import OptimizerConfig, make_optimizer, muon_dimensions
from jaxlab.parallel.mesh import format_mesh, mesh_from_spec, replicated, shard_batch
from jaxlab.parallel.rules import check_mesh_for, rules_for_mesh, tensor_axes
from jaxlab.parallel.strategies import shard_train_state, state_shardings
from jaxlab.rl.llm.base_corpus import CorpusIterator, LongCoTIterator, make_pretrain_step
from jaxlab.rl.llm.dpo import make_dpo_step, preference_pairs
from jaxlab.rl.llm.grpo import make_grpo_step
from jaxlab.rl.llm.long2short import long2short_data
from jaxlab.rl.llm.losses import sequence_kl
from jaxlab.rl.llm.partial_rollout import with_rollout_pool
from jaxlab.rl.llm.posttrain_config import METHODS, PostTrainConfig
from jaxlab.rl.llm.ppo_rlhf import make_ppo_rlhf_step
from jaxlab.rl.llm.reasoning_task import ThinkTask
from jaxlab.rl.llm.reward_model import (init_reward_params, make_reward_model_step, normalize_reward, pair_accuracy,
                                        sequence_scores)
from jaxlab.rl.llm.sft import make_sft_step
from jaxlab.rl.llm.stage_data import GRPOHost, ProblemIterator, ProblemPool, WithFrozen
from jaxlab.rl.llm.task import Task, TextTask
from jaxlab.train_state import create_train_state
from jaxlab.xla_options import FAST_COMPILE

__all__ = ["METHODS", "PostTrainConfig", "ProblemIterator", "ProblemPool", "WithFrozen", "evaluate_policy",
           "posttrain", "stage_optimizer_config"]

# Key streams: every key of a run is fold_in(PRNGKey(seed), stream).
_INIT, _SFT_DATA, _SFT_KEY, _PAIRS, _RL_DATA, _RL_KEY, _EVAL, _RM_KEY, _RM_EVAL, _RM_NORM, _POOL = range(11)
_BASE_DATA, _BASE_KEY = 110, 111  # the pretraining stage's corpus and train state, apart from the streams above
_LONG2SHORT = 100  # apart from the streams above, so that streams added there never collide with it


def stage_optimizer_config(lr: float, algorithm: str = "adam") -> OptimizerConfig:
    """The optimizer of every stage: clip the global gradient norm to 1, then Adam (b1 0.9, b2 0.999,
    eps 1e-8) at the constant learning rate ``lr``; ``algorithm="muon"``: Muon on the hidden matrices at
    Adam's update RMS (Moonlight), Adam on the rest."""
    return OptimizerConfig(lr=lr, algorithm=algorithm, b2=0.999, eps=1e-8, clip_norm=1.0)


def _stage_shapes(kind: str, model_cfg: LMConfig):
    """Shapes of a stage's trained parameters (the structure of :func:`stage_param_axes`)."""
    lm = jax.eval_shape(lambda: init_params(LM(model_cfg), jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    reward = {"lm": lm, "head": {"w": jax.ShapeDtypeStruct((model_cfg.d_model,), jnp.float32),
                                 "b": jax.ShapeDtypeStruct((), jnp.float32)}}
    return {"reward_model": reward, "ppo-rlhf": {"policy": lm, "value": reward}}.get(kind, lm)


# One optimizer object per stage configuration: a train state holds its optimizer as static data, so jitted
# steps hit their cache only when it is the same object.
@functools.lru_cache(maxsize=16)
def _optimizer(kind: str, model_cfg: LMConfig, opt_cfg: OptimizerConfig):
    if opt_cfg.algorithm != "muon":
        return make_optimizer(opt_cfg)
    dims = muon_dimensions(stage_param_axes(kind, model_cfg), _stage_shapes(kind, model_cfg))
    return make_optimizer(opt_cfg, muon_dims=dims)


def _build_step(kind: str, model_cfg: LMConfig, task: Task | TextTask, spec, opt_cfg: OptimizerConfig,
                grad_accum: int = 1):
    """A stage's step; GRPO's and PPO's ``spec`` carry their ``grad_accum``, the others take ``grad_accum``."""
    model, tx = LM(model_cfg), _optimizer(kind, model_cfg, opt_cfg)
    build = {"pretrain": lambda: make_pretrain_step(model, tx, grad_accum),
             "sft": lambda: make_sft_step(model, tx, grad_accum, task.eos_id),
             "grpo": lambda: make_grpo_step(model, task, spec, tx),
             "ppo-rlhf": lambda: make_ppo_rlhf_step(model, task, spec, tx),
             "dpo": lambda: make_dpo_step(model, tx, task.prompt_len, *spec, grad_accum=grad_accum),
             "reward_model": lambda: make_reward_model_step(model, tx, grad_accum)}[kind]
    return build()


@functools.lru_cache(maxsize=16)
def _jit_step(kind: str, model_cfg: LMConfig, task: Task, spec, opt_cfg: OptimizerConfig, grad_accum: int = 1,
              fast_compile: bool = False):
    return jax.jit(_build_step(kind, model_cfg, task, spec, opt_cfg, grad_accum), donate_argnums=0,
                   compiler_options=FAST_COMPILE if fast_compile else None)


class _OnMesh:
    """A data iterator whose batches are placed on ``mesh``: row arrays split over ``data``, the frozen
    parameters (``frozen`` keys) replicated."""

    def __init__(self, data: DataIterator, mesh, frozen: tuple[str, ...] = ("ref_params", "reward_params")):
        self.data, self.mesh, self.frozen = data, mesh, frozen
        self._placed: dict[str, tuple[int, object]] = {}  # frozen parameters are placed once

    def __iter__(self):
        return self

    def _replicated(self, name: str, value):
        if name not in self._placed or self._placed[name][0] != id(value):
            self._placed[name] = (id(value), jax.device_put(value, replicated(self.mesh)))
        return self._placed[name][1]

    def __next__(self) -> dict:
        batch = next(self.data)
        rows = {k: v for k, v in batch.items() if k not in self.frozen}
        frozen = {k: self._replicated(k, v) for k, v in batch.items() if k in self.frozen}
        return {**shard_batch(rows, self.mesh), **frozen}

    def get_state(self) -> dict:
        return self.data.get_state()

    def set_state(self, state: dict) -> None:
        self.data.set_state(state)


def stage_param_axes(kind: str, model_cfg: LMConfig):
    """Logical axes of a stage's trained parameters: the LM's (SFT, DPO, GRPO), the reward model's
    ``{"lm", "head"}`` and PPO-RLHF's ``{"policy": LM, "value": reward model}``."""
    lm = param_logical_axes(LM(model_cfg))
    reward = {"lm": lm, "head": {"w": PartitionSpec("embed"), "b": PartitionSpec()}}
    return {"reward_model": reward, "ppo-rlhf": {"policy": lm, "value": reward}}.get(kind, lm)


def _mesh_stage(kind: str, model_cfg: LMConfig, task: Task, spec, opt_cfg: OptimizerConfig, state, mesh,
                strategy: str, grad_accum: int = 1, fast_compile: bool = False):
    """A stage's state laid out on ``mesh`` by ``strategy`` (ZeRO over ``data``; with a ``model`` axis the
    parameters split by their logical axes) and its step compiled to keep that layout: the partitioner
    splits the work by the batch rows and, on ``model``, by heads and hidden units (the LM's logical
    constraints resolve on the mesh while the step traces)."""
    axes = stage_param_axes(kind, model_cfg) if tensor_axes(mesh) else None
    rules = rules_for_mesh(mesh)
    if axes is not None and model_cfg.vocab_size % mesh.shape.get("model", 1):
        # a task's vocabulary is a handful of tokens: the embedding stays whole rather than split unevenly
        axes = jax.tree.map(lambda spec: PartitionSpec(*(None if n == "vocab" else n for n in spec)), axes,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))
        rules = tuple((name, None if name == "vocab" else axis) for name, axis in rules)
    if axes is not None:
        check_mesh_for(mesh, params=state.params, param_axes=axes)
    state = shard_train_state(state, mesh, strategy, param_axes=axes)
    shardings = state_shardings(state, mesh, strategy, param_axes=axes)
    inner = _build_step(kind, model_cfg, task, spec, opt_cfg, grad_accum)

    def step(state, batch, key):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return inner(state, batch, key)

    step = jax.jit(step, donate_argnums=0, out_shardings=(shardings, replicated(mesh)),
                   compiler_options=FAST_COMPILE if fast_compile else None)
    return state, step


@functools.lru_cache(maxsize=16)
def _eval_fn(model_cfg: LMConfig, task: Task | TextTask, max_new_tokens: int, fast_compile: bool):
    model = LM(model_cfg)

    def run(params, ref_params, prompts, answers, key):
        prompt_len = prompts.shape[1]
        out = {}
        for name, temperature in (("", 1.0), ("greedy_", 0.0)):
            roll = sample(model, params, prompts, key, max_new_tokens, temperature=temperature, eos_id=task.eos_id,
                          pad_id=task.pad_id)
            correct, well_formed = task.verify(roll.response, answers)  # [n] each, one verifier pass
            out[f"{name}accuracy"] = jnp.mean(correct)
            out[f"{name}response_length"] = jnp.mean(task.response_lengths(roll.response))
            out[f"{name}format"] = jnp.mean(well_formed)
            if isinstance(task, ThinkTask):  # the share of responses reasoning in column steps
                out[f"{name}think_steps"] = jnp.mean(task.writes_steps(roll.response))
            if temperature:
                ref_logp = response_logprobs(model, ref_params, roll.tokens, prompt_len)
                out["kl_to_ref"] = sequence_kl(roll.model_logps, ref_logp, roll.mask)
        return out

    return jax.jit(run, compiler_options=FAST_COMPILE if fast_compile else None)


def evaluate_policy(model: LM, params, ref_params, prompts, answers, key, max_new_tokens: int,
                    task: Task | TextTask | None = None, fast_compile: bool = False) -> dict[str, float]:
    """Verifier accuracy, response length and format rate of sampled (T = 1) and greedy (``greedy_*``) answers,
    and ``kl_to_ref``: the sequence KL ``E_pi[log pi - log pi_ref]`` estimated on the samples. ``task``: whose
    verifier and EOS (None: the character task's); ``fast_compile``: compiled under ``FAST_COMPILE``."""
    out = _eval_fn(model.cfg, Task() if task is None else task, max_new_tokens, fast_compile)(
        params, ref_params, prompts, answers, key)
    return {k: float(v) for k, v in jax.device_get(out).items()}


# ---- the driver ----------------------------------------------------------------------------------------
def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message)


def _local(tree):
    """Arrays of a (possibly mesh-sharded) stage result as one-device arrays: the frozen parameters and
    starting points of later stages."""
    spread = any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))
    return jax.device_put(tree, jax.devices()[0]) if spread else tree


def _copy(tree):
    """Fresh buffers (a stage's state is donated to its step; the reference must survive)."""
    return jax.tree.map(jnp.copy, tree)


def _eval_records(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}}
            for r in records if any(k.startswith("eval/") for k in r)]


def posttrain(cfg: PostTrainConfig, out_dir: str | pathlib.Path) -> dict:
    """Run (or resume) SFT and then ``cfg.method`` under ``out_dir``; returns a summary dict.

    With ``cfg.pretrain_steps``, a ``pretrain/`` stage first trains the initial model on the task's base corpus
    (:mod:`jaxlab.rl.llm.base_corpus`) and the summary's ``base`` is that base model's evaluation.
    The summary holds the SFT start's evaluation (``sft``), the final one (``final``), the method stage's
    evaluations over its steps (``history``, ``[{"step", "accuracy", ...}]``) and the run's timing; with
    ``cfg.problem_pool``, ``problem_pool``: the pool's attempts and success rate, and per difficulty level
    (``levels``) the start policy's sampled accuracy on the pool's problems of that level (``start_accuracy``)
    and the run's ``attempts`` and ``success_rate``; with
    ``cfg.init_from``, ``exported``: the Hugging Face folder of the final policy (``out_dir/hf``).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"config-{cfg.method}.json").write_text(json.dumps(to_jsonable(cfg), indent=2))
    start = time.perf_counter()
    base = jax.random.PRNGKey(cfg.seed)
    stream = lambda s: jax.random.fold_in(base, s)  # noqa: E731
    if cfg.init_from is None:
        task, model_cfg, tokenizer = cfg.task_spec, cfg.model_config(), None
        model, init = LM(model_cfg), None
    else:
        model, init, tokenizer = load_for_training(cfg.init_from, context=1)
        task, model_cfg = TextTask(cfg.task, cfg.num_digits, tokenizer, cfg.prompt_format), model.cfg
        need = task.prompt_len + cfg.response_len_for(task)
        if need > model_cfg.max_len:
            raise ValueError(f"prompts of {task.prompt_len} tokens + max_new_tokens={cfg.response_len_for(task)} "
                             f"exceed the checkpoint's context of {model_cfg.max_len} tokens ({cfg.init_from})")
    response_len = cfg.response_len_for(task)
    if response_len < task.answer_len:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens} is shorter than the longest answer "
                         f"({task.answer_len} tokens with EOS)")
    eval_prompts, eval_answers = task.sample(stream(_EVAL), cfg.eval_problems)
    eval_key = jax.random.fold_in(stream(_EVAL), 1)
    if init is None:
        init = init_params(model, stream(_INIT), eval_prompts[:1])
    else:
        _log(f"init from {cfg.init_from}: {model_cfg.num_layers} layers, d_model={model_cfg.d_model}; prompts of "
             f"{task.prompt_len} tokens ({cfg.prompt_format}), e.g. {tokenizer.decode(eval_prompts[0])!r}")

    mesh = mesh_from_spec(cfg.mesh)
    if mesh.size > 1:
        _log(f"mesh: {format_mesh(mesh)}, strategy {cfg.strategy}")

    def stage(kind, spec, opt, state):
        """The stage's (state, step): on one device the cached jitted step, else laid out on the mesh."""
        if mesh.size == 1:
            return state, _jit_step(kind, model_cfg, task, spec, opt, cfg.grad_accum, cfg.fast_compile)
        return _mesh_stage(kind, model_cfg, task, spec, opt, state, mesh, cfg.strategy, cfg.grad_accum,
                           cfg.fast_compile)

    def evaluate(params, ref_params) -> dict[str, float]:
        """The fixed evaluation set's metrics of ``params`` (KL to ``ref_params``)."""
        return evaluate_policy(model, params, ref_params, eval_prompts, eval_answers, eval_key, response_len, task,
                               cfg.fast_compile)

    def pool_accuracy_by_level(params, pool: ProblemPool) -> list[float | None]:
        """Sampled accuracy of ``params`` on the pool's problems of each difficulty level (None: a level the pool
        lacks): the curriculum's premise, that the start policy solves easy levels more often. Each level's
        problems are cycled to ``eval_problems`` rows, the evaluation's own shape (one compiled program)."""
        levels = np.asarray(pool.levels)
        out = []
        for level in range(pool.num_levels):
            idx = np.flatnonzero(levels == level)
            if not len(idx):
                out.append(None)
                continue
            idx = np.resize(idx, cfg.eval_problems)  # [eval_problems]
            out.append(evaluate_policy(model, params, params, pool.prompts[idx], pool.answers[idx], eval_key,
                                       response_len, task, cfg.fast_compile)["accuracy"])
        return out

    def run_stage(name, train_step, state, data, steps, ref=None, pool=None):
        if mesh.size > 1:
            data = _OnMesh(data, mesh)
        host = None
        if name == "grpo" and (pool is not None or cfg.log_rollouts):
            train_step = host = GRPOHost(train_step, task, cfg.group_size, pool, out_dir / name / "rollouts.jsonl",
                                          cfg.log_rollouts)
        loop = LoopConfig(num_steps=steps, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                          resume=cfg.resume, progress=cfg.progress, skip_nonfinite=cfg.skip_nonfinite)
        eval_fn = None if ref is None else (lambda s: evaluate(
            _local(s.params["policy"] if name == "ppo-rlhf" else s.params), ref))
        try:
            result = fit(train_step, state, data, loop, out_dir / name, eval_fn=eval_fn, eval_every=cfg.eval_every)
        finally:
            if host is not None:
                host.close()
        if result.resumed_from is not None:
            _log(f"{name}: resumed from step {result.resumed_from}")
        return result

    # Stage 0: the base model, pretrained on the task's corpus (none with pretrain_steps=0).
    base_eval, preempted = None, False
    if cfg.pretrain_steps:
        opt = stage_optimizer_config(cfg.pretrain_lr, cfg.optimizer)
        state, step = stage("pretrain", None, opt, create_train_state(init, _optimizer("pretrain", model_cfg, opt),
                                                                      stream(_BASE_KEY)))
        corpus = CorpusIterator(task, cfg.pretrain_batch_size, model_cfg.max_len, stream(_BASE_DATA),
                                checks=cfg.corpus_checks, slips=cfg.corpus_slips, rechecks=cfg.corpus_rechecks)
        pre = run_stage("pretrain", step, state, corpus, cfg.pretrain_steps)
        init, preempted = _local(pre.state.params), pre.preempted
        base_eval = evaluate(init, init)
        _log(f"base model: pass@1 {base_eval['accuracy']:.3f} (greedy {base_eval['greedy_accuracy']:.3f}), format "
             f"{base_eval['format']:.3f}")

    # Stage 1: supervised warm start (shared by every method run in this folder; none with sft_steps=0).
    if cfg.sft_steps and not preempted:
        opt = stage_optimizer_config(cfg.sft_lr, cfg.optimizer)
        state, step = stage("sft", None, opt, create_train_state(init, _optimizer("sft", model_cfg, opt),
                                                                 stream(_SFT_KEY)))
        data = (LongCoTIterator(task, cfg.sft_batch_size, stream(_SFT_DATA), cfg.corpus_checks, cfg.corpus_slips,
                                cfg.corpus_rechecks) if cfg.sft_long_cot
                else ProblemIterator(task, cfg.sft_batch_size, stream(_SFT_DATA)))
        sft = run_stage("sft", step, state, data, cfg.sft_steps)
        ref, resumed_from, preempted = _local(sft.state.params), sft.resumed_from, sft.preempted
    else:
        ref, resumed_from = init, None
    sft_eval = evaluate(ref, ref)
    _log(f"sft: accuracy {sft_eval['accuracy']:.3f} (greedy {sft_eval['greedy_accuracy']:.3f})")
    summary = {"method": cfg.method, "sft": sft_eval, "history": [], "resumed_from": resumed_from}
    if base_eval is not None:
        summary["base"] = base_eval
    final_params = ref

    def new_stage(params, lr: float, kind: str, spec=None):
        """A method stage's fresh state and its jitted step."""
        opt = stage_optimizer_config(lr, cfg.optimizer)
        state = create_train_state(params, _optimizer(kind, model_cfg, opt), stream(_RL_KEY))
        if kind == "grpo" and spec.rollout_budget:  # the rollouts in flight live in the (checkpointed) state
            state = with_rollout_pool(state, model, task, spec, cfg.batch_size)
        return stage(kind, spec, opt, state)

    def run_long2short(params):
        """Kimi k1.5's long2short (section 2.4) on ``params`` in the ``long2short-<mode>/`` stage (one folder per
        mode, so both modes can shorten the same GRPO policy of one output folder): (params, preempted, info)."""
        before = evaluate(params, ref)
        data = long2short_data(model, params, task, stream(_LONG2SHORT), cfg.pair_prompts, cfg.long2short_samples,
                               response_len, cfg.long2short, temperature=cfg.temperature)
        count = len(next(iter(data.values())))
        info = {"mode": cfg.long2short, "problems": cfg.pair_prompts, "samples": cfg.long2short_samples,
                "examples": count, "before": before}
        _log(f"long2short ({cfg.long2short}): {count} {'pairs' if cfg.long2short == 'dpo' else 'examples'} from "
             f"{cfg.pair_prompts} problems' {cfg.long2short_samples} samples")
        rows = cfg.grad_accum * int(mesh.shape.get("data", 1))  # a batch splits over both evenly
        wanted = cfg.sft_batch_size if cfg.long2short == "rejection" else cfg.batch_size
        batch = min(wanted, count) // rows * rows
        if batch < 1:
            raise ValueError(f"long2short={cfg.long2short!r}: only {count} usable problems of pair_prompts="
                             f"{cfg.pair_prompts} (a batch needs {rows}: grad_accum times the mesh's data axis); "
                             "raise pair_prompts or long2short_samples")
        if cfg.long2short == "rejection":
            state, step = new_stage(_copy(params), cfg.lr, "sft")
        else:
            state, step = new_stage(_copy(params), cfg.dpo_lr, "dpo", (cfg.dpo_beta, cfg.dpo_loss, cfg.dpo_nll_coef))
        result = run_stage(f"long2short-{cfg.long2short}", step, state, ArrayIterator(data, batch, seed=cfg.seed),
                           cfg.long2short_steps, ref)
        info["batch_size"] = batch
        return _local(result.state.params), result.preempted, info

    if cfg.method == "grpo" and not preempted:
        state, step = new_stage(_copy(ref), cfg.lr, "grpo", cfg.grpo_spec(response_len))
        if cfg.problem_pool:
            problems = ProblemPool(task, cfg.problem_pool, cfg.batch_size, stream(_POOL), stream(_RL_DATA),
                                   cfg.problem_sampling, cfg.steps, cfg.group_size)
            start_by_level = pool_accuracy_by_level(ref, problems)
        else:
            problems = ProblemIterator(task, cfg.batch_size, stream(_RL_DATA))
        result = run_stage("grpo", step, state, WithFrozen(problems, ref_params=ref), cfg.steps, ref,
                           problems if cfg.problem_pool else None)
        final_params, preempted, summary["resumed_from"] = (_local(result.state.params), result.preempted,
                                                            result.resumed_from)
        if cfg.problem_pool:
            summary["problem_pool"] = {"size": cfg.problem_pool, "mode": cfg.problem_sampling,
                                       "attempts": float(jnp.sum(problems.stats.attempts)),
                                       "tried": int(jnp.sum(problems.stats.attempts > 0)),
                                       "success_rate": float(jnp.sum(problems.stats.successes)
                                                             / jnp.maximum(jnp.sum(problems.stats.attempts), 1)),
                                       "levels": {"start_accuracy": start_by_level,
                                                  **problems.stats_by_level()}}
    elif cfg.method in ("dpo", "ppo-rlhf") and not preempted:
        all_pairs = cfg.method == "ppo-rlhf" and cfg.rm_all_pairs
        pairs = preference_pairs(model, ref, task, stream(_PAIRS), cfg.pair_prompts, cfg.group_size,
                                 response_len, all_pairs=all_pairs)
        summary["pairs"] = int(len(pairs["chosen"]))
        _log(f"preference pairs: {summary['pairs']} from {cfg.pair_prompts} prompts' groups of {cfg.group_size}")
        if summary["pairs"] < cfg.batch_size:
            raise ValueError(f"only {summary['pairs']} preference pairs for batch_size={cfg.batch_size}: raise "
                             f"pair_prompts={cfg.pair_prompts} or group_size={cfg.group_size}, or lower batch_size")
        data = ArrayIterator(pairs, cfg.batch_size, seed=cfg.seed)
        if cfg.method == "dpo":
            state, step = new_stage(_copy(ref), cfg.dpo_lr, "dpo", (cfg.dpo_beta, cfg.dpo_loss, cfg.dpo_nll_coef))
            result = run_stage("dpo", step, state, data, cfg.steps, ref)
            final_params = _local(result.state.params)
        else:
            opt = stage_optimizer_config(cfg.rm_lr, cfg.optimizer)
            rm_state, rm_step = stage("reward_model", None, opt, create_train_state(
                init_reward_params(_copy(ref), model_cfg.d_model), _optimizer("reward_model", model_cfg, opt),
                stream(_RM_KEY)))
            rm_batch = cfg.batch_size if cfg.rm_batch_size is None else min(cfg.rm_batch_size, summary["pairs"])
            rm_data = ArrayIterator(pairs, rm_batch, seed=cfg.seed)
            rm = run_stage("reward_model", rm_step, rm_state, rm_data, cfg.rm_steps)
            # How well the learned reward tracks the verifier it stands for: pairs of fresh prompts that no
            # training pair shares.
            heldout = preference_pairs(model, ref, task, stream(_RM_EVAL), cfg.eval_problems, cfg.group_size,
                                       response_len, all_pairs=cfg.rm_all_pairs)
            seen = {p.tobytes() for p in pairs["chosen"][:, :task.prompt_len]}
            fresh = np.array([p.tobytes() not in seen for p in heldout["chosen"][:, :task.prompt_len]], bool)
            heldout = {k: v[fresh] for k, v in heldout.items()}
            summary["reward_model"] = {"train_pairs": summary["pairs"], "heldout_pairs": int(len(heldout["chosen"])),
                                       "heldout_accuracy": pair_accuracy(model, _local(rm.state.params), heldout)
                                       if len(heldout["chosen"]) else None}
            if summary["reward_model"]["heldout_accuracy"] is not None:
                _log(f"reward model: {summary['reward_model']['heldout_accuracy']:.3f} accuracy on "
                     f"{summary['reward_model']['heldout_pairs']} held-out pairs")
            reward_params = _local(rm.state.params)
            if cfg.rm_normalize:  # mean 0, std 1 on the SFT policy's samples of fresh prompts
                norm_key = stream(_RM_NORM)
                prompts, _ = task.sample(norm_key, max(cfg.eval_problems, 256))
                roll = sample(model, ref, prompts, jax.random.fold_in(norm_key, 1), response_len,
                              temperature=cfg.temperature, eos_id=task.eos_id, pad_id=task.pad_id)
                reward_params, summary["reward_model"]["normalization"] = normalize_reward(
                    reward_params, sequence_scores(model, reward_params, roll.tokens, roll.mask))
            state, step = new_stage({"policy": _copy(ref), "value": _copy(reward_params)}, cfg.lr, "ppo-rlhf",
                                cfg.ppo_spec(response_len))
            data = WithFrozen(ProblemIterator(task, cfg.batch_size, stream(_RL_DATA)), ref_params=ref,
                              reward_params=reward_params)
            result = run_stage("ppo-rlhf", step, state, data, cfg.steps, ref)
            final_params = _local(result.state.params["policy"])
        preempted, summary["resumed_from"] = result.preempted, result.resumed_from

    if cfg.long2short != "none" and not preempted:
        final_params, preempted, summary["long2short"] = run_long2short(final_params)

    final = sft_eval if cfg.method == "sft" else evaluate(final_params, ref)
    if "long2short" in summary:
        stage_dir = out_dir / f"long2short-{cfg.long2short}"
        summary["long2short"].update(after=final, history=_eval_records(stage_dir / "metrics.jsonl"))
        _log(f"long2short: mean response length {summary['long2short']['before']['response_length']:.2f} -> "
             f"{final['response_length']:.2f}, accuracy {summary['long2short']['before']['accuracy']:.3f} -> "
             f"{final['accuracy']:.3f}")
    if cfg.method != "sft":
        summary["history"] = _eval_records(out_dir / cfg.method / "metrics.jsonl")
    summary.update(final=final, preempted=preempted, seconds=time.perf_counter() - start,
                   num_params=sum(int(np.prod(p.shape)) for p in jax.tree.leaves(ref)))
    _log(f"{cfg.method}: accuracy {final['accuracy']:.3f} (greedy {final['greedy_accuracy']:.3f}), "
         f"KL to the reference {final['kl_to_ref']:.3f} nats")
    if tokenizer is not None and not preempted:  # back to the checkpoint's format, loadable by transformers
        from jaxlab.models.hub import save_pretrained

        save_pretrained(model, final_params, out_dir / "hf", tokenizer)
        summary["exported"] = str(out_dir / "hf")
        _log(f"final policy written to {summary['exported']}")
    (out_dir / f"summary-{cfg.method}.json").write_text(json.dumps(to_jsonable(summary), indent=2))
    return summary
