"""``jaxlab train gui-agent``: a GUI agent in the manner of UI-TARS (Qin et al. 2025, arXiv 2501.12326): a
vision-language model (:mod:`jaxlab.models.vlm`: ViT -> 2x2 pixel shuffle -> projector -> LM) reads a
screenshot, the instruction and the actions taken so far, and writes the next action as text
(``click(x, y)``, ``type("...")``, ``scroll(up|down)``, ``finished()``; :mod:`jaxlab.rl.gui`). Stage 1 is
supervised fine-tuning on demonstrations (UI-TARS section 4: imitation of action traces); stage 2 is GRPO
with the environment as the verifier (the online "reflective" stage, section 4.5, here as group-relative
policy optimisation, Shao et al. 2024).

    jaxlab train gui-agent --out runs/gui                       # SFT, then evaluation on held-out tasks
    jaxlab train gui-agent --grpo-steps 50 --out runs/gui        # then GRPO from the SFT policy
    jaxlab train gui-agent --grounding text --out runs/gui-text  # clicks' coordinates written as digits

Grounding (``--grounding``): with "pointer" (the default; GUI-Actor, Wu et al. 2025, arXiv 2506.03143) the
policy writes a click as ``click(<point>)`` and the VLM's pointing head (:meth:`jaxlab.models.vlm.VLM.point`,
:mod:`jaxlab.models.grounding`) chooses a ViT patch from the hidden state at ``<point>``; the action text the
environment receives is ``click(x, y)`` at that patch's centre, and that is what the history keeps. The greedy
policy's click (``--point-readout``) is GUI-Actor's readout by default, the probability-weighted centre of the
likeliest region of patches (:func:`jaxlab.models.grounding.region_point`), or the most likely patch's centre
("argmax"; the evaluation reports its click accuracy beside, ``click_accuracy_argmax``). SFT adds the
pointing loss (the negative log-probability of the patches whose centres lie in the target's box) to the action
text's cross-entropy; GRPO samples the patch at its temperature and counts the choice as one more action
token. With "text" the policy writes the digits itself.

Tokens (as ``jaxlab train vlm``): the UTF-8 bytes of the text (0-255, byte 0 pads), ``IMAGE_ID = 256`` (the
screenshot's placeholder, expanded to one slot per merged image token), ``ACTION_ID = 257`` (the prompt ends,
the action follows), ``EOS_ID = 258``, ``POINT_ID = 259`` (``<point>``). One step of an episode is one example:

    PAD ... PAD <image> instruction "\\n" previous actions joined by "; " <action> | action text <eos>

The screenshot is the rendered screen at that step, at its native resolution (screens of several sizes,
packed by :func:`jaxlab.models.vision.pack_images`). The text is left-padded so that every prompt has
``prompt_len`` slots whatever its image's size (the LM's KV-cache decoding runs one document per row from
position 0, :mod:`jaxlab.models.vlm_sampling`); training sees the same padding. The loss counts the action
text and its ``<eos>`` only (:func:`sft_example`).

SFT data: example k draws a training task, a demonstration of it (:func:`jaxlab.rl.gui.demonstration`,
click jitter from the example's seed, so clicks cover the target's box rather than one point) and one of
its steps; the prompt holds the demonstration's earlier actions. Evaluation, on held-out tasks (another key):

* ``step_accuracy``/``click_accuracy``: every step of each held-out demonstration (history = the
  demonstration's earlier actions), the greedy action does the step's job (:func:`step_reward`); the click
  accuracy is over the click steps: the greedy action parses and ``click_in_box`` of the step's target
  (UI-TARS's grounding metric). ``parse_rate``: greedy actions that parse.
* ``task_success``: the greedy policy rolled out through :func:`jaxlab.rl.gui.env_step` from the task's start
  (its own actions as history) for up to ``step_limit`` actions; an unparsable action, a click outside the
  viewport, or no ``finished()`` within the limit ends the episode as a failure (also per task kind).

GRPO (``grpo_steps > 0``, in ``OUT/grpo/`` after ``OUT/sft/``): per step, ``grpo_prompts`` step prompts from
the training tasks' demonstrations, ``group_size`` actions sampled for each at ``temperature``
(:func:`jaxlab.models.vlm_sampling.sample_vlm`), reward 1 when the action does the step's job (click inside
the target's box, the right text typed, the right scroll, finished at the end) plus ``format_weight`` when it
parses, group-relative advantages and the clipped loss with the k3 KL to the SFT policy
(:func:`jaxlab.rl.llm.losses.grpo_advantages`, :func:`~jaxlab.rl.llm.losses.grpo_loss`), ``ppo_epochs``
updates of the spine (:func:`jaxlab.rl.llm.grpo.update_epochs`). Both stages run on ``fit``: metrics.jsonl,
checkpoints, resume. Every field of :class:`GUIAgentConfig` is a flag (``jaxlab train gui-agent --help``).

Measured on 2 CPU cores, seed 0. With ``--grounding text`` the digits stay at chance: at the default size (all
six kinds, 48 held-out tasks, 64 click steps) click accuracy 0.031 after 400 SFT steps and 0.047 after 40 GRPO
steps (a uniformly random click lands in the target's box 0.047 of the time), and neither 2000 SFT steps nor 4000
training tasks change that. The pointer learns to ground: 0.234 after 300 SFT steps at the default size, and on
the grounding tasks of ``gui-grounding`` (click, check, menu; 5000 training tasks) 0.437 after 400 steps against
the text agent's 0.107 (0.550 against 0.100 after 2000), with the argmax readout. GRPO has not raised that
readout there (0.427 after 40 steps of 8 x 8 samples, 0.531 after 200); the region readout it raises by about
half a standard error (0.526 to 0.545 at full size; the ``gui-grounding`` report). Steps that type stay wrong
at these sizes (the typed text has to be copied from the instruction).
"""

