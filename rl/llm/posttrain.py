"""The post-training driver: SFT, then DPO, PPO-RLHF (reward model, then PPO) or GRPO, resumable.

    cfg = PostTrainConfig(method="grpo", steps=100)          # `jaxlab train posttrain --method grpo`
    summary = posttrain(cfg, "runs/posttrain")
    cfg = PostTrainConfig(method="grpo", init_from="ckpt/")  # `... --init-from ckpt/`: a Hugging Face folder

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

import dataclasses
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
from jaxlab.models.lm_training import check_architecture_unset, load_for_training
from jaxlab.models.sampling import response_logprobs, sample
from jaxlab.optim import OptimizerConfig, make_optimizer, muon_dimensions
from jaxlab.rl.llm.dpo import make_dpo_step, preference_pairs
from jaxlab.rl.llm.grpo import GRPO_LOSSES, GRPOSpec, make_grpo_step
from jaxlab.rl.llm.losses import AGGREGATIONS, DPO_LOSSES, sequence_kl
from jaxlab.rl.llm.ppo_rlhf import PPOSpec, make_ppo_rlhf_step
from jaxlab.rl.llm.problem_sampling import MODES as SAMPLING_MODES
from jaxlab.rl.llm.reward_model import (init_reward_params, make_reward_model_step, normalize_reward, pair_accuracy,
                                        sequence_scores)
from jaxlab.rl.llm.sft import make_sft_step
from jaxlab.rl.llm.stage_data import GRPOHost, ProblemIterator, ProblemPool, WithFrozen
from jaxlab.rl.llm.task import PROMPT_FORMATS, TASKS, VOCAB_SIZE, Task, TextTask
from jaxlab.train_state import create_train_state
from jaxlab.parallel.mesh import format_mesh, mesh_from_spec, parse_mesh, replicated, shard_batch
from jaxlab.parallel.rules import check_mesh_for, rules_for_mesh, tensor_axes
from jaxlab.parallel.strategies import STRATEGIES, shard_train_state, state_shardings
from jaxlab.validation import check, check_choice, check_greater, check_positive
from jaxlab.xla_options import FAST_COMPILE

__all__ = ["METHODS", "PostTrainConfig", "ProblemIterator", "ProblemPool", "WithFrozen", "evaluate_policy",
           "posttrain", "stage_optimizer_config"]

METHODS = ("sft", "dpo", "ppo-rlhf", "grpo")
ARCHITECTURE_FIELDS = ("d_model", "num_layers", "num_heads")
"""PostTrainConfig fields that a checkpoint (``init_from``) decides."""
# Key streams: every key of a run is fold_in(PRNGKey(seed), stream).
_INIT, _SFT_DATA, _SFT_KEY, _PAIRS, _RL_DATA, _RL_KEY, _EVAL, _RM_KEY, _RM_EVAL, _RM_NORM, _POOL = range(11)


@dataclasses.dataclass(frozen=True)
class PostTrainConfig:
    """Post-training of a small LM on a verifiable task: model, SFT stage, method stage, logging."""

    method: str = "grpo"
    """sft | dpo | ppo-rlhf | grpo (every method starts from the SFT stage)."""
    task: str = "add"
    """Verifiable task: add (sum of two numbers) | sort (sort digits)."""
    num_digits: int = 2
    """Digits per operand (add) or list length (sort)."""
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    sft_steps: int = 200
    """Steps of the SFT stage (kept short: a low but non-zero accuracy leaves room for RL; 0: no SFT, the
    method starts from the initial model, which is then also the reference)."""
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    steps: int = 100
    """Steps of the method's stage (DPO / PPO / GRPO); unused by sft."""
    batch_size: int = 16
    """Prompts per RL step (each sampled group_size times), or preference pairs per DPO step."""
    group_size: int = 8
    """Samples per prompt: GRPO's group, PPO-RLHF's samples per prompt, DPO's candidates per prompt."""
    lr: float = 3e-4
    """Adam learning rate of the RL stages (GRPO, PPO-RLHF)."""
    max_new_tokens: int | None = None
    """Response budget R (None: the longest answer plus EOS plus 2)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    clip_eps: float = 0.2
    beta: float = 0.04
    """GRPO's KL coefficient (k3 estimator)."""
    aggregation: str = "token-mean"
    """GRPO loss reduction: token-mean | sequence-mean | constant-norm (Dr. GRPO)."""
    scale_rewards: bool = True
    """GRPO: divide advantages by the group's std (False: Dr. GRPO)."""
    ppo_epochs: int = 2
    """Gradient steps per batch of samples (GRPO and PPO)."""
    format_weight: float = 0.0
    """Extra reward for a well-formed response (digits then EOS)."""
    loss: str = "grpo"
    """The GRPO stage's objective: grpo | mirror-descent (Kimi k1.5's online policy mirror descent)."""
    optimizer: str = "adam"
    """Every stage's optimizer: adam | muon (Newton-Schulz orthogonalised momentum on the hidden matrices at
    Adam's update RMS, Moonlight; Adam on embeddings, norms and heads)."""
    mirror_tau: float = 0.5
    """Mirror descent's tau (the squared log-ratio tether to the sampling policy)."""
    length_penalty: float = 0.0
    """Weight of Kimi k1.5's length reward (GRPO)."""
    dpo_lr: float = 1e-4
    """Adam learning rate of DPO."""
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"
    """sigmoid | ipo | hinge."""
    dpo_nll_coef: float = 1.0
    """Weight of the chosen answers' NLL added to the DPO loss (RPO, Pang et al. 2024; 0: plain DPO)."""
    pair_prompts: int = 1024
    """Prompts sampled to build preference pairs (DPO and the reward model)."""
    rm_steps: int = 150
    """Steps of the reward model stage (ppo-rlhf)."""
    rm_lr: float = 1e-3
    rm_batch_size: int | None = None
    """Preference pairs per reward-model step (None: batch_size)."""
    rm_all_pairs: bool = False
    """Train (and check) the reward model on every right/wrong pair of each sampled group (InstructGPT's
    ``K choose 2`` comparisons per prompt); False: one pair per prompt, DPO's pairs."""
    rm_normalize: bool = True
    """Rescale the reward model so that the SFT policy's samples score mean 0, std 1 before PPO (Ziegler et
    al. 2019): the KL penalty then weighs against rewards of unit scale whatever the reward model's."""
    kl_coef: float = 0.2
    """PPO-RLHF's per-token KL penalty coefficient (a learned reward near chance is over-optimised fast:
    a firm penalty keeps the policy near the reference)."""
    vf_coef: float = 0.5
    gae_lambda: float = 0.95
    eval_problems: int = 256
    """Size of the fixed evaluation set."""
    eval_every: int = 25
    log_every: int = 5
    checkpoint_every: int = 50
    seed: int = 0
    resume: bool = True
    """Continue from the latest checkpoints in the output folder."""
    progress: bool = True
    skip_nonfinite: bool = False
    """Skip steps with a non-finite loss or gradient (counted in the metrics) instead of stopping the run."""
    init_from: str | None = None
    """Start from a Hugging Face checkpoint folder (Llama, Qwen2, Mistral, GPT-2: config.json, *.safetensors,
    tokenizer.json with an eos_token): its architecture and weights, the problems as text through its tokenizer,
    responses verified on their decoded text. The architecture flags (--d-model, --num-layers, --num-heads) keep
    their defaults; the final policy is written to OUT/hf in the same format."""
    prompt_format: str = "plain"
    """With init_from: plain (the tokenizer's leading special tokens, then the problem, "07+35=") | chat (the
    checkpoint's chat template around the problem as a user message, with the generation prompt)."""
    mesh: str | None = None
    """Device mesh of the stages, "data=N" or "data=N,model=M" (None: every device on data). Each step's batch
    rows are split over data; model splits the trained parameters Megatron-style (heads, MLP units, vocabulary:
    the LM's logical axes); the frozen reference and reward model are replicated."""
    strategy: str = "ddp"
    """How the trained state is split over the data axis: ddp | zero1 | zero2 | zero3."""
    grad_accum: int = 1
    """Microbatches per optimizer step in every stage (SFT, reward model, DPO, and each GRPO/PPO epoch), their
    gradients accumulated in one jitted step (weighted by the terms each loss averages: the whole batch's
    gradient); divides sft_batch_size, batch_size and batch_size * group_size."""
    problem_sampling: str = "uniform"
    """GRPO: how each step's problems are drawn from the pool (Kimi k1.5): uniform | curriculum (one more
    difficulty level opened per 1/num_digits of the steps; task add: a problem's level is its larger operand's
    digits minus 1) | prioritized (in proportion to 1 - the problem's success rate so far) |
    curriculum+prioritized. Every mode but uniform needs problem_pool."""
    problem_pool: int = 0
    """GRPO: problems in a fixed pool drawn once from the seed (add: levels equally often), whose per-problem
    success counts are kept and checkpointed (0: fresh problems every step, no pool)."""
    log_rollouts: int = 0
    """GRPO: write up to this many rollouts per step (prompt and response text, reward, correct, length) to
    OUT/grpo/rollouts.jsonl (a resumed run drops the lines past its checkpoint first, as metrics.jsonl)."""

    def __post_init__(self):
        choices = {"method": METHODS, "task": TASKS, "aggregation": AGGREGATIONS, "dpo_loss": DPO_LOSSES,
                   "loss": GRPO_LOSSES, "optimizer": ("adam", "muon"), "prompt_format": PROMPT_FORMATS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        check_positive(self, "sft_steps", minimum=0, integer=True)
        check_positive(self, "num_digits", "d_model", "num_layers", "num_heads", "sft_batch_size", "steps",
                       "batch_size", "ppo_epochs", "pair_prompts", "rm_steps", "eval_problems", "eval_every",
                       "log_every", "checkpoint_every", integer=True)
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size!r} must be >= 2")
        check_greater(self, "sft_lr", "lr", "dpo_lr", "rm_lr", "temperature", "clip_eps", "dpo_beta", "vf_coef",
                      "mirror_tau")
        check_positive(self, "beta", "format_weight", "length_penalty", "kl_coef", "dpo_nll_coef", minimum=0)
        if not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gae_lambda={self.gae_lambda!r} must be in [0, 1]")
        if self.rm_batch_size is not None and self.rm_batch_size < 1:
            raise ValueError(f"rm_batch_size={self.rm_batch_size!r} must be None or >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be None or >= 1")
        if self.response_len < self.task_spec.answer_len:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} is shorter than the longest answer "
                             f"({self.task_spec.answer_len} tokens with EOS)")
        check_choice(self, "strategy", tuple(STRATEGIES))
        check_positive(self, "grad_accum", integer=True)
        for name, rows in (("sft_batch_size", self.sft_batch_size), ("batch_size", self.batch_size),
                           ("rm_batch_size", self.rm_batch_size or self.batch_size)):
            check(rows % self.grad_accum == 0, f"{name}={rows} must be divisible by grad_accum={self.grad_accum}")
        if self.mesh is not None and set(parse_mesh(self.mesh)) - {"data", "model"}:
            raise ValueError(f"mesh={self.mesh!r}: post-training stages run on the data and model axes only "
                             "(e.g. 'data=4,model=2')")
        self.model_config()  # validates d_model vs num_heads
        check_architecture_unset(self, ARCHITECTURE_FIELDS)
        check_choice(self, "problem_sampling", SAMPLING_MODES)
        check_positive(self, "problem_pool", "log_rollouts", minimum=0, integer=True)
        for name, unset in (("problem_sampling", "uniform"), ("problem_pool", 0), ("log_rollouts", 0)):
            check(self.method == "grpo" or getattr(self, name) == unset,
                  f"{name}={getattr(self, name)!r} is for method='grpo' (method={self.method!r})")
        check(self.problem_sampling == "uniform" or self.problem_pool > 0,
              f"problem_sampling={self.problem_sampling!r} draws from a pool: set problem_pool > 0 (got 0)")
        check("curriculum" not in self.problem_sampling or self.task == "add",
              f"problem_sampling={self.problem_sampling!r} needs difficulty levels, which task={self.task!r} lacks "
              "(only 'add' has them: the larger operand's digits)")
        if self.prompt_format != "plain" and self.init_from is None:
            raise ValueError(f"prompt_format={self.prompt_format!r} needs init_from (a checkpoint's tokenizer)")

    # ---- derived values -------------------------------------------------------------------------
    @property
    def task_spec(self) -> Task:
        return Task(self.task, self.num_digits)

    @property
    def response_len(self) -> int:
        return self.response_len_for(self.task_spec)

    def response_len_for(self, task: Task | TextTask) -> int:
        """The response budget R on ``task`` (its answers' tokens plus EOS plus 2, unless max_new_tokens)."""
        return task.answer_len + 2 if self.max_new_tokens is None else self.max_new_tokens

    def model_config(self) -> LMConfig:
        return LMConfig(vocab_size=VOCAB_SIZE, d_model=self.d_model, num_layers=self.num_layers,
                        num_heads=self.num_heads, max_len=self.task_spec.prompt_len + self.response_len)

    def grpo_spec(self, response_len: int | None = None) -> GRPOSpec:
        return GRPOSpec(self.group_size, response_len or self.response_len, self.clip_eps, self.beta,
                        self.aggregation, self.scale_rewards, self.ppo_epochs, self.temperature, self.format_weight,
                        self.length_penalty, self.grad_accum, self.loss, self.mirror_tau,
                        return_rollout=self.problem_pool > 0 or self.log_rollouts > 0)

    def ppo_spec(self, response_len: int | None = None) -> PPOSpec:
        return PPOSpec(self.group_size, response_len or self.response_len, self.clip_eps, self.kl_coef,
                       self.vf_coef, 1.0, self.gae_lambda, self.ppo_epochs, self.temperature, self.grad_accum)


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


