"""The GUI environment: text actions parsed or rejected with a reason, env_step's effects, the verifier, the
click metric, and demonstrations that solve every sampled task while a wrong click fails."""

import dataclasses

import jax
import pytest

from jaxlab.models.gui_tasks import TASK_KINDS, make_task, make_tasks
from jaxlab.rl.gui import (Click, Finished, Scroll, Type, click_in_box, demonstration, env_step, format_action,
                           parse_action, render, replay, reset, task_success)

TASKS = make_tasks(jax.random.PRNGKey(0), 120)


def centre(screen, box):
    """The viewport point at the centre of a page box (visible at the screen's scroll)."""
    return (box[0] + box[2]) // 2, (box[1] + box[3]) // 2 - screen.scroll


def click(state, box):
    return env_step(state, Click(*centre(state.screen, box)))[0]


@pytest.mark.parametrize("text, action", [
    ("click(12, 7)", Click(12, 7)), ("  click( 0 ,0 )  ", Click(0, 0)), ('type("hello")', Type("hello")),
    ('type("say \\"hi\\" \\\\ bye")', Type('say "hi" \\ bye')), ('type("")', Type("")), ('type("a) b")', Type("a) b")),
    ("scroll(down)", Scroll("down")), ("scroll( up )", Scroll("up")), ("finished()", Finished()),
])
def test_parse_valid_actions_and_round_trip(text, action):
    assert parse_action(text) == action
    assert parse_action(format_action(action)) == action


@pytest.mark.parametrize("text, problem", [
    ("", "it is empty"), ("   ", "it is empty"), ("click 3, 4", "not a call"), ("click(3, 4", "does not end with"),
    ("click(3, 4) now", "does not end with"), ("tap(3, 4)", "unknown action 'tap'"), ("Click(3, 4)", "unknown action"),
    ("click(3)", "takes 2 arguments, got 1"), ("click()", "takes 2 arguments, got 0"),
    ("click(1, 2, 3)", "takes 2 arguments, got 3"), ("click(-1, 5)", "x='-1' is not an int"),
    ("click(1.5, 2)", "x='1.5' is not an int"), ("click(1, y)", "y='y' is not an int"),
    ("type(hello)", "not one double-quoted string"), ('type("hello)', "not terminated"),
    ('type("a" "b")', "not one double-quoted string"), ('type("café")', "characters ['é']"),
    ("scroll(left)", "direction 'left'"), ("scroll()", "direction ''"), ("finished(now)", "takes no arguments"),
])
def test_malformed_actions_are_rejected_with_the_reason(text, problem):
    with pytest.raises(ValueError) as info:
        parse_action(text)
    message = str(info.value)
    assert problem in message and repr(text) in message and "expected" in message, message


def test_demonstrations_solve_every_task():
    kinds = set()
    for task in TASKS:
        actions = demonstration(task)
        state, done, success = replay(task, actions)
        assert done and success and task_success(task, state), (task.instruction, actions)
        kinds.add(task.kind)
        scrolls = sum(a.startswith("scroll") for a in actions)
        assert (scrolls > 0) == (task.kind == "scroll"), (task.instruction, actions)
        expected = {"click": 2, "check": 2, "scroll": 2, "type": 3, "menu": 3, "form": 4}[task.kind]
        assert len(actions) - scrolls == expected, (task.instruction, actions)
    assert kinds == set(TASK_KINDS)


def test_demonstration_clicks_are_jittered_inside_the_target():
    task = make_task(jax.random.PRNGKey(5), kinds=("click",))
    box = task.screen.widgets[task.targets[0]].box
    clicks = {demonstration(task, seed=seed, jitter=jitter)[0] for seed in range(20) for jitter in (0.5, 1.0)}
    assert len(clicks) > 10 and all(click_in_box(c, box) for c in clicks)
    assert demonstration(task, seed=3) == demonstration(task, seed=3)
    assert demonstration(task, jitter=0.0)[0] == format_action(Click(*centre(task.screen, box)))


def test_wrong_actions_fail():
    tried = set()
    for task in [t for t in TASKS if t.kind in ("click", "check", "menu", "type")][:24]:
        actions = demonstration(task)
        assert not replay(task, ["finished()"])[2], task.instruction  # nothing done
        screen = task.screen
        others = [w for i, w in enumerate(screen.widgets) if i not in task.targets and w.kind in ("button", "checkbox")
                  and screen.visible(w.box, 0)]
        if task.kind in ("click", "check") and others:  # a click on another widget instead of the target
            wrong = format_action(Click(*centre(screen, others[0].box)))
            assert not replay(task, [wrong, "finished()"])[2], task.instruction
            assert not replay(task, [actions[0], wrong, "finished()"])[2], task.instruction  # and an extra one
            tried.add("other widget")
        if task.kind == "check":  # clicked twice: flipped back
            assert not replay(task, [actions[0], actions[0], "finished()"])[2]
        if task.kind == "type":
            assert not replay(task, [actions[0], 'type("nope")', "finished()"])[2]
            assert not replay(task, [actions[1], "finished()"])[2]  # typed without focusing the field
        if task.kind == "menu":  # the menu opened, another item (or none) chosen
            menu = screen.widgets[task.targets[0]]
            step = task.steps[0]
            other = next(b for t, b in zip(menu.items, menu.item_boxes) if t != step.text)
            assert not replay(task, [actions[0], format_action(Click(*centre(screen, other))), "finished()"])[2]
            assert not replay(task, [actions[0], "finished()"])[2]
        tried.add(task.kind)
    assert tried == {"other widget", "click", "check", "type", "menu"}