from __future__ import annotations

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.experiments._gui_agent_data import (ACTION_ID, EOS_ID, IMAGE_ID, PAD_ID, POINT_ID, VOCAB_SIZE,
                                                GUIAgentConfig, StepCase, StepTarget, action_text, point_slot,
                                                policy_prompt, sft_example, step_cases, step_reward)
from jaxlab.experiments.vlm_train import make_loss_fn
from jaxlab.loop import LoopConfig, fit
from jaxlab.metrics import to_jsonable
from jaxlab.models.grounding import box_targets, choose_point, pointer_log_probs, pointer_loss, region_point
from jaxlab.models.gui_tasks import GUITask, make_tasks
from jaxlab.models.lm import NO_DECAY_PARAMS, next_token_loss, token_logprobs
from jaxlab.models.vlm import VLM, VLMConfig, VLMExample, images_of, init_vlm_params, pack_examples
from jaxlab.models.vlm_sampling import (VLMPrompts, prepare_prompts, repeat_prompts, sample_vlm,
                                        teacher_forced_inputs, vlm_response_logprobs)
from jaxlab.optim import OptimizerConfig, make_optimizer
from jaxlab.registry import register_trainer
from jaxlab.rl.gui import env_step
from jaxlab.rl.gui import reset as reset_task
from jaxlab.rl.llm.grpo import sampled_logps, update_epochs
from jaxlab.rl.llm.losses import grpo_advantages, grpo_loss
from jaxlab.train_state import create_train_state, make_train_step
from jaxlab.xla_options import FAST_COMPILE

__all__ = ["ACTION_ID", "EOS_ID", "IMAGE_ID", "POINT_ID", "VOCAB_SIZE", "GRPOCases", "GRPOStep", "GUIAgentConfig",
           "SFTBatches", "StepCase", "StepTarget", "action_text", "decode_actions", "make_eval_fn",
           "make_pointer_loss_fn", "point_actions", "policy_prompt", "sft_example", "step_cases", "step_reward",
           "train_gui_agent"]