def _build_step(kind: str, model_cfg: LMConfig, task: Task | TextTask, spec, opt_cfg: OptimizerConfig, grad_accum: int = 1):
    """A stage's step; GRPO's and PPO's ``spec`` carry their ``grad_accum``, the others take ``grad_accum``."""
    model, tx = LM(model_cfg), _optimizer(kind, model_cfg, opt_cfg)
    build = {"sft": lambda: make_sft_step(model, tx, grad_accum, task.eos_id),
             "grpo": lambda: make_grpo_step(model, task, spec, tx),
             "ppo-rlhf": lambda: make_ppo_rlhf_step(model, task, spec, tx),
             "dpo": lambda: make_dpo_step(model, tx, task.prompt_len, *spec, grad_accum=grad_accum),
             "reward_model": lambda: make_reward_model_step(model, tx, grad_accum)}[kind]
    return build()


@functools.lru_cache(maxsize=16)
def _jit_step(kind: str, model_cfg: LMConfig, task: Task, spec, opt_cfg: OptimizerConfig, grad_accum: int = 1):
    return jax.jit(_build_step(kind, model_cfg, task, spec, opt_cfg, grad_accum), donate_argnums=0,
                   compiler_options=FAST_COMPILE)


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
                strategy: str, grad_accum: int = 1):
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
                   compiler_options=FAST_COMPILE)
    return state, step


