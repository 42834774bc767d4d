"""Instructions over GUI screens, one or several steps each, with the goal state that verifies them (the
task setting of UI-TARS, Qin et al. 2025, arXiv 2501.12326: a natural-language instruction, a screen,
a sequence of grounded actions; success is judged on the final state).

A :class:`GUITask` is a screen (:func:`jaxlab.models.gui_screens.make_screen`), an instruction, the steps
that carry it out and the goal: every widget's :attr:`~jaxlab.models.gui_screens.Widget.value` (checkbox
mark, field text, button presses, menu choice) once the steps are done, the others unchanged. Kinds:

* ``"click"``:  "click the Save button" (a button in the first viewport; goal: pressed once);
* ``"type"``:   "type hello into the Name field" (focus the field, then type; goal: its text);
* ``"check"``:  "check the Remember me box" / "uncheck the Dark mode box" (goal: the mark flipped);
* ``"menu"``:   "open the File menu and click Export" (two steps: open, then choose the item);
* ``"scroll"``: "scroll down and click the Submit button" (tall screens: the button lies wholly below the
  first viewport);
* ``"form"``:   "type alice into the Email field, then click the Send button" (two widgets).

Each step names a widget by its index in ``screen.widgets``; its target always exists on the screen
(a kind is drawn among those the screen offers; every screen offers "click"). Tasks are drawn from a JAX
PRNG key, like the screens (``make_tasks`` gives task i the key ``fold_in(key, i)``).

    task = make_task(jax.random.PRNGKey(0))
    task.instruction, render(task.screen), task.goal
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxlab.models.gui_screens import FIELD_CHARS, Screen, ScreenConfig, make_screen
from jaxlab.models.vision_data import host_rng

__all__ = ["TASK_KINDS", "WORDS", "GUITask", "Step", "goal_values", "make_task", "make_tasks", "offered_targets"]

TASK_KINDS = ("click", "type", "check", "menu", "scroll", "form")
WORDS = ("hello", "alice", "bob", "paris", "london", "jax", "2025", "test", "blue", "cat42", "hi there",
         "Bob Ray", "x@y.io")
"""Texts that "type" and "form" tasks ask for (each fits a field: at most ``FIELD_CHARS`` characters)."""
STEP_ACTIONS = ("click", "type", "choose")
if max(len(w) for w in WORDS) > FIELD_CHARS:  # pragma: no cover  (a vocabulary edit that breaks the layout)
    raise ValueError(f"WORDS={WORDS}: a word is longer than FIELD_CHARS={FIELD_CHARS}")


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a task: ``"click"`` the widget (press a button, flip a checkbox), ``"type"`` ``text`` into
    it (a text field: focus, then type) or ``"choose"`` its item ``text`` (a menu: open, then click it)."""

    action: str
    widget: int
    """Index into ``screen.widgets``."""
    text: str = ""

    def __post_init__(self):
        if self.action not in STEP_ACTIONS:
            raise ValueError(f"action={self.action!r} must be one of {STEP_ACTIONS}")


@dataclasses.dataclass(frozen=True)
class GUITask:
    """An instruction on a screen, its steps and its goal (see the module docstring)."""

    kind: str
    """One of ``TASK_KINDS``."""
    instruction: str
    screen: Screen
    """The initial screen (scroll 0, nothing focused, menus closed)."""
    steps: tuple[Step, ...]
    goal: tuple[tuple, ...]
    """Every widget's value once the task is done (:func:`goal_values`)."""
    seed: int
    """Seeds what is drawn for the task after the fact (a demonstration's click jitter)."""

    @property
    def targets(self) -> tuple[int, ...]:
        """Indices of the widgets the steps act on, in order."""
        return tuple(step.widget for step in self.steps)


def goal_values(screen: Screen, steps: tuple[Step, ...]) -> tuple[tuple, ...]:
    """The widgets' values after ``steps`` (a button's presses counted, a checkbox flipped, a field's text
    appended, a menu's ``chosen`` item set), every other widget's as on ``screen``. A step on a widget of the
    wrong kind, or a menu item the menu lacks, is an error naming them."""
    widgets = list(screen.widgets)
    for step in steps:
        if not 0 <= step.widget < len(widgets):
            raise ValueError(f"step {step} names widget {step.widget}; the screen has {len(widgets)}")
        w = widgets[step.widget]
        expected = {"click": ("button", "checkbox"), "type": ("text_field",), "choose": ("menu",)}[step.action]
        if w.kind not in expected:
            raise ValueError(f"step {step}: widget {step.widget} ({w.label!r}) is a {w.kind}, not one of {expected}")
        if step.action == "click":
            w = dataclasses.replace(w, presses=w.presses + 1) if w.kind == "button" else \
                dataclasses.replace(w, checked=not w.checked)
        elif step.action == "type":
            w = dataclasses.replace(w, text=w.text + step.text)
        else:
            if step.text not in w.items:
                raise ValueError(f"step {step}: menu {w.label!r} has no item {step.text!r} (items: {w.items})")
            w = dataclasses.replace(w, chosen=step.text)
        widgets[step.widget] = w
    return tuple(w.value for w in widgets)