def _prompt_arrays(prompts: list[VLMExample], cfg: GUIAgentConfig):
    """The prompts padded to ``eval_batch`` rows (copies of the last) as fixed-shape ``VLMPrompts``."""
    if len(prompts) > cfg.eval_batch:
        raise ValueError(f"{len(prompts)} prompts, more than eval_batch={cfg.eval_batch}")
    full = list(prompts) + [prompts[-1]] * (cfg.eval_batch - len(prompts))
    return prepare_prompts(full, image_token=IMAGE_ID, patch_size=cfg.patch_size, image_len=cfg.image_len,
                           image_rows=cfg.eval_batch, image_tokens=cfg.eval_batch * cfg.image_tokens)


@functools.lru_cache(maxsize=8)
def _pointer_fn(cfg: VLMConfig):
    """Jitted ``(params, tokens, images, slots, query, key, temperature) -> (index, point, logp, probs,
    points)``: the pointing head read at each row's query slot of a teacher-forced forward pass, then
    :func:`choose_point`; ``probs [B, N]`` (the distribution chosen from) and ``points [B, N, 2]`` are every
    candidate's, for the region readout."""
    model = VLM(cfg)

    def run(params, tokens, images, slots, query, key, temperature):
        _, _, logits, valid, points = model.apply({"params": params}, tokens, images, slots, query, method=VLM.point)
        index, point, logp = choose_point(logits, valid, points, key, temperature)
        probs = jnp.exp(pointer_log_probs(logits, valid, temperature))  # [B, N], 0 on invalid candidates
        return index, point, logp, probs, points.reshape(len(index), -1, 2)

    return jax.jit(run)


def point_actions(model: VLM, params, prompts: VLMPrompts, roll, key, temperature: float,
                  readout: tuple[int, float] | None = None) -> dict:
    """Where each sampled response points: its ``<point>`` slot read by the pointing head (grounding
    "pointer"). Returns numpy ``has_point [B]``, ``query [B]`` (slot of the ``<point>`` token in the prompt
    plus response), ``index [B]`` (the chosen patch), ``patch_point [B, 2]`` (its centre, x, y), ``point [B, 2]``
    (where the action clicks) and ``logp [B]`` (under the ``temperature``'s distribution; greedy at 0). ``point``
    is ``patch_point`` except that ``readout = (patch_size, threshold)`` at temperature 0 makes it GUI-Actor's
    region readout (:func:`region_point`) on each pointing row; ``index`` and ``logp`` stay the most likely
    patch's."""
    response = np.asarray(roll.response)
    at = np.array([point_slot(r) for r in response])  # [B]: the <point> token's index in each response
    query = (np.shape(prompts.tokens)[1] + np.maximum(at, 0)).astype(np.int32)
    tokens, slots = teacher_forced_inputs(prompts, response)  # roll.tokens and the image slots under them
    index, point, logp, probs, points = jax.device_get(_pointer_fn(model.cfg)(
        params, tokens, prompts.images, slots, jnp.asarray(query), key, jnp.float32(temperature)))
    patch_point = np.asarray(point)
    point = patch_point
    if readout is not None and temperature <= 0:
        patch_size, threshold = readout
        point = patch_point.astype(np.float64)
        for b in np.flatnonzero(at >= 0):
            point[b] = region_point(probs[b], points[b], patch_size, threshold)[0]
    return {"has_point": at >= 0, "query": query, "index": np.asarray(index), "patch_point": patch_point,
            "point": point, "logp": np.asarray(logp)}


