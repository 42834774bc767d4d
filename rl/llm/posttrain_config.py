"""The configuration of :func:`jaxlab.rl.llm.posttrain.posttrain` (``jaxlab train posttrain``): one frozen
dataclass whose fields are the CLI's flags, validated on construction, with the stages' derived values (the task,
the response budget, the LM's config, the GRPO and PPO step specs).

    cfg = PostTrainConfig(method="grpo", steps=100)      # `jaxlab train posttrain --method grpo --steps 100`
    cfg.model_config(), cfg.grpo_spec()                  # LMConfig, GRPOSpec
"""

from __future__ import annotations

import dataclasses

from jaxlab.models.lm import LMConfig
from jaxlab.models.lm_training import check_architecture_unset
from jaxlab.parallel.mesh import parse_mesh
from jaxlab.parallel.strategies import STRATEGIES
from jaxlab.rl.llm.base_corpus import checked_length, max_checks
from jaxlab.rl.llm.grpo import GRPO_LOSSES, GRPOSpec
from jaxlab.rl.llm.long2short import LONG2SHORT_MODES
from jaxlab.rl.llm.losses import AGGREGATIONS, DPO_LOSSES
from jaxlab.rl.llm.ppo_rlhf import PPOSpec
from jaxlab.rl.llm.problem_sampling import MODES as SAMPLING_MODES
from jaxlab.rl.llm.reasoning_task import ThinkTask
from jaxlab.rl.llm.task import LEVELLED_TASKS, PROMPT_FORMATS, TASK_NAMES, Task, TextTask, make_task
from jaxlab.validation import check, check_choice, check_greater, check_positive, check_range

__all__ = ["ARCHITECTURE_FIELDS", "METHODS", "PostTrainConfig"]

METHODS = ("sft", "dpo", "ppo-rlhf", "grpo")
ARCHITECTURE_FIELDS = ("d_model", "num_layers", "num_heads")
"""PostTrainConfig fields that a checkpoint (``init_from``) decides."""