def test_env_step_effects():
    task = next(t for t in TASKS if t.kind == "form" and t.screen.page_height > t.screen.height)
    state = reset(task)
    widgets = state.screen.widgets
    field, button = (widgets[i] for i in task.targets)
    box_i = next(i for i, w in enumerate(widgets) if w.kind == "checkbox" and state.screen.visible(w.box, 0))
    state = click(state, widgets[box_i].box)
    assert state.screen.widgets[box_i].checked != widgets[box_i].checked
    state = click(state, widgets[box_i].box)
    assert state.screen.widgets[box_i].checked == widgets[box_i].checked
    state, done, success = env_step(state, 'type("lost")')  # no focus: nothing happens
    assert state.screen.values() == task.screen.values() and not done and not success and state.steps == 3
    state = click(state, field.box)
    assert state.screen.widgets[task.targets[0]] == field and state.screen.focus == task.targets[0]
    before = render(state)
    state = env_step(env_step(state, 'type("ab")')[0], 'type(" c")')[0]
    assert state.screen.widgets[task.targets[0]].text == "ab c" and (render(state) != before).any()
    state = click(state, button.box)
    assert state.screen.widgets[task.targets[1]].presses == 1 and state.screen.focus == -1
    H = state.screen.height
    for direction, expected in [("down", H // 2), ("down", H), ("down", H), ("up", H // 2), ("up", 0), ("up", 0)]:
        state = env_step(state, f"scroll({direction})")[0]
        assert state.screen.scroll == expected
    with pytest.raises(ValueError, match=r"click\(0, %d\) is outside" % H):
        env_step(state, Click(0, H))
    with pytest.raises(ValueError, match="malformed action"):
        env_step(state, "click(1)")
    state, done, success = env_step(state, "finished()")
    assert done and not success  # the field holds "ab c", not the task's word
    with pytest.raises(ValueError, match="already ended"):
        env_step(state, "finished()")


def test_menus_open_close_and_choose():
    task = next(t for t in TASKS if t.kind == "menu")
    i = task.targets[0]
    menu = task.screen.widgets[i]
    state = click(reset(task), menu.box)
    assert state.screen.widgets[i].open
    assert not click(state, menu.box).screen.widgets[i].open  # clicked again: closed
    background = next((x, y) for x in range(state.screen.width) for y in range(state.screen.height)
                      if not any(click_in_box(Click(x, y), w.extent) for w in state.screen.widgets))
    closed = env_step(state, Click(*background))[0]
    assert not closed.screen.widgets[i].open and closed.screen.values() == task.screen.values()
    chosen = click(state, menu.item_boxes[-1])
    assert not chosen.screen.widgets[i].open and chosen.screen.widgets[i].chosen == menu.items[-1]
    assert task_success(task, chosen.screen) == (menu.items[-1] == task.steps[0].text)


def test_action_dataclasses_check_their_fields():
    for make, match in [(lambda: Click(-1, 0), "x=-1"), (lambda: Click(1, 2.5), "y=2.5"),
                        (lambda: Click(True, 1), "x=True"), (lambda: Type("naïve"), r"\['ï'\] are not in the font"),
                        (lambda: Type(3), "not a str"), (lambda: Scroll("left"), "direction='left'")]:
        with pytest.raises(ValueError, match=match):
            make()


def test_click_in_box_and_verifier_errors():
    box = (10, 20, 30, 25)
    assert click_in_box("click(10, 20)", box) and click_in_box(Click(29, 24), box)
    assert not click_in_box(Click(30, 22), box) and not click_in_box(Click(15, 25), box)
    assert not click_in_box("scroll(down)", box) and not click_in_box(Finished(), box)
    with pytest.raises(ValueError, match="malformed action"):
        click_in_box("click(1, 2", box)
    with pytest.raises(ValueError, match=r"box=\(5, 5, 5, 9\)"):
        click_in_box(Click(5, 5), (5, 5, 5, 9))
    task = TASKS[0]
    moved = dataclasses.replace(task.screen, widgets=task.screen.widgets[1:])
    with pytest.raises(ValueError, match="its widgets differ"):
        task_success(task, moved)