def _action_texts(model: VLM, params, prompts: VLMPrompts, roll, key, temperature: float, cfg: GUIAgentConfig):
    """The action texts of a rollout, a ``<point>`` resolved by the pointing head; and the pointing record."""
    response = np.asarray(roll.response)
    if cfg.grounding != "pointer":
        return [action_text(r) for r in response], None
    readout = (cfg.patch_size, cfg.point_threshold) if cfg.point_readout == "region" else None
    pointed = point_actions(model, params, prompts, roll, key, temperature, readout)
    return _pointed_texts(response, pointed, "point"), pointed


def _pointed_texts(response: np.ndarray, pointed: dict, field: str) -> list[str]:
    """Each response's action text with its ``<point>`` written at ``pointed[field]`` (a point per row)."""
    return [action_text(r, tuple(p) if h else None)
            for r, p, h in zip(response, pointed[field], pointed["has_point"], strict=True)]


def _decode(model: VLM, params, prompts: list[VLMExample], cfg: GUIAgentConfig, key=None,
            temperature: float = 0.0) -> tuple[list[str], list[str]]:
    """:func:`decode_actions`'s texts, and the same texts with each ``<point>`` written at the chosen patch's
    centre (the "argmax" readout when greedy; the texts themselves under grounding "text")."""
    key = jax.random.PRNGKey(0) if key is None else key
    out, at_patch = [], []
    for start in range(0, len(prompts), cfg.eval_batch):
        chunk = prompts[start:start + cfg.eval_batch]
        arrays = _prompt_arrays(chunk, cfg)
        chunk_key = jax.random.fold_in(key, start)
        roll = sample_vlm(model, params, arrays, chunk_key, cfg.max_action_len + 1,
                          temperature=temperature, eos_id=EOS_ID, pad_id=PAD_ID)
        texts, pointed = _action_texts(model, params, arrays, roll, jax.random.fold_in(chunk_key, 1), temperature,
                                       cfg)
        patch_texts = texts if pointed is None else _pointed_texts(np.asarray(roll.response), pointed, "patch_point")
        out.extend(texts[:len(chunk)])
        at_patch.extend(patch_texts[:len(chunk)])
    return out, at_patch


def decode_actions(model: VLM, params, prompts: list[VLMExample], cfg: GUIAgentConfig, key=None,
                   temperature: float = 0.0) -> list[str]:
    """The policy's action text for each prompt (greedy at temperature 0), ``eval_batch`` prompts per call;
    under grounding "pointer" a ``click(<point>)`` is written where the pointing head points
    (``cfg.point_readout`` when greedy, the sampled patch's centre otherwise)."""
    return _decode(model, params, prompts, cfg, key, temperature)[0]