@dataclasses.dataclass(frozen=True)
class PostTrainConfig:
    """Post-training of a small LM on a verifiable task: model, SFT stage, method stage, logging."""

    method: str = "grpo"
    """sft | dpo | ppo-rlhf | grpo (every method starts from the SFT stage)."""
    task: str = "add"
    """Verifiable task: add (sum of two numbers) | sort (sort digits) | think-add (addition in DeepSeek-R1-Zero's
    template: the prompt opens <think>, the response reasons and ends </think><answer>SUM</answer>; accuracy and
    format rewards read the tags)."""
    num_digits: int = 2
    """Digits per operand (add, think-add: 2-6) or list length (sort)."""
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    sft_steps: int = 200
    """Steps of the SFT stage (kept short: a low but non-zero accuracy leaves room for RL; 0: no SFT, the
    method starts from the initial model, or the base model with pretrain_steps, which is then also the
    reference)."""
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    pretrain_steps: int = 0
    """Steps of a pretraining stage before SFT (pretrain/): next-token loss on the task's base corpus, which
    teaches the pieces of the task but never a problem with its answer (task think-add only; 0: none, the
    initial model is random). With sft_steps=0 and method=grpo: DeepSeek-R1-Zero, RL straight from the base model."""
    pretrain_batch_size: int = 32
    """Packed rows (of the model's max_len tokens) per pretraining step."""
    pretrain_lr: float = 3e-3
    """Adam learning rate of the pretraining stage."""
    corpus_checks: float = 0.0
    """Share of the base corpus's worked solutions that check their column steps, working them again with the
    operands swapped (Kimi k1.5's overthinking in miniature, for long2short to remove; 0: none, think-add's)."""
    corpus_slips: float = 0.0
    """Share of the checked worked solutions whose first working has a slip (a column's sum one off) that the
    check corrects."""
    corpus_rechecks: float = 0.0
    """Share of the checked worked solutions that check a second time (three workings of the same sum)."""
    sft_long_cot: bool = False
    """SFT on the task's problems answered with the corpus's checks (corpus_checks, corpus_slips, corpus_rechecks):
    Kimi k1.5's long-CoT warm-up (section 2.2), a long model's habits learnt before RL; False: the plain worked
    solutions."""
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
    clip_eps_high: float | None = None
    """GRPO: DAPO's clip-higher, the ratio's upper clip 1 + clip_eps_high (None: 1 + clip_eps, symmetric)."""
    dynamic_sampling: bool = False
    """GRPO: DAPO's dynamic sampling, groups whose rewards are all equal leave the loss and its normaliser."""
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
    length_penalty_warmup: int = 0
    """GRPO: steps at the start of the stage without the length reward (Kimi k1.5, section 2.3.3: standard policy
    optimisation first, then the constant length penalty)."""
    dpo_lr: float = 1e-4
    """Adam learning rate of DPO."""
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"
    """sigmoid | ipo | hinge."""
    dpo_nll_coef: float = 1.0
    """Weight of the chosen answers' NLL added to the DPO loss (RPO, Pang et al. 2024; 0: plain DPO)."""
    pair_prompts: int = 1024
    """Prompts sampled to build preference pairs (DPO and the reward model) and long2short's data."""
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
    fast_compile: bool = False
    """Compile the stages' steps and the evaluation with XLA's backend optimisation off (``FAST_COMPILE``): for
    tests and runs of a few steps only. It compiles about 1.5x faster but runs the sampler's decode loop about 15x
    slower (d_model=64, 128 rows of 64 tokens on one core: 1.04 s against 0.07 s a rollout)."""
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
    difficulty level opened per 1/num_digits of the steps; tasks add and think-add: a problem's level is its
    larger operand's digits minus 1) | prioritized (in proportion to 1 - the problem's success rate so far) |
    curriculum+prioritized. Every mode but uniform needs problem_pool."""
    problem_pool: int = 0
    """GRPO: problems in a fixed pool drawn once from the seed (add: levels equally often), whose per-problem
    success counts are kept and checkpointed (0: fresh problems every step, no pool)."""
    log_rollouts: int = 0
    """GRPO: write up to this many rollouts per step (prompt and response text, reward, correct, length) to
    OUT/grpo/rollouts.jsonl (a resumed run drops the lines past its checkpoint first, as metrics.jsonl)."""
    rollout_budget: int = 0
    """GRPO: partial rollouts (Kimi k1.5, section 2.6.2): each step advances a pool of batch_size groups in flight
    by this many tokens and trains on the groups whose rollouts have all finished; the unfinished ones carry over
    in the checkpointed stage state (a new pool starts once every group is trained on). 0: every step samples its
    batch whole. Not with problem_pool or log_rollouts (they read the step's own problems' rollouts)."""
    long2short: str = "none"
    """After GRPO, shorten the final policy's responses in a long2short-<mode>/ stage (Kimi k1.5, section 2.4), from
    long2short_samples samples of each of pair_prompts fresh problems: none | rejection (shortest rejection
    sampling: SFT at lr on each problem's shortest correct sample) | dpo (DPO at dpo_lr with dpo_beta, dpo_loss
    and dpo_nll_coef: the shortest correct sample chosen, the longest of the wrong ones longer than it and the
    correct ones 1.5 times as long rejected, the GRPO policy the reference)."""
    long2short_samples: int = 8
    """long2short: samples per problem (the paper's n = 8)."""
    long2short_steps: int = 50
    """long2short: steps of the stage (batches of sft_batch_size examples or batch_size pairs, fewer if the
    samples give fewer)."""

    def __post_init__(self):
        choices = {"method": METHODS, "task": TASK_NAMES, "aggregation": AGGREGATIONS, "dpo_loss": DPO_LOSSES,
                   "loss": GRPO_LOSSES, "optimizer": ("adam", "muon"), "prompt_format": PROMPT_FORMATS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        check_positive(self, "sft_steps", "pretrain_steps", minimum=0, integer=True)
        check_positive(self, "pretrain_batch_size", integer=True)
        for name in ("corpus_checks", "corpus_slips", "corpus_rechecks"):
            check_range(self, name, 0.0, 1.0)
            check(getattr(self, name) == 0 or self.pretrain_steps > 0,
                  f"{name}={getattr(self, name)!r} shapes the base corpus: it needs pretrain_steps > 0")
        check(not self.sft_long_cot or (self.corpus_checks > 0 and self.sft_steps > 0),
              f"sft_long_cot=True fine-tunes on checked answers: it needs corpus_checks > 0 and sft_steps > 0 "
              f"(corpus_checks={self.corpus_checks!r}, sft_steps={self.sft_steps!r})")
        for name in ("corpus_slips", "corpus_rechecks"):
            check(getattr(self, name) == 0 or self.corpus_checks > 0,
                  f"{name}={getattr(self, name)!r} shapes the checked worked solutions: it needs corpus_checks > 0")
        check_greater(self, "pretrain_lr")
        check(self.pretrain_steps == 0 or self.task == "think-add",
              f"pretrain_steps={self.pretrain_steps} needs a task with a base corpus: task='think-add' "
              f"(task={self.task!r})")
        check(self.task != "think-add" or self.init_from is None,
              f"task='think-add' is posed in its own character vocabulary, not a checkpoint's (init_from="
              f"{self.init_from!r})")
        if self.clip_eps_high is not None and not self.clip_eps_high > 0:
            raise ValueError(f"clip_eps_high={self.clip_eps_high!r} must be None or > 0")
        check(self.method == "grpo" or (self.clip_eps_high is None and not self.dynamic_sampling),
              f"clip_eps_high={self.clip_eps_high!r} and dynamic_sampling={self.dynamic_sampling!r} are for "
              f"method='grpo' (method={self.method!r})")
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
        checks = max_checks(self.corpus_checks, self.corpus_rechecks)
        if checks and self.response_len < checked_length(self.num_digits, checks):
            raise ValueError(f"max_new_tokens={self.max_new_tokens} is shorter than the longest checked worked answer "
                             f"({checked_length(self.num_digits, checks)} tokens with EOS)")
        check_choice(self, "strategy", tuple(STRATEGIES))
        check_positive(self, "grad_accum", integer=True)
        for name, rows in (("sft_batch_size", self.sft_batch_size), ("batch_size", self.batch_size),
                           ("pretrain_batch_size", self.pretrain_batch_size),
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
        check_positive(self, "rollout_budget", "length_penalty_warmup", minimum=0, integer=True)
        check(self.rollout_budget == 0 or self.method == "grpo",
              f"rollout_budget={self.rollout_budget} is for method='grpo' (method={self.method!r})")
        check(self.rollout_budget == 0 or (self.problem_pool == 0 and self.log_rollouts == 0),
              f"rollout_budget={self.rollout_budget} trains on earlier steps' rollouts: it cannot be combined with "
              f"problem_pool={self.problem_pool} or log_rollouts={self.log_rollouts} (set them to 0)")
        check_choice(self, "long2short", LONG2SHORT_MODES)
        check(self.long2short == "none" or self.method == "grpo",
              f"long2short={self.long2short!r} shortens a GRPO policy: it needs method='grpo' (method={self.method!r})")
        check_positive(self, "long2short_steps", integer=True)
        check(self.long2short_samples >= 2, f"long2short_samples={self.long2short_samples!r} must be >= 2")
        check(self.problem_sampling == "uniform" or self.problem_pool > 0,
              f"problem_sampling={self.problem_sampling!r} draws from a pool: set problem_pool > 0 (got 0)")
        check("curriculum" not in self.problem_sampling or self.task in LEVELLED_TASKS,
              f"problem_sampling={self.problem_sampling!r} needs difficulty levels, which task={self.task!r} lacks "
              f"(only {LEVELLED_TASKS} have them: the larger operand's digits)")
        if self.prompt_format != "plain" and self.init_from is None:
            raise ValueError(f"prompt_format={self.prompt_format!r} needs init_from (a checkpoint's tokenizer)")

    # ---- derived values -------------------------------------------------------------------------
    @property
    def task_spec(self) -> Task | ThinkTask:
        return make_task(self.task, self.num_digits)

    @property
    def response_len(self) -> int:
        return self.response_len_for(self.task_spec)

    def response_len_for(self, task: Task | TextTask | ThinkTask) -> int:
        """The response budget R on ``task`` (``task.response_budget``: its answers' tokens plus EOS plus 2, a
        think-add task's at least 64; with corpus checks at least the longest checked answer plus 8, rounded up to
        a multiple of 8; unless max_new_tokens)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        checks = max_checks(self.corpus_checks, self.corpus_rechecks)
        room = -(-(checked_length(task.num_digits, checks) + 8) // 8) * 8 if checks else 0
        return max(task.response_budget, room)

    def model_config(self) -> LMConfig:
        return LMConfig(vocab_size=self.task_spec.vocab_size, d_model=self.d_model, num_layers=self.num_layers,
                        num_heads=self.num_heads, max_len=self.task_spec.prompt_len + self.response_len)

    def grpo_spec(self, response_len: int | None = None) -> GRPOSpec:
        return GRPOSpec(self.group_size, response_len or self.response_len, self.clip_eps, self.beta,
                        self.aggregation, self.scale_rewards, self.ppo_epochs, self.temperature, self.format_weight,
                        self.length_penalty, self.grad_accum, self.loss, self.mirror_tau,
                        return_rollout=self.problem_pool > 0 or self.log_rollouts > 0,
                        clip_eps_high=self.clip_eps_high, dynamic_sampling=self.dynamic_sampling,
                        length_penalty_warmup=self.length_penalty_warmup,
                        rollout_budget=self.rollout_budget)

    def ppo_spec(self, response_len: int | None = None) -> PPOSpec:
        return PPOSpec(self.group_size, response_len or self.response_len, self.clip_eps, self.kl_coef,
                       self.vf_coef, 1.0, self.gae_lambda, self.ppo_epochs, self.temperature, self.grad_accum)