@functools.lru_cache(maxsize=16)
def _eval_fn(model_cfg: LMConfig, task: Task | TextTask, max_new_tokens: int):
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
            if temperature:
                ref_logp = response_logprobs(model, ref_params, roll.tokens, prompt_len)
                out["kl_to_ref"] = sequence_kl(roll.model_logps, ref_logp, roll.mask)
        return out

    return jax.jit(run, compiler_options=FAST_COMPILE)


def evaluate_policy(model: LM, params, ref_params, prompts, answers, key, max_new_tokens: int,
                    task: Task | TextTask | None = None) -> dict[str, float]:
    """Verifier accuracy, response length and format rate of sampled (T = 1) and greedy (``greedy_*``) answers,
    and ``kl_to_ref``: the sequence KL ``E_pi[log pi - log pi_ref]`` estimated on the samples. ``task``: whose
    verifier and EOS (None: the character task's)."""
    out = _eval_fn(model.cfg, Task() if task is None else task, max_new_tokens)(params, ref_params, prompts,
                                                                                 answers, key)
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

    The summary holds the SFT start's evaluation (``sft``), the final one (``final``), the method stage's
    evaluations over its steps (``history``, ``[{"step", "accuracy", ...}]``) and the run's timing; with
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
            return state, _jit_step(kind, model_cfg, task, spec, opt, cfg.grad_accum)
        return _mesh_stage(kind, model_cfg, task, spec, opt, state, mesh, cfg.strategy, cfg.grad_accum)

    def run_stage(name, train_step, state, data, steps, ref=None, pool=None):
        if mesh.size > 1:
            data = _OnMesh(data, mesh)
        host = None
        if name == "grpo" and (pool is not None or cfg.log_rollouts):
            train_step = host = GRPOHost(train_step, task, cfg.group_size, pool, out_dir / name / "rollouts.jsonl",
                                          cfg.log_rollouts)
        loop = LoopConfig(num_steps=steps, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                          resume=cfg.resume, progress=cfg.progress, skip_nonfinite=cfg.skip_nonfinite)
        eval_fn = None if ref is None else (lambda s: evaluate_policy(
            model, _local(s.params["policy"] if name == "ppo-rlhf" else s.params), ref, eval_prompts, eval_answers,
            eval_key, response_len, task))
        try:
            result = fit(train_step, state, data, loop, out_dir / name, eval_fn=eval_fn, eval_every=cfg.eval_every)
        finally:
            if host is not None:
                host.close()
        if result.resumed_from is not None:
            _log(f"{name}: resumed from step {result.resumed_from}")
        return result

    # Stage 1: supervised warm start (shared by every method run in this folder; none with sft_steps=0).
    if cfg.sft_steps:
        opt = stage_optimizer_config(cfg.sft_lr, cfg.optimizer)
        state, step = stage("sft", None, opt, create_train_state(init, _optimizer("sft", model_cfg, opt),
                                                                 stream(_SFT_KEY)))
        sft = run_stage("sft", step, state, ProblemIterator(task, cfg.sft_batch_size, stream(_SFT_DATA)),
                        cfg.sft_steps)
        ref, resumed_from, preempted = _local(sft.state.params), sft.resumed_from, sft.preempted
    else:
        ref, resumed_from, preempted = init, None, False
    sft_eval = evaluate_policy(model, ref, ref, eval_prompts, eval_answers, eval_key, response_len, task)
    _log(f"sft: accuracy {sft_eval['accuracy']:.3f} (greedy {sft_eval['greedy_accuracy']:.3f})")
    summary = {"method": cfg.method, "sft": sft_eval, "history": [], "resumed_from": resumed_from}
    final_params = ref

    def new_stage(params, lr: float, kind: str, spec=None):
        """A method stage's fresh state and its jitted step."""
        opt = stage_optimizer_config(lr, cfg.optimizer)
        return stage(kind, spec, opt, create_train_state(params, _optimizer(kind, model_cfg, opt), stream(_RL_KEY)))

    if cfg.method == "grpo" and not preempted:
        state, step = new_stage(_copy(ref), cfg.lr, "grpo", cfg.grpo_spec(response_len))
        if cfg.problem_pool:
            problems = ProblemPool(task, cfg.problem_pool, cfg.batch_size, stream(_POOL), stream(_RL_DATA),
                                   cfg.problem_sampling, cfg.steps, cfg.group_size)
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
                                                             / jnp.maximum(jnp.sum(problems.stats.attempts), 1))}
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

    final = sft_eval if cfg.method == "sft" else evaluate_policy(model, final_params, ref, eval_prompts,
                                                                 eval_answers, eval_key, response_len, task)
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