# ---- evaluation -----------------------------------------------------------------------------------
def make_eval_fn(model: VLM, tasks: list[GUITask], cfg: GUIAgentConfig):
    """``eval_fn(params) -> metrics``: step and click accuracy on the held-out demonstrations' steps, the greedy
    rollouts' task success (overall and per kind) and the parse rate (see the module docstring)."""
    cases = [c for task in tasks for c in step_cases(task)]
    step_kinds = np.array([c.target.kind for c in cases])
    clicks = step_kinds == "click"
    prompts = [policy_prompt(c.state, c.history, cfg) for c in cases]  # the held-out steps' prompts, rendered once
    click_cases = [c for c, k in zip(cases, clicks, strict=True) if k]
    click_prompts = [q for q, k in zip(prompts, clicks, strict=True) if k]
    kinds = np.array([t.kind for t in tasks])

    def rollouts(params) -> np.ndarray:
        states = [reset_task(t) for t in tasks]
        history: list[list[str]] = [[] for _ in tasks]
        success = np.zeros(len(tasks), bool)
        live = list(range(len(tasks)))
        for _ in range(cfg.step_limit):
            if not live:
                break
            actions = decode_actions(model, params, [policy_prompt(states[i], history[i], cfg) for i in live], cfg)
            still = []
            for i, text in zip(live, actions, strict=True):
                try:
                    states[i], done, success[i] = env_step(states[i], text)
                except ValueError:  # unparsable, a click outside the viewport, a character the font lacks
                    continue
                history[i].append(text)
                if not done:
                    still.append(i)
            live = still
        return success

    def eval_fn(params) -> dict[str, float]:
        actions, at_patch = _decode(model, params, prompts, cfg)
        scored = np.array([step_reward(a, c.target) for a, c in zip(actions, cases, strict=True)])  # [S, 2]
        success = rollouts(params)
        out = {"step_accuracy": float(scored[:, 0].mean()), "parse_rate": float(scored[:, 1].mean()),
               "click_accuracy": float(scored[clicks, 0].mean()) if clicks.any() else float("nan"),
               "task_success": float(success.mean()), "click_steps": int(clicks.sum())}
        if cfg.grounding == "pointer" and cfg.point_readout != "argmax" and clicks.any():  # the readouts compared
            out["click_accuracy_argmax"] = float(np.mean([step_reward(a, c.target)[0] for a, c, k in
                                                          zip(at_patch, cases, clicks, strict=True) if k]))
        if cfg.eval_samples and clicks.any():  # the sampled policy (GRPO's) on the click steps
            hits = [step_reward(action, case.target)[0] for k in range(cfg.eval_samples)
                    for action, case in zip(decode_actions(model, params, click_prompts, cfg, jax.random.PRNGKey(1 + k),
                                                           cfg.temperature), click_cases, strict=True)]
            out["click_accuracy_sampled"] = float(np.mean(hits))
        for kind in sorted(set(kinds)):
            out[f"task_success/{kind}"] = float(success[kinds == kind].mean())
        for kind in sorted(set(step_kinds)):
            out[f"step_accuracy/{kind}"] = float(scored[step_kinds == kind, 0].mean())
        return out

    return eval_fn


# ---- data -----------------------------------------------------------------------------------------
class SFTBatches:
    """SFT batches of ``rows`` examples: example k is a step of a demonstration of a training task, the task,
    the demonstration's jitter seed and the step drawn from ``default_rng((seed, 0, k))``. The position
    ``{"next": k}`` is checkpointed by ``fit``.

    Besides :func:`pack_examples`'s arrays a batch holds the pointing targets (grounding "pointer"):
    ``has_point [B]`` (the row's example is a click), ``point_query [B]`` (the slot of its ``<point>`` token)
    and ``point_box [B, 4]`` (the target's box in the screenshot's pixels)."""

    def __init__(self, tasks: list[GUITask], cfg: GUIAgentConfig):
        self.tasks, self.cfg, self.next = tasks, cfg, 0

    def case(self, k: int) -> StepCase:
        rng = np.random.default_rng((self.cfg.seed, 0, k))
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        cases = step_cases(task, jitter=self.cfg.jitter, seed=k)
        return cases[int(rng.integers(len(cases)))]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        cfg = self.cfg
        cases = [self.case(k) for k in range(self.next, self.next + cfg.rows)]
        self.next += cfg.rows
        batch = pack_examples([sft_example(c.state, c.history, c.action, cfg) for c in cases], seq_len=cfg.seq_len,
                              patch_size=cfg.patch_size, image_len=cfg.image_len, image_token=IMAGE_ID,
                              num_rows=cfg.rows, image_rows=cfg.rows, image_tokens=cfg.rows * cfg.image_tokens,
                              pad_id=PAD_ID)
        is_point = batch["inputs"] == POINT_ID  # [B, L]
        if (is_point.sum(axis=1) > 1).any():  # a prompt fills most of a row: never two examples in one
            raise ValueError(f"a row holds {int(is_point.sum(axis=1).max())} <point> tokens; the pointing loss "
                             f"takes one query per row (prompt_len={cfg.prompt_len}, seq_len={cfg.seq_len})")
        query = np.argmax(is_point, axis=1).astype(np.int32)  # [B]
        owner = batch["example_ids"][np.arange(len(query)), query]  # [B]
        boxes = np.zeros((len(query), 4), np.int32)
        for b in np.flatnonzero(is_point.any(axis=1)):
            boxes[b] = cases[owner[b]].target.box
        batch.update(has_point=is_point.any(axis=1), point_query=query, point_box=boxes)
        return batch

    def get_state(self) -> dict:
        return {"next": self.next}

    def set_state(self, state: dict) -> None:
        self.next = int(state["next"])


