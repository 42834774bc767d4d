"""The GUI agent's data (``jaxlab train gui-agent``, :mod:`jaxlab.experiments.gui_agent_train`): its
configuration, the token layout of a step's prompt (screenshot placeholder, instruction, earlier actions, then
the action and ``<eos>``), the SFT examples from demonstrations, each step's job (:class:`StepTarget`) and the
verifier of an action against it (:func:`step_reward`), which is GRPO's reward and the evaluation's judge.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlab.models.corpus import decode, encode
from jaxlab.models.gui_screens import ScreenConfig
from jaxlab.models.gui_tasks import TASK_KINDS, GUITask
from jaxlab.models.lm import LMConfig
from jaxlab.models.vision import ViTConfig
from jaxlab.models.vlm import VLMConfig, VLMExample
from jaxlab.rl.gui import Click, Finished, GUIState, Scroll, Type, click_in_box, demonstration, env_step, parse_action
from jaxlab.rl.gui import render as render_state
from jaxlab.rl.gui import reset as reset_task
from jaxlab.validation import check, check_choice, check_greater, check_positive, check_range

IMAGE_ID, ACTION_ID, EOS_ID, POINT_ID = 256, 257, 258, 259
VOCAB_SIZE = 260
PAD_ID = 0
HISTORY_SEP = "; "
GROUNDINGS = ("pointer", "text")
"""How a click's location is produced: "pointer" (the policy writes ``click(<point>)`` and the pointing head
picks the patch, GUI-Actor's coordinate-free grounding, :mod:`jaxlab.models.grounding`) or "text" (the
coordinates written as digits)."""
POINT_READOUTS = ("region", "argmax")
"""Where the greedy pointer clicks (grounding "pointer"): "region" (GUI-Actor's inference: the probability-
weighted centre of the best region of likely patches, :func:`jaxlab.models.grounding.region_point`) or
"argmax" (the most likely patch's centre)."""


# ---- configuration --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GUIAgentConfig:
    """GUI-agent training: screens and tasks, model, SFT, GRPO, evaluation and logging."""

    screen_sizes: tuple[tuple[int, int], ...] = ((96, 128), (128, 160))
    """Viewport sizes (height, width) the screens draw from (multiples of 2 * patch_size)."""
    tall_fraction: float = 0.3
    """Fraction of screens with a page twice the viewport (tasks that need scroll(down))."""
    kinds: tuple[str, ...] = TASK_KINDS
    """Task kinds trained and evaluated (click, type, check, menu, scroll, form)."""
    train_tasks: int = 400
    """Tasks in the training pool."""
    eval_tasks: int = 48
    """Held-out tasks (another key): every step of their demonstrations, and one rollout each."""
    jitter: float = 0.6
    """Demonstration clicks land up to this fraction of the half box from the box's centre."""
    prompt_len: int = 208
    """Slots of every prompt (image tokens and text, left-padded): the largest screen's image tokens plus the
    longest instruction and history must fit."""
    max_action_len: int = 20
    """Longest action text in bytes (the decoding budget is this plus <eos>)."""
    patch_size: int = 8
    vit_d_model: int = 64
    vit_layers: int = 2
    vit_heads: int = 4
    grounding: str = "pointer"
    """How clicks are located (``GROUNDINGS``): "pointer" (``click(<point>)`` and the pointing head's patch)
    or "text" (``click(x, y)`` written as digits)."""
    pointer_dim: int = 64
    """Width of the pointing head (grounding "pointer")."""
    pointer_coef: float = 1.0
    """Weight of the pointing loss beside the action text's cross-entropy in SFT (grounding "pointer")."""
    point_readout: str = "region"
    """Where the greedy policy clicks (grounding "pointer"): region (GUI-Actor's readout, the weighted centre of
    the best region of likely patches) | argmax (the most likely patch's centre). Sampled clicks are always the
    sampled patch's centre."""
    point_threshold: float = 0.3
    """The "region" readout keeps the patches with at least this fraction of the largest probability
    (GUI-Actor's activation threshold)."""
    abs_pos_grid: int | None = 8
    """Side of the ViT's learned absolute position table, interpolated to each screen's patch grid (where on
    the screen a patch is: what a click's coordinates need); None: 2D RoPE only."""
    lm_d_model: int = 96
    lm_layers: int = 3
    lm_heads: int = 4
    steps: int = 300
    """SFT optimizer steps (counted across restarts)."""
    rows: int = 8
    """SFT examples (steps of demonstrations) per batch, one per row."""
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    grpo_steps: int = 0
    """GRPO steps after SFT (0: SFT only)."""
    grpo_prompts: int = 4
    """Step prompts per GRPO step (grpo_prompts * group_size rows are sampled in one call)."""
    group_size: int = 4
    """Actions sampled per prompt (GRPO's group)."""
    temperature: float = 1.0
    """Sampling temperature of the GRPO rollouts."""
    grpo_lr: float = 2e-4
    clip_eps: float = 0.2
    beta: float = 0.04
    """Weight of the k3 KL to the SFT policy."""
    ppo_epochs: int = 2
    format_weight: float = 0.1
    """Reward added when the action parses (0: the task reward only)."""
    step_limit: int = 6
    """Most actions of an evaluation rollout."""
    eval_samples: int = 0
    """Also measure the sampled policy's click accuracy on the held-out click steps: the mean over this many
    samples at ``temperature`` (what GRPO optimises; 0: greedy only)."""
    eval_batch: int = 16
    """Prompts per decoding call (evaluation and GRPO sampling are padded to it: one compiled shape)."""
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    resume: bool = True
    """Continue from the latest checkpoints in the output folder when there are some."""
    progress: bool = True
    fast_compile: bool = False
    """Compile the steps with XLA's backend optimisation off (short runs and tests)."""

    def __post_init__(self):
        check_positive(self, "train_tasks", "eval_tasks", "prompt_len", "max_action_len", "patch_size", "vit_d_model",
                       "vit_layers", "vit_heads", "lm_d_model", "lm_layers", "lm_heads", "steps", "rows",
                       "grpo_prompts", "ppo_epochs", "step_limit", "eval_batch", "eval_every", "log_every",
                       "checkpoint_every", integer=True)
        check_positive(self, "grpo_steps", "eval_samples", minimum=0, integer=True)
        check_choice(self, "grounding", GROUNDINGS)
        check_choice(self, "point_readout", POINT_READOUTS)
        check_range(self, "point_threshold", 0.0, 1.0, open_low=True)
        check_positive(self, "pointer_dim", integer=True)
        check_range(self, "pointer_coef", 0.0, 100.0, open_low=True)
        check_positive(self, "group_size", minimum=2, integer=True)
        check_greater(self, "lr", "grpo_lr", "clip_norm", "temperature", "clip_eps")
        check_range(self, "weight_decay", 0.0, 1.0)
        check_range(self, "jitter", 0.0, 1.0)
        check_range(self, "beta", 0.0, 10.0)
        check_range(self, "format_weight", 0.0, 1.0)
        check(self.grpo_prompts * self.group_size <= 64,
              f"grpo_prompts={self.grpo_prompts} * group_size={self.group_size} must be at most 64 sampled rows")
        check(0 <= self.warmup_steps < self.steps, f"warmup_steps={self.warmup_steps} must be in [0, steps="
                                                   f"{self.steps})")
        bad = [k for k in self.kinds if k not in TASK_KINDS]
        check(isinstance(self.kinds, tuple) and self.kinds and not bad,
              f"kinds={self.kinds!r} must be a non-empty tuple of {TASK_KINDS}")
        self.screen_config()  # validates screen_sizes and tall_fraction
        m = 2 * self.patch_size
        odd = [s for s in self.screen_sizes if s[0] % m or s[1] % m]
        check(not odd, f"screen_sizes={self.screen_sizes}: {odd} are not multiples of 2 * patch_size = {m}")
        check(self.prompt_len >= self.image_tokens + 32,
              f"prompt_len={self.prompt_len} must leave at least 32 text slots after the largest screen's "
              f"{self.image_tokens} image tokens")
        self.model_config()

    @property
    def image_tokens(self) -> int:
        """Merged image tokens of the largest screen."""
        return max((h // self.patch_size // 2) * (w // self.patch_size // 2) for h, w in self.screen_sizes)

    @property
    def image_len(self) -> int:
        """Patches of the largest screen (one image row)."""
        return max((h // self.patch_size) * (w // self.patch_size) for h, w in self.screen_sizes)

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.max_action_len + 1

    def screen_config(self) -> ScreenConfig:
        return ScreenConfig(sizes=tuple(tuple(s) for s in self.screen_sizes), tall_fraction=self.tall_fraction)

    def model_config(self) -> VLMConfig:
        vit = ViTConfig(patch_size=self.patch_size, d_model=self.vit_d_model, num_layers=self.vit_layers,
                        num_heads=self.vit_heads, num_channels=3, abs_pos_grid=self.abs_pos_grid)
        lm = LMConfig(vocab_size=VOCAB_SIZE, d_model=self.lm_d_model, num_layers=self.lm_layers,
                      num_heads=self.lm_heads, max_len=self.seq_len)
        return VLMConfig(vit=vit, lm=lm, image_token=IMAGE_ID, merge_factor=2,
                         pointer_dim=self.pointer_dim if self.grounding == "pointer" else None)


# ---- examples -------------------------------------------------------------------------------------
def _image(state: GUIState) -> np.ndarray:
    return render_state(state).astype(np.float32) / 255.0  # [H, W, 3] in [0, 1]


def _prompt_tokens(image: np.ndarray, instruction: str, history, cfg: GUIAgentConfig) -> np.ndarray:
    """``PAD... <image> instruction \\n history <action>``, left-padded to ``prompt_len`` expanded slots."""
    text = encode(instruction + "\n" + HISTORY_SEP.join(history))
    n_image = (image.shape[0] // cfg.patch_size // 2) * (image.shape[1] // cfg.patch_size // 2)
    pad = cfg.prompt_len - n_image - len(text) - 1
    if pad < 0:
        raise ValueError(f"the prompt of {instruction!r} with history {list(history)} needs "
                         f"{n_image + len(text) + 1} slots ({n_image} image tokens), more than "
                         f"prompt_len={cfg.prompt_len}")
    return np.concatenate([np.full(pad, PAD_ID), [IMAGE_ID], text, [ACTION_ID]]).astype(np.int32)


def policy_prompt(state: GUIState, history, cfg: GUIAgentConfig) -> VLMExample:
    """The policy's prompt at ``state`` after the actions ``history``: the screenshot and the prompt tokens."""
    image = _image(state)
    return VLMExample((image,), _prompt_tokens(image, state.task.instruction, history, cfg))


def action_tokens(action: str, cfg: GUIAgentConfig) -> np.ndarray:
    """The tokens the policy writes for ``action``: its bytes, except a click under grounding "pointer",
    written ``click(<point>)`` (the location is the pointing head's)."""
    if cfg.grounding == "pointer" and isinstance(parse_action(action), Click):
        return np.concatenate([encode("click("), [POINT_ID], encode(")")]).astype(np.int32)
    return np.asarray(encode(action), np.int32)


def sft_example(state: GUIState, history, action: str, cfg: GUIAgentConfig) -> VLMExample:
    """The prompt at ``state`` followed by ``action`` (:func:`action_tokens`) and ``<eos>``; the loss counts
    the action and ``<eos>``."""
    a = action_tokens(action, cfg)
    if len(a) > cfg.max_action_len:
        raise ValueError(f"action {action!r} has {len(a)} bytes, more than max_action_len={cfg.max_action_len}")
    prompt = policy_prompt(state, history, cfg)
    tokens = np.concatenate([prompt.tokens, a, [EOS_ID]]).astype(np.int32)
    loss = np.arange(len(tokens)) >= len(prompt.tokens)
    return VLMExample(prompt.images, tokens, loss)


@dataclasses.dataclass(frozen=True)
class StepTarget:
    """The job of one step: ``kind`` "click" (a click inside ``box``, viewport pixels (x0, y0, x1, y1)),
    "type" (``text``), "scroll" (``direction``) or "finished"."""

    kind: str
    box: tuple[int, int, int, int] | None = None
    text: str = ""
    direction: str = ""


@dataclasses.dataclass(frozen=True)
class StepCase:
    """One step of a demonstration: the state before it, the actions before it, the demonstrated action and
    its job."""

    state: GUIState
    history: tuple[str, ...]
    action: str
    target: StepTarget


def step_cases(task: GUITask, *, jitter: float = 0.0, seed: int = 0) -> list[StepCase]:
    """The steps of ``demonstration(task, jitter=, seed=)``, each with its state (replayed through
    ``env_step``) and its job; a click's target is the box of the widget (or menu item) it is for, in the
    viewport's coordinates at that step."""
    actions = demonstration(task, jitter=jitter, seed=seed)
    boxes = []
    for step in task.steps:  # the boxes the demonstration clicks, in order
        widget = task.screen.widgets[step.widget]
        boxes.append(widget.box)
        if step.action == "choose":
            boxes.append(widget.item_boxes[widget.items.index(step.text)])
    state, cases, clicks = reset_task(task), [], iter(boxes)
    for k, text in enumerate(actions):
        action = parse_action(text)
        if isinstance(action, Click):
            x0, y0, x1, y1 = next(clicks)
            target = StepTarget("click", (x0, y0 - state.screen.scroll, x1, y1 - state.screen.scroll))
            check(click_in_box(action, target.box), f"demonstration click {text} misses its box {target.box}")
        elif isinstance(action, Type):
            target = StepTarget("type", text=action.text)
        elif isinstance(action, Scroll):
            target = StepTarget("scroll", direction=action.direction)
        else:
            target = StepTarget("finished")
        cases.append(StepCase(state, tuple(actions[:k]), text, target))
        state, _, _ = env_step(state, action)
    return cases


def step_reward(text: str, target: StepTarget) -> tuple[bool, bool]:
    """``(correct, parsed)``: whether the action text parses, and whether it does the step's job (a click
    inside the box, the same text typed, the same scroll, ``finished()``)."""
    try:
        action = parse_action(text)
    except ValueError:
        return False, False
    if target.kind == "click":
        return click_in_box(action, target.box), True
    if target.kind == "type":
        return action == Type(target.text), True
    if target.kind == "scroll":
        return action == Scroll(target.direction), True
    return isinstance(action, Finished), True


def _before_eos(response: np.ndarray) -> np.ndarray:
    """A response's tokens before its first ``<eos>`` (all of them without one)."""
    response = np.asarray(response)
    stop = np.flatnonzero(response == EOS_ID)
    return response[:stop[0]] if len(stop) else response


def point_slot(response: np.ndarray) -> int:
    """Index of the first ``<point>`` token before ``<eos>`` in a response, -1 when there is none."""
    hits = np.flatnonzero(_before_eos(response) == POINT_ID)
    return int(hits[0]) if len(hits) else -1


def action_text(response: np.ndarray, point: tuple[float, float] | None = None) -> str:
    """The text of a response's tokens before its first ``<eos>``, its first ``<point>`` written as the pointed
    ``point`` (x, y) when given, rounded to whole pixels (other special tokens make it unparsable)."""
    body = _before_eos(response)
    k = point_slot(body)
    if point is not None and k >= 0:
        x, y = (int(np.floor(float(v) + 0.5)) for v in point)  # half up, as the pixel grid does
        body = np.concatenate([body[:k], encode(f"{x}, {y}"), body[k + 1:]])
    if (body > 255).any():
        return "<special token>"
    return decode(body)
