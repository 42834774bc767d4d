"""The GUI environment: a pure step function over screens, the task verifier, a click-accuracy metric and
scripted demonstrations (UI-TARS, Qin et al. 2025, arXiv 2501.12326: actions on screenshots from a unified
action space; grounding accuracy as the share of clicks inside the target's box; multi-step action traces to
imitate).

The state is a :class:`GUIState`: the task (its instruction and goal), the screen as it is now
(:class:`jaxlab.models.gui_screens.Screen`: widget states, scroll offset, focused field) and whether the
episode is over. :func:`env_step` applies one action (an :mod:`~jaxlab.rl.gui.actions` dataclass or its
text) and returns a new state; nothing is mutated:

* ``click(x, y)`` at viewport pixel (x, y), page pixel (x, y + scroll). If a menu is open, it closes; a click
  on one of its items sets the menu's ``chosen`` item and does nothing else. Otherwise the widget whose box
  holds the point is activated: a button's ``presses`` counts up, a checkbox flips, a text field takes the
  focus, a menu opens (one that was open just closes). A click anywhere but a field drops the focus; a click
  on the background does nothing else. A point outside the viewport is an error (``ValueError``).
* ``type("text")`` appends the text to the focused field (nothing when no field has the focus).
* ``scroll(up|down)`` moves the viewport by half its height, clamped to the page (open menus stay open).
* ``finished()`` ends the episode: ``done`` is True and ``success`` is :func:`task_success` of the state.

A step after the episode ended is an error. ``success`` is False on every step but the last.

:func:`task_success` compares every widget's value (checkbox mark, field text, button presses, menu choice)
with the task's goal: the task's own changes made and nothing else changed (focus, scroll and open
menus do not count). :func:`demonstration` writes actions that solve a task (scrolling the target into
view, clicking at its box's centre plus a seeded jitter that stays inside the box);
:func:`replay` runs a list of action texts from the task's start.

    state = reset(task)
    for text in demonstration(task):
        state, done, success = env_step(state, text)
    image = render(state)                                     # uint8 [H, W, 3]
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlab.models import gui_screens
from jaxlab.models.gui_screens import Box, Screen
from jaxlab.models.gui_tasks import GUITask
from jaxlab.rl.gui.actions import Action, Click, Finished, Scroll, Type, format_action, parse_action

__all__ = ["GUIState", "click_in_box", "demonstration", "env_step", "render", "replay", "reset", "task_success"]


@dataclasses.dataclass(frozen=True)
class GUIState:
    """One moment of an episode."""

    task: GUITask
    screen: Screen
    """The screen now (widget states, scroll, focus)."""
    done: bool = False
    steps: int = 0
    """Actions taken so far."""


def reset(task: GUITask) -> GUIState:
    """The episode's first state: the task's initial screen."""
    return GUIState(task, task.screen)


def render(state: GUIState) -> np.ndarray:
    """What the agent sees: uint8 [H, W, 3] (:func:`jaxlab.models.gui_screens.render` of the screen now)."""
    return gui_screens.render(state.screen)


def _inside(x: int, y: int, box: Box) -> bool:
    return box[0] <= x < box[2] and box[1] <= y < box[3]


def _click(screen: Screen, x: int, y: int) -> Screen:
    if not (0 <= x < screen.width and 0 <= y < screen.height):
        raise ValueError(f"click({x}, {y}) is outside the {screen.width} x {screen.height} (width x height) "
                         "viewport: x must be in [0, width), y in [0, height)")
    px, py = x, y + screen.scroll  # page pixels
    widgets = list(screen.widgets)
    was_open = [w.kind == "menu" and w.open for w in widgets]
    for i, w in enumerate(widgets):
        if was_open[i]:
            widgets[i] = w = dataclasses.replace(w, open=False)
            for item, box in zip(w.items, w.item_boxes, strict=True):
                if _inside(px, py, box):
                    widgets[i] = dataclasses.replace(w, chosen=item)
                    return dataclasses.replace(screen, widgets=tuple(widgets), focus=-1)
    hit = next((i for i, w in enumerate(widgets) if _inside(px, py, w.box)), None)
    focus = -1
    if hit is not None:
        w = widgets[hit]
        if w.kind == "button":
            widgets[hit] = dataclasses.replace(w, presses=w.presses + 1)
        elif w.kind == "checkbox":
            widgets[hit] = dataclasses.replace(w, checked=not w.checked)
        elif w.kind == "text_field":
            focus = hit
        else:  # menu: open unless this click is the one closing it
            widgets[hit] = dataclasses.replace(w, open=not was_open[hit])
    return dataclasses.replace(screen, widgets=tuple(widgets), focus=focus)


def env_step(state: GUIState, action: Action | str) -> tuple[GUIState, bool, bool]:
    """One step: ``(state, done, success)`` after ``action`` (see the module docstring). Text is parsed by
    :func:`~jaxlab.rl.gui.actions.parse_action` (``ValueError`` when malformed)."""
    if state.done:
        raise ValueError(f"the episode already ended (finished() after {state.steps} steps); reset(task) to start "
                         "another")
    if isinstance(action, str):
        action = parse_action(action)
    screen = state.screen
    if isinstance(action, Click):
        screen = _click(screen, action.x, action.y)
    elif isinstance(action, Type):
        if screen.focus >= 0:
            field = screen.widgets[screen.focus]
            widgets = list(screen.widgets)
            widgets[screen.focus] = dataclasses.replace(field, text=field.text + action.text)
            screen = dataclasses.replace(screen, widgets=tuple(widgets))
    elif isinstance(action, Scroll):
        screen = dataclasses.replace(screen, scroll=screen.scrolled(action.direction))
    elif not isinstance(action, Finished):
        raise TypeError(f"action={action!r} is not an action (Click, Type, Scroll, Finished or its text)")
    done = isinstance(action, Finished)
    state = GUIState(state.task, screen, done, state.steps + 1)
    return state, done, done and task_success(state.task, state)


def task_success(task: GUITask, final_state: GUIState | Screen) -> bool:
    """Whether the final screen meets the task's goal: every widget's value (checkbox mark, field text,
    button presses, menu choice) equals the goal's; a screen with other widgets than the task's is an error."""
    screen = final_state.screen if isinstance(final_state, GUIState) else final_state
    if [(w.kind, w.label, w.box) for w in screen.widgets] != [(w.kind, w.label, w.box) for w in task.screen.widgets]:
        raise ValueError(f"the final state's screen is not the task's ({task.instruction!r}): its widgets differ")
    return screen.values() == task.goal


def click_in_box(action: Action | str, box: Box) -> bool:
    """Click accuracy (grounding): True when ``action`` is a click inside ``box`` = (x0, y0, x1, y1), in the
    click's coordinates (``x0 <= x < x1``, ``y0 <= y < y1``). Any other action is a miss (False); action
    text is parsed (``ValueError`` when malformed), and a box with ``x1 <= x0`` or ``y1 <= y0`` is an error."""
    if isinstance(action, str):
        action = parse_action(action)
    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"box={box!r} must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1")
    return isinstance(action, Click) and _inside(action.x, action.y, box)


def demonstration(task: GUITask, *, jitter: float = 0.5, seed: int = 0) -> list[str]:
    """Action texts that solve ``task`` from its start: for each step, ``scroll`` until the widget (a menu
    item: the item) lies wholly in the viewport, click it (a menu: open it, then click the item; a text
    field: focus it, then ``type``), and ``finished()`` at the end. Each click lands at the box's centre
    moved by up to ``jitter`` of its half-width and half-height (uniform, from ``task.seed`` and ``seed``),
    always inside the box."""
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter={jitter!r} must be in [0, 1]")
    rng = np.random.default_rng([task.seed, seed])
    screen = task.screen
    actions = []

    def click(box: Box) -> None:
        nonlocal screen
        for _ in range(screen.page_height // max(screen.scroll_step, 1) + 1):
            if screen.visible(box):
                break
            direction = "down" if box[3] > screen.scroll + screen.height else "up"
            actions.append(format_action(Scroll(direction)))
            screen = dataclasses.replace(screen, scroll=screen.scrolled(direction))
        if not screen.visible(box):
            raise ValueError(f"box {box} of task {task.instruction!r} never fits the viewport")
        x0, y0, x1, y1 = box
        x = int(np.clip(round((x0 + x1 - 1) / 2 + rng.uniform(-jitter, jitter) * (x1 - x0 - 1) / 2), x0, x1 - 1))
        y = int(np.clip(round((y0 + y1 - 1) / 2 + rng.uniform(-jitter, jitter) * (y1 - y0 - 1) / 2), y0, y1 - 1))
        actions.append(format_action(Click(x, y - screen.scroll)))

    for step in task.steps:
        widget = screen.widgets[step.widget]
        click(widget.box)
        if step.action == "type":
            actions.append(format_action(Type(step.text)))
        elif step.action == "choose":
            click(widget.item_boxes[widget.items.index(step.text)])
    actions.append(format_action(Finished()))
    return actions


def replay(task: GUITask, actions) -> tuple[GUIState, bool, bool]:
    """``(state, done, success)`` after the action texts (or actions) ``actions`` from the task's start;
    the actions after a ``finished()`` are an error, as in :func:`env_step`."""
    state, done, success = reset(task), False, False
    for action in actions:
        state, done, success = env_step(state, action)
    return state, done, success