class GRPOCases:
    """GRPO's prompts: ``grpo_prompts`` steps of the training tasks' demonstrations (no jitter) per batch,
    drawn from ``default_rng((seed, 1, k))`` for batch k (checkpointed as ``{"next": k}``)."""

    def __init__(self, tasks: list[GUITask], cfg: GUIAgentConfig):
        self.tasks, self.cfg, self.next = tasks, cfg, 0

    def __iter__(self):
        return self

    def __next__(self) -> list[StepCase]:
        rng = np.random.default_rng((self.cfg.seed, 1, self.next))
        self.next += 1
        picked = []
        for _ in range(self.cfg.grpo_prompts):
            cases = step_cases(self.tasks[int(rng.integers(len(self.tasks)))])
            picked.append(cases[int(rng.integers(len(cases)))])
        return picked

    def get_state(self) -> dict:
        return {"next": self.next}

    def set_state(self, state: dict) -> None:
        self.next = int(state["next"])


class GRPOStep:
    """One GRPO step seen from the host (``fit``'s ``train_step``): sample ``group_size`` actions per prompt
    (under grounding "pointer", a ``<point>`` then pointed by sampling the pointing head at the same
    temperature), reward them with the environment's step verifier, then the jitted update (``ppo_epochs`` of
    the clipped loss) on group-relative advantages. The pointing choice is one more action token: its
    log-probability is appended to the text's, counted where the response points."""

    def __init__(self, model: VLM, ref_params, tx, cfg: GUIAgentConfig):
        self.model, self.ref_params, self.cfg = model, ref_params, cfg
        T, pointer = cfg.temperature, cfg.grounding == "pointer"

        def logprobs(params, prompts, response, query, index):  # [NG, R (+ 1)] at the sampling temperature
            if not pointer:
                return vlm_response_logprobs(model, params, prompts, response, T)
            Lp = np.shape(prompts.tokens)[1]
            full, slots = teacher_forced_inputs(prompts, response)  # [NG, Lp + R] each
            logits, _, pointer_logits, valid, _ = model.apply(
                {"params": params}, full, prompts.images, slots, query, method=VLM.point)
            text = token_logprobs(logits[:, Lp - 1:-1] / T, full[:, Lp:])  # [NG, R]
            point = jnp.take_along_axis(pointer_log_probs(pointer_logits, valid, T), index[:, None], axis=1)  # [NG, 1]
            return jnp.concatenate([text, point], axis=1)  # [NG, R + 1]

        def loss_fn(params, batch, key):
            del key
            logp = logprobs(params, batch["prompts"], batch["response"], batch["query"], batch["index"])
            loss, metrics = grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["mask"],
                                      clip_eps=cfg.clip_eps, beta=cfg.beta)
            return loss, metrics

        options = FAST_COMPILE if cfg.fast_compile else None
        self.ref_logprobs = jax.jit(logprobs, compiler_options=options)
        self.update = jax.jit(lambda state, batch, key: update_epochs(state, loss_fn, batch, key, tx, cfg.ppo_epochs),
                              donate_argnums=0, compiler_options=options)

    def experience(self, params, cases: list[StepCase], key) -> tuple[dict, np.ndarray]:
        """The update's batch from ``group_size`` actions sampled for each case with ``params`` (``key``), and
        the verifier's scores ``[nG, 2]`` (correct, parsed). Under grounding "pointer" the last column of
        ``old_logp``/``ref_logp``/``mask`` is the pointing choice's."""
        cfg, G, n = self.cfg, self.cfg.group_size, len(cases)
        rows = max(n, cfg.eval_batch)  # image rows as the evaluation's (one compiled sampler when n * G = eval_batch)
        prompts = prepare_prompts([policy_prompt(c.state, c.history, cfg) for c in cases], image_token=IMAGE_ID,
                                  patch_size=cfg.patch_size, image_len=cfg.image_len, image_rows=rows,
                                  image_tokens=rows * cfg.image_tokens)
        group = repeat_prompts(prompts, G)  # [n * G] rows sharing the n screenshots, groups contiguous
        roll = sample_vlm(self.model, params, group, jax.random.fold_in(key, 0), cfg.max_action_len + 1,
                          temperature=cfg.temperature, eos_id=EOS_ID, pad_id=PAD_ID)
        texts, pointed = _action_texts(self.model, params, group, roll, jax.random.fold_in(key, 2),
                                       cfg.temperature, cfg)
        scores = np.array([step_reward(text, cases[i // G].target) for i, text in enumerate(texts)],
                          np.float32)  # [nG, 2]: correct, parsed
        reward = scores[:, 0] + cfg.format_weight * scores[:, 1]
        old_logp, mask = sampled_logps(roll, cfg.temperature), roll.mask
        query = index = np.zeros(len(texts), np.int32)
        if pointed is not None:
            query, index = pointed["query"], pointed["index"].astype(np.int32)
            old_logp = jnp.concatenate([old_logp, jnp.asarray(pointed["logp"])[:, None]], axis=1)  # [nG, R + 1]
            mask = jnp.concatenate([mask, jnp.asarray(pointed["has_point"], mask.dtype)[:, None]], axis=1)
        batch = {"prompts": group, "response": roll.response, "mask": mask, "old_logp": old_logp,
                 "query": query, "index": index, "reward": reward,
                 "ref_logp": self.ref_logprobs(self.ref_params, group, roll.response, query, index),
                 "advantages": grpo_advantages(jnp.asarray(reward), G)}
        return batch, scores

    def __call__(self, state, cases: list[StepCase], key):
        batch, scores = self.experience(state.params, cases, key)
        reward, R = batch.pop("reward"), np.shape(batch["response"])[1]  # R: text tokens of a response
        state, metrics = self.update(state, batch, jax.random.fold_in(key, 1))
        metrics = jax.device_get(metrics)
        metrics.update(reward=float(reward.mean()), correct=float(scores[:, 0].mean()),
                       parse_rate=float(scores[:, 1].mean()),
                       response_length=float(np.asarray(batch["mask"])[:, :R].sum(axis=1).mean()))
        return state, metrics


# ---- training -------------------------------------------------------------------------------------
def make_pointer_loss_fn(model: VLM, pointer_coef: float = 1.0):
    """SFT's ``loss_fn(params, batch, key) -> (loss, metrics)`` under grounding "pointer": the next-token
    cross-entropy of the action text plus the pointing loss of the click rows (the negative log-probability
    that the pointed patch's centre is in the target's box, :func:`jaxlab.models.grounding.pointer_loss`)."""

    def loss_fn(params, batch, key):
        del key
        logits, aux, pointer_logits, valid, points = model.apply(
            {"params": params}, batch["inputs"], images_of(batch), batch["image_slots"], batch["point_query"],
            batch["positions"], batch["segment_ids"], method=VLM.point)
        ce, metrics = next_token_loss(logits, batch["targets"], batch["mask"])
        inside = box_targets(points, batch["point_box"], model.cfg.vit.patch_size)  # [B, L, ff]
        point, accuracy = pointer_loss(pointer_logits, valid, inside, batch["has_point"])
        metrics = {"cross_entropy": ce, "pointer_loss": point, "pointer_accuracy": accuracy, **metrics}
        return ce + pointer_coef * point + aux["aux_loss"], metrics

    return loss_fn


def _optimizer(lr: float, warmup: int, steps: int, cfg: GUIAgentConfig):
    return make_optimizer(OptimizerConfig(lr=lr, warmup_steps=warmup, decay_steps=steps,
                                          weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm),
                          no_decay=NO_DECAY_PARAMS)


def train_gui_agent(cfg: GUIAgentConfig, out_dir: str | pathlib.Path) -> dict:
    """SFT (``OUT/sft/``), then GRPO (``OUT/grpo/``) when ``grpo_steps > 0``, each resumable; returns the
    summary (held-out click accuracy and task success after each stage, steps, timing), also written to
    ``OUT/summary.json``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(to_jsonable(cfg), indent=2))
    key = jax.random.PRNGKey(cfg.seed)
    screens = cfg.screen_config()
    train_tasks = make_tasks(jax.random.fold_in(key, 0), cfg.train_tasks, screens, cfg.kinds)
    held_out = make_tasks(jax.random.fold_in(key, 1), cfg.eval_tasks, screens, cfg.kinds)
    model = VLM(cfg.model_config())
    data = SFTBatches(train_tasks, cfg)
    params = init_vlm_params(model, jax.random.fold_in(key, 2), next(SFTBatches(train_tasks, cfg)))
    evaluate = make_eval_fn(model, held_out, cfg)
    options = FAST_COMPILE if cfg.fast_compile else None
    summary: dict = {"num_params": {name: sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))
                                    for name, tree in params.items()}}

    def run(stage: str, step, state, stage_data, steps: int) -> dict:
        last: dict = {}

        def eval_fn(state):
            last.update(evaluate(state.params))
            return dict(last)

        loop = LoopConfig(num_steps=steps, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                          resume=cfg.resume, progress=cfg.progress)
        start = time.perf_counter()
        result = fit(step, state, stage_data, loop, out_dir / stage, eval_fn=eval_fn, eval_every=cfg.eval_every)
        if not last:  # resumed at the end: evaluate what was restored
            last.update(evaluate(result.state.params))
        summary.update({f"{stage}/step": int(result.state.step), f"{stage}/resumed_from": result.resumed_from,
                        f"{stage}/seconds": time.perf_counter() - start,
                        **{f"{stage}/eval/{k}": v for k, v in last.items()}})
        print(f"{stage} step {int(result.state.step)}: held-out click accuracy {last['click_accuracy']:.3f}, "
              f"task success {last['task_success']:.3f}, step accuracy {last['step_accuracy']:.3f}")
        return result.state

    tx = _optimizer(cfg.lr, cfg.warmup_steps, cfg.steps, cfg)
    loss_fn = make_pointer_loss_fn(model, cfg.pointer_coef) if cfg.grounding == "pointer" else make_loss_fn(model)
    sft_step = jax.jit(make_train_step(loss_fn, tx), donate_argnums=0, compiler_options=options)
    state = run("sft", sft_step, create_train_state(params, tx, jax.random.fold_in(key, 3)), data, cfg.steps)
    if cfg.grpo_steps:
        ref = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state.params)  # frozen SFT policy, its own buffers
        tx = _optimizer(cfg.grpo_lr, 0, cfg.grpo_steps, cfg)
        state = run("grpo", GRPOStep(model, ref, tx, cfg),
                    create_train_state(state.params, tx, jax.random.fold_in(key, 4)),
                    GRPOCases(train_tasks, cfg), cfg.grpo_steps)
    (out_dir / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=2))
    return summary


@register_trainer("gui-agent", description="UI-TARS-style GUI agent: a VLM reads the screen and writes the next "
                                           "action; SFT on demonstrations, then GRPO with the environment as verifier",
                  config=GUIAgentConfig)
def gui_agent(cfg: GUIAgentConfig, out_dir: pathlib.Path) -> dict:
    return train_gui_agent(cfg, out_dir)
