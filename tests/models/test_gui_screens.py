"""GUI screens and tasks: deterministic from the key, widgets apart and legible, state changes drawn inside the
widget, every instruction's target on its screen."""

import dataclasses
import itertools
import re

import jax
import numpy as np
import pytest

from jaxlab.models import gui_screens, gui_tasks, vision
from jaxlab.models.gui_screens import FONT, TEXT_COLOR, ScreenConfig, label_box, make_screen, render, text_mask
from jaxlab.models.gui_tasks import TASK_KINDS, make_task, make_tasks

SCREENS = [make_screen(jax.random.PRNGKey(i)) for i in range(40)]
BIG = ScreenConfig(sizes=((320, 448),), tall_fraction=0.5)


def whole_page(screen, open_menus=False):
    """The page rendered at once (a viewport as tall as the page), menus opened on request."""
    widgets = tuple(dataclasses.replace(w, open=True) if open_menus and w.kind == "menu" else w
                    for w in screen.widgets)
    return render(dataclasses.replace(screen, height=screen.page_height, scroll=0, widgets=widgets))


def overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_font_covers_letters_digits_space_and_glyphs_differ():
    import string

    assert set(string.ascii_letters + string.digits + " .,-_!?:/'()@+=") <= set(FONT)
    glyphs = {c: g.tobytes() for c, g in FONT.items()}
    assert all(g.shape == (7, 5) for g in FONT.values())
    assert len(set(glyphs.values())) == len(glyphs), "two characters share a glyph"
    assert text_mask("Hi", 2).shape == (14, 22) and text_mask("", 1).shape == (7, 0)
    with pytest.raises(ValueError, match=r"characters \['é'\]"):
        text_mask("café")


def test_screens_are_a_function_of_the_key():
    a, b = make_screen(jax.random.PRNGKey(7)), make_screen(jax.random.PRNGKey(7))
    assert a == b and np.array_equal(render(a), render(b))
    assert make_screen(jax.random.PRNGKey(8)).widgets != a.widgets
    tasks = make_tasks(jax.random.PRNGKey(3), 4)
    assert [t.instruction for t in make_tasks(jax.random.PRNGKey(3), 2)] == [t.instruction for t in tasks[:2]]