def offered_targets(screen: Screen) -> dict[str, list]:
    """For each task kind the screen offers, the widgets it can target: ``"click"``, ``"type"``, ``"check"`` and
    ``"menu"``: indices of the buttons, fields, checkboxes and menus wholly inside the first viewport;
    ``"scroll"``: the buttons wholly below it; ``"form"``: (field, button) pairs of the first viewport. Kinds
    with no target are left out."""
    top = [i for i, w in enumerate(screen.widgets) if screen.visible(w.box, 0)]
    of = lambda kind, idx: [i for i in idx if screen.widgets[i].kind == kind]  # noqa: E731
    buttons, fields, boxes, menus = of("button", top), of("text_field", top), of("checkbox", top), of("menu", top)
    below = [i for i, w in enumerate(screen.widgets) if w.kind == "button" and w.box[1] >= screen.height]
    found = {"click": buttons, "type": fields, "check": boxes, "menu": menus, "scroll": below,
             "form": [(f, b) for f in fields for b in buttons]}
    return {kind: c for kind, c in found.items() if c}


def make_task(key, cfg: ScreenConfig = ScreenConfig(), kinds: tuple[str, ...] = TASK_KINDS) -> GUITask:
    """One task drawn from the PRNG ``key``: a screen, then a kind among ``kinds`` that the screen offers
    (uniformly), then its targets. A screen offering none of ``kinds`` is drawn again from the next key
    (``fold_in(key, attempt)``; "click" is always offered)."""
    bad = [k for k in kinds if k not in TASK_KINDS]
    if not kinds or bad:
        raise ValueError(f"kinds={kinds!r} must be a non-empty tuple of {TASK_KINDS}")
    for attempt in range(100):
        screen_key, task_key = jax.random.split(jax.random.fold_in(key, attempt) if attempt else key)
        screen = make_screen(screen_key, cfg)
        offered = {k: c for k, c in offered_targets(screen).items() if k in kinds}
        if offered:
            break
    else:
        raise ValueError(f"no screen in 100 draws offers any of kinds={kinds!r} (is tall_fraction={cfg.tall_fraction}"
                         " zero while asking for 'scroll' only?)")
    rng = host_rng(task_key)
    names = sorted(offered)
    kind = names[int(rng.integers(len(names)))]
    choice = offered[kind][int(rng.integers(len(offered[kind])))]
    label = lambda i: screen.widgets[i].label  # noqa: E731
    word = WORDS[int(rng.integers(len(WORDS)))]
    if kind in ("click", "scroll"):
        steps = (Step("click", choice),)
        instruction = ("scroll down and click" if kind == "scroll" else "click") + f" the {label(choice)} button"
    elif kind == "type":
        steps = (Step("type", choice, word),)
        instruction = f"type {word} into the {label(choice)} field"
    elif kind == "check":
        steps = (Step("click", choice),)
        instruction = f"{'uncheck' if screen.widgets[choice].checked else 'check'} the {label(choice)} box"
    elif kind == "menu":
        items = screen.widgets[choice].items
        item = items[int(rng.integers(len(items)))]
        steps = (Step("choose", choice, item),)
        instruction = f"open the {label(choice)} menu and click {item}"
    else:  # form
        field, button = choice
        steps = (Step("type", field, word), Step("click", button))
        instruction = f"type {word} into the {label(field)} field, then click the {label(button)} button"
    return GUITask(kind, instruction, screen, steps, goal_values(screen, steps), int(rng.integers(2**31)))


def make_tasks(key, num: int, cfg: ScreenConfig = ScreenConfig(), kinds: tuple[str, ...] = TASK_KINDS) -> list[GUITask]:
    """``num`` tasks; task i from ``fold_in(key, i)`` (so a prefix of a longer list is the same)."""
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
        raise ValueError(f"num={num!r} must be an int >= 0")
    return [make_task(jax.random.fold_in(key, i), cfg, kinds) for i in range(num)]