def test_sizes_layout_and_non_overlap():
    cfg = ScreenConfig()
    seen_sizes, tall = set(), 0
    for screen in SCREENS:
        H, W = screen.height, screen.width
        seen_sizes.add((H, W))
        assert (H, W) in cfg.sizes and screen.page_height in (H, 2 * H) and screen.scale == 1
        tall += screen.page_height == 2 * H
        kinds = [w.kind for w in screen.widgets]
        assert {"button", "text_field", "checkbox"} <= set(kinds) and len(kinds) <= cfg.max_widgets
        labels = [w.label for w in screen.widgets] + [i for w in screen.widgets for i in w.items]
        assert len(labels) == len(set(labels)), labels
        for w in screen.widgets:
            x0, y0, x1, y1 = w.extent
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= screen.page_height, (w, H, W)
            if w.kind == "menu":  # a menu and its list lie in the first viewport
                assert y1 <= H and all(overlap(b, w.extent) for b in w.item_boxes)
        for u, v in itertools.combinations(screen.widgets, 2):
            assert not overlap(u.extent, v.extent), (u, v)
    assert seen_sizes == set(cfg.sizes) and 0 < tall < len(SCREENS)
    packed = vision.pack_images([render(s) for s in SCREENS[:6]], patch_size=16, max_len=160)  # the ViT's input
    assert sorted(map(tuple, packed.grid_hw)) == sorted((s.height // 16, s.width // 16) for s in SCREENS[:6])
    big = make_screen(jax.random.PRNGKey(0), BIG)
    assert big.scale == 2 and big.widgets[0].box[3] - big.widgets[0].box[1] == 2 * 13  # the layout scales


@pytest.mark.parametrize("screens", [SCREENS[:12], [make_screen(jax.random.PRNGKey(i), BIG) for i in range(3)]],
                         ids=["default", "scale2"])
def test_every_label_is_legible(screens):
    """Each label's ink (menu items too, opened) is drawn exactly, in the text colour no other pixel of its
    rectangle has, inside the widget's box."""
    for screen in screens:
        s = screen.scale
        page = whole_page(screen, open_menus=True)
        texts = [(w.label, label_box(w, s), w.box) for w in screen.widgets]
        texts += [(t, (b[0] + 3 * s, b[1] + 2 * s, b[0] + 3 * s + gui_screens.text_width(t, s), b[1] + 9 * s), b)
                  for w in screen.widgets for t, b in zip(w.items, w.item_boxes)]
        for text, (x0, y0, x1, y1), box in texts:
            assert box[0] <= x0 and x1 <= box[2] and box[1] <= y0 and y1 <= box[3], (text, box)
            ink = np.all(page[y0:y1, x0:x1] == TEXT_COLOR, axis=-1)
            assert np.array_equal(ink, text_mask(text, s)), text


def test_render_scrolls_the_page():
    screen = next(s for s in SCREENS if s.page_height == 2 * s.height)
    page = whole_page(screen)
    for scroll in range(0, screen.height + 1, screen.scroll_step):
        view = render(dataclasses.replace(screen, scroll=scroll))
        assert view.dtype == np.uint8 and view.shape == (screen.height, screen.width, 3)
        assert np.array_equal(view, page[scroll:scroll + screen.height])
    assert screen.scrolled("up") == 0 and dataclasses.replace(screen, scroll=screen.height).scrolled("down") == \
        screen.height


def test_state_changes_redraw_inside_the_widget_only():
    changed = set()
    for screen in SCREENS[:10]:
        before = whole_page(screen)
        for i, w in enumerate(screen.widgets):
            edits = {"checkbox": [dict(checked=not w.checked)], "text_field": [dict(text="hi 42"), dict(focus=i)],
                     "menu": [dict(open=True)], "button": []}[w.kind]
            for edit in edits:
                focus = edit.pop("focus", -1)
                widgets = screen.widgets[:i] + (dataclasses.replace(w, **edit),) + screen.widgets[i + 1:]
                after = render(dataclasses.replace(screen, height=screen.page_height, widgets=widgets, focus=focus))
                diff = np.any(after != before, axis=-1)
                x0, y0, x1, y1 = w.extent
                assert diff.any(), (w.kind, edit, focus)
                assert not diff[:y0].any() and not diff[y1:].any() and not diff[:, :x0].any() and \
                    not diff[:, x1:].any(), (w.kind, edit, focus)
                changed.add(w.kind)
    assert changed == {"checkbox", "text_field", "menu"}


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"sizes=.*below 80 x 112"):
        ScreenConfig(sizes=((64, 64),))
    with pytest.raises(ValueError, match="sizes="):
        ScreenConfig(sizes=(96, 128))
    with pytest.raises(ValueError, match="tall_fraction=1.5"):
        ScreenConfig(tall_fraction=1.5)
    with pytest.raises(ValueError, match="max_widgets=2"):
        ScreenConfig(max_widgets=2)
    with pytest.raises(ValueError, match="kinds="):
        make_task(jax.random.PRNGKey(0), kinds=("drag",))


PATTERNS = {
    "click": r"click the (.+) button", "scroll": r"scroll down and click the (.+) button",
    "type": r"type (.+) into the (.+) field", "check": r"(check|uncheck) the (.+) box",
    "menu": r"open the (.+) menu and click (.+)", "form": r"type (.+) into the (.+) field, then click the (.+) button",
}


def test_every_instruction_names_a_target_on_its_screen():
    tasks = make_tasks(jax.random.PRNGKey(0), 150)
    assert {t.kind for t in tasks} == set(TASK_KINDS)
    for task in tasks:
        screen, widgets = task.screen, task.screen.widgets
        match = re.fullmatch(PATTERNS[task.kind], task.instruction)
        assert match, task.instruction
        by_label = {(w.label, w.kind): i for i, w in enumerate(widgets)}
        g = match.groups()
        named = {"click": [(0, "button")], "scroll": [(0, "button")], "type": [(1, "text_field")],
                 "check": [(1, "checkbox")], "menu": [(0, "menu")], "form": [(1, "text_field"), (2, "button")]}
        named = [(g[k], kind) for k, kind in named[task.kind]]
        assert all(n in by_label for n in named), (task.instruction, named)
        assert task.targets == tuple(by_label[n] for n in named)
        for i in task.targets:
            box = widgets[i].box
            assert screen.visible(box, 0) != (task.kind == "scroll"), task.instruction  # scroll: wholly below
            assert task.kind != "scroll" or box[1] >= screen.height
        if task.kind == "check":
            assert (g[0] == "uncheck") == widgets[task.targets[0]].checked
        if task.kind == "menu":
            assert g[1] in widgets[task.targets[0]].items
        changed = [i for i, (a, b) in enumerate(zip(screen.values(), task.goal)) if a != b]
        assert changed == sorted(set(task.targets)), task.instruction
        typed = [step.text for step in task.steps if step.action == "type"]
        assert all(widgets[i].text == "" for i in task.targets) and all(t in task.instruction for t in typed)
    only = make_tasks(jax.random.PRNGKey(1), 40, kinds=("scroll",))  # the button wholly below the first viewport
    assert all(t.kind == "scroll" and t.screen.widgets[t.targets[0]].box[1] >= t.screen.height for t in only)
    with pytest.raises(ValueError, match="no screen in 100 draws"):
        make_task(jax.random.PRNGKey(0), ScreenConfig(tall_fraction=0.0), kinds=("scroll",))


def test_offered_targets_lie_in_the_first_viewport_or_wholly_below_it():
    straddling = 0
    tall = [make_screen(jax.random.PRNGKey(100 + i), ScreenConfig(tall_fraction=1.0)) for i in range(30)]
    for screen in SCREENS + tall:
        offered = gui_tasks.offered_targets(screen)
        H, widgets = screen.height, screen.widgets
        for kind, widget_kind in [("click", "button"), ("type", "text_field"), ("check", "checkbox"), ("menu", "menu")]:
            expected = [i for i, w in enumerate(widgets) if w.kind == widget_kind and w.box[3] <= H]
            assert offered.get(kind, []) == expected, kind
        below = [i for i, w in enumerate(widgets) if w.kind == "button" and w.box[1] >= H]
        assert offered.get("scroll", []) == below and (screen.page_height > H) == bool(below)
        straddling += sum(w.kind == "button" and w.box[1] < H < w.box[3] for w in widgets)
    assert straddling > 0  # buttons across the fold exist, and are neither "click" nor "scroll" targets


def test_goal_values_reject_steps_on_the_wrong_widget():
    task = make_task(jax.random.PRNGKey(0), kinds=("click",))
    button = task.targets[0]
    field = next(i for i, w in enumerate(task.screen.widgets) if w.kind == "text_field")
    with pytest.raises(ValueError, match="is a button"):
        gui_tasks.goal_values(task.screen, (gui_tasks.Step("type", button, "x"),))
    with pytest.raises(ValueError, match="names widget 99"):
        gui_tasks.goal_values(task.screen, (gui_tasks.Step("click", 99),))
    with pytest.raises(ValueError, match="action='drag'"):
        gui_tasks.Step("drag", field)
