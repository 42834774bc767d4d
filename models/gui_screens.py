"""Procedurally rendered GUI screens for grounding and GUI-agent tasks (the setting of UI-TARS, Qin et al.
2025, "UI-TARS: Pioneering Automated GUI Interaction with Native Agents", arXiv 2501.12326: a screenshot in,
an action on screen coordinates out).

A screen is a page of widgets on a plain background, seen through a viewport of ``height x width`` pixels
(one of ``ScreenConfig.sizes``, part of the sample). Pages are as tall as the viewport, or twice as tall
("tall" screens, scrolled by ``scroll_step = height // 2`` pixels at a time). Widgets:

* ``button``: a filled rectangle with its label centred;
* ``text_field``: its label, then an input rectangle holding the typed text (``capacity`` characters
  shown; the tail of a longer text); a focused field has a blue border and a cursor;
* ``checkbox``: a square (a blue mark inside when ``checked``), then its label;
* ``menu``: a menu button (label and a down arrow) whose items open in a list right below it.

Every widget has a box ``(x0, y0, x1, y1)`` in page pixels (``x0 <= x < x1``, ``y0 <= y < y1``; the
viewport shows page rows ``scroll .. scroll + height - 1``) that covers it whole (a field's or checkbox's
label included: clicking a label acts on its widget, as an HTML ``<label>`` does); a menu's items have
boxes of their own, and its ``extent`` (button and item list) is kept free of every other widget, so no
two widgets ever overlap, open menus included. Labels are unique on a screen.

Labels and typed text are drawn with :data:`FONT`, a built-in 5 x 7 bitmap font (``[A-Za-z0-9]``, space
and a few symbols), each glyph ``scale`` pixels per font pixel (``scale = max(1, min(H, W) // 160)``; all
sizes in the layout are multiples of it, so the layout scales with the screen). :func:`render` returns
uint8 ``[height, width, 3]`` RGB, the viewport at the screen's scroll offset; text is drawn in
:data:`TEXT_COLOR`, a colour no fill or background uses, so a label's pixels can be read back exactly
(:func:`text_mask`, :func:`label_box`).

Screens are drawn from a JAX PRNG key (its bits seed a NumPy generator, as in
:mod:`jaxlab.models.vision_data`): the same key gives the same screen everywhere. The state a
screen carries (checkbox marks, field texts, button presses, open menus and their chosen items, the scroll
offset and the focused field) is what :func:`jaxlab.rl.gui.env.env_step` changes; tasks over screens are
in :mod:`jaxlab.models.gui_tasks`.

    screen = make_screen(jax.random.PRNGKey(0), ScreenConfig())
    image = render(screen)                                   # uint8 [H, W, 3]
    [(w.kind, w.label, w.box) for w in screen.widgets]
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlab.models.vision_data import host_rng
from jaxlab.validation import check, check_range

__all__ = ["BUTTONS", "CHECKBOXES", "FIELDS", "FONT", "MENUS", "TEXT_COLOR", "WIDGET_KINDS", "Box", "Screen",
           "ScreenConfig", "Widget", "field_box", "label_box", "make_screen", "render", "text_mask", "text_width"]

Box = tuple[int, int, int, int]
"""(x0, y0, x1, y1) in pixels, x1 and y1 exclusive."""

_FONT_ROWS = {  # 5 x 7 glyphs, rows top to bottom, "X" = ink
    "A": ".XXX. X...X X...X XXXXX X...X X...X X...X", "B": "XXXX. X...X X...X XXXX. X...X X...X XXXX.",
    "C": ".XXX. X...X X.... X.... X.... X...X .XXX.", "D": "XXX.. X..X. X...X X...X X...X X..X. XXX..",
    "E": "XXXXX X.... X.... XXXX. X.... X.... XXXXX", "F": "XXXXX X.... X.... XXXX. X.... X.... X....",
    "G": ".XXX. X...X X.... X.XXX X...X X...X .XXXX", "H": "X...X X...X X...X XXXXX X...X X...X X...X",
    "I": ".XXX. ..X.. ..X.. ..X.. ..X.. ..X.. .XXX.", "J": "..XXX ...X. ...X. ...X. ...X. X..X. .XX..",
    "K": "X...X X..X. X.X.. XX... X.X.. X..X. X...X", "L": "X.... X.... X.... X.... X.... X.... XXXXX",
    "M": "X...X XX.XX X.X.X X.X.X X...X X...X X...X", "N": "X...X X...X XX..X X.X.X X..XX X...X X...X",
    "O": ".XXX. X...X X...X X...X X...X X...X .XXX.", "P": "XXXX. X...X X...X XXXX. X.... X.... X....",
    "Q": ".XXX. X...X X...X X...X X.X.X X..X. .XX.X", "R": "XXXX. X...X X...X XXXX. X.X.. X..X. X...X",
    "S": ".XXXX X.... X.... .XXX. ....X ....X XXXX.", "T": "XXXXX ..X.. ..X.. ..X.. ..X.. ..X.. ..X..",
    "U": "X...X X...X X...X X...X X...X X...X .XXX.", "V": "X...X X...X X...X X...X X...X .X.X. ..X..",
    "W": "X...X X...X X...X X.X.X X.X.X X.X.X .X.X.", "X": "X...X X...X .X.X. ..X.. .X.X. X...X X...X",
    "Y": "X...X X...X .X.X. ..X.. ..X.. ..X.. ..X..", "Z": "XXXXX ....X ...X. ..X.. .X... X.... XXXXX",
    "a": "..... ..... .XXX. ....X .XXXX X...X .XXXX", "b": "X.... X.... X.XX. XX..X X...X X...X XXXX.",
    "c": "..... ..... .XXX. X.... X.... X...X .XXX.", "d": "....X ....X .XX.X X..XX X...X X...X .XXXX",
    "e": "..... ..... .XXX. X...X XXXXX X.... .XXX.", "f": "..XX. .X..X .X... XXX.. .X... .X... .X...",
    "g": "..... .XXXX X...X X...X .XXXX ....X .XXX.", "h": "X.... X.... X.XX. XX..X X...X X...X X...X",
    "i": "..X.. ..... .XX.. ..X.. ..X.. ..X.. .XXX.", "j": "...X. ..... ..XX. ...X. ...X. X..X. .XX..",
    "k": "X.... X.... X..X. X.X.. XX... X.X.. X..X.", "l": ".XX.. ..X.. ..X.. ..X.. ..X.. ..X.. .XXX.",
    "m": "..... ..... XX.X. X.X.X X.X.X X...X X...X", "n": "..... ..... X.XX. XX..X X...X X...X X...X",
    "o": "..... ..... .XXX. X...X X...X X...X .XXX.", "p": "..... ..... XXXX. X...X XXXX. X.... X....",
    "q": "..... ..... .XX.X X..XX .XXXX ....X ....X", "r": "..... ..... X.XX. XX..X X.... X.... X....",
    "s": "..... ..... .XXX. X.... .XXX. ....X XXXX.", "t": ".X... .X... XXX.. .X... .X... .X..X ..XX.",
    "u": "..... ..... X...X X...X X...X X..XX .XX.X", "v": "..... ..... X...X X...X X...X .X.X. ..X..",
    "w": "..... ..... X...X X...X X.X.X X.X.X .X.X.", "x": "..... ..... X...X .X.X. ..X.. .X.X. X...X",
    "y": "..... ..... X...X X...X .XXXX ....X .XXX.", "z": "..... ..... XXXXX ...X. ..X.. .X... XXXXX",
    "0": ".XXX. X...X X..XX X.X.X XX..X X...X .XXX.", "1": "..X.. .XX.. ..X.. ..X.. ..X.. ..X.. .XXX.",
    "2": ".XXX. X...X ....X ...X. ..X.. .X... XXXXX", "3": "XXXXX ...X. ..X.. ...X. ....X X...X .XXX.",
    "4": "...X. ..XX. .X.X. X..X. XXXXX ...X. ...X.", "5": "XXXXX X.... XXXX. ....X ....X X...X .XXX.",
    "6": "..XX. .X... X.... XXXX. X...X X...X .XXX.", "7": "XXXXX ....X ...X. ..X.. .X... .X... .X...",
    "8": ".XXX. X...X X...X .XXX. X...X X...X .XXX.", "9": ".XXX. X...X X...X .XXXX ....X ...X. .XX..",
    " ": "..... ..... ..... ..... ..... ..... .....", ".": "..... ..... ..... ..... ..... .XX.. .XX..",
    ",": "..... ..... ..... ..... .XX.. ..X.. .X...", "-": "..... ..... ..... XXXXX ..... ..... .....",
    "_": "..... ..... ..... ..... ..... ..... XXXXX", "!": "..X.. ..X.. ..X.. ..X.. ..X.. ..... ..X..",
    "?": ".XXX. X...X ....X ...X. ..X.. ..... ..X..", ":": "..... .XX.. .XX.. ..... .XX.. .XX.. .....",
    "/": "..... ....X ...X. ..X.. .X... X.... .....", "'": "..X.. ..X.. .X... ..... ..... ..... .....",
    "(": "...X. ..X.. .X... .X... .X... ..X.. ...X.", ")": ".X... ..X.. ...X. ...X. ...X. ..X.. .X...",
    "@": ".XXX. X...X ....X .XX.X X.X.X X.X.X .XXX.", "+": "..... ..X.. ..X.. XXXXX ..X.. ..X.. .....",
    "=": "..... ..... XXXXX ..... XXXXX ..... .....", '"': ".X.X. .X.X. .X.X. ..... ..... ..... .....",
    "\\": "..... X.... .X... ..X.. ...X. ....X .....",
}
FONT = {c: np.array([[p == "X" for p in row] for row in rows.split()], bool) for c, rows in _FONT_ROWS.items()}
"""The built-in font: character -> bool [7, 5] glyph (1 pixel of spacing between characters)."""
GLYPH_H, GLYPH_W = 7, 5

WIDGET_KINDS = ("button", "text_field", "checkbox", "menu")
BUTTONS = ("Save", "Cancel", "OK", "Submit", "Apply", "Delete", "Next", "Back", "Send", "Close", "Reset",
           "Login", "Search", "Upload", "Continue")
FIELDS = ("Name", "Email", "City", "Phone", "User", "Password", "Title", "Age", "Code", "Country")
CHECKBOXES = ("Remember me", "Dark mode", "Subscribe", "I agree", "Notify me", "Auto save", "Show all",
              "Private")
MENUS = {"File": ("New", "Open", "Export", "Print", "Quit"), "Edit": ("Undo", "Redo", "Copy", "Paste"),
         "View": ("Zoom in", "Zoom out", "Full screen"), "Tools": ("Options", "Spelling", "Macros"),
         "Format": ("Bold", "Italic", "Underline")}
"""Label vocabularies; no word is in two of them, so every label on a screen is unique."""
FIELD_CHARS = 8
"""Characters a text field shows (its input rectangle's width)."""

TEXT_COLOR = (16, 16, 16)
_BORDER, _WHITE, _FOCUS, _MARK, _MENU = (96, 96, 96), (255, 255, 255), (30, 90, 230), (30, 90, 230), (206, 210, 222)
_BACKGROUNDS = ((236, 236, 236), (246, 242, 230), (228, 238, 246), (238, 246, 232), (250, 250, 250))
_FILLS = ((200, 214, 240), (214, 232, 200), (240, 214, 200), (220, 220, 220), (236, 220, 244))


@dataclasses.dataclass(frozen=True)
class ScreenConfig:
    """Screen sizes and contents."""

    sizes: tuple[tuple[int, int], ...] = ((96, 128), (128, 160), (160, 224))
    """Viewport sizes (height, width) in pixels; each screen draws one (at least 80 x 112). The defaults are
    multiples of 32, so :func:`jaxlab.models.vision.pack_images` takes the renders as they are."""
    tall_fraction: float = 0.3
    """Fraction of screens whose page is twice the viewport's height (scrolled with scroll(down))."""
    max_widgets: int = 8
    """Most widgets on a screen: a button, a text field and a checkbox in the first viewport, the menus, on
    tall screens a button below the first viewport, then buttons, fields and checkboxes drawn at random
    anywhere on the page, as many as fit (at least 3)."""
    max_menus: int = 2
    """Most menus on a screen (0 to this many, each placed within the first viewport)."""

    def __post_init__(self):
        check(isinstance(self.sizes, tuple) and len(self.sizes) > 0 and all(
            isinstance(s, tuple) and len(s) == 2 and all(isinstance(v, int) for v in s) for s in self.sizes),
            f"sizes={self.sizes!r} must be a non-empty tuple of (height, width) int pairs")
        small = [s for s in self.sizes if s[0] < 80 or s[1] < 112]
        check(not small, f"sizes={self.sizes!r}: {small} below 80 x 112 (height x width) cannot hold every widget")
        check_range(self, "tall_fraction", 0.0, 1.0)
        check(isinstance(self.max_widgets, int) and self.max_widgets >= 3,
              f"max_widgets={self.max_widgets!r} must be an int >= 3 (a button, a text field, a checkbox)")
        check(isinstance(self.max_menus, int) and 0 <= self.max_menus <= len(MENUS),
              f"max_menus={self.max_menus!r} must be an int in [0, {len(MENUS)}]")


@dataclasses.dataclass(frozen=True)
class Widget:
    """One widget, its place and its state."""

    kind: str
    """One of ``WIDGET_KINDS``."""
    label: str
    box: Box
    """Page pixels covering the whole widget (a menu: its button)."""
    color: tuple[int, int, int] = _FILLS[0]
    """Fill of a button or menu button."""
    checked: bool = False
    """Checkbox state."""
    text: str = ""
    """Text field content."""
    presses: int = 0
    """Times a button was clicked."""
    items: tuple[str, ...] = ()
    """Menu items, top to bottom."""
    item_boxes: tuple[Box, ...] = ()
    """Page pixels of each menu item (shown and clickable while the menu is open)."""
    open: bool = False
    """Menu state: its item list shown."""
    chosen: str = ""
    """Menu: the item clicked last ("" before any)."""

    @property
    def value(self) -> tuple:
        """What a task's goal is about: (checked, text, presses, chosen); focus, scroll and open menus are not."""
        return self.checked, self.text, self.presses, self.chosen

    @property
    def extent(self) -> Box:
        """The box holding the widget and (a menu) its item list: no other widget intersects it."""
        boxes = (self.box, *self.item_boxes)
        return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                max(b[3] for b in boxes))


@dataclasses.dataclass(frozen=True)
class Screen:
    """A page of widgets, the viewport onto it and the interaction state (see the module docstring)."""

    height: int
    """Viewport height in pixels (what :func:`render` returns)."""
    width: int
    page_height: int
    """Page height: ``height`` or ``2 * height`` (tall screens)."""
    scale: int
    """Pixels per font pixel."""
    background: tuple[int, int, int]
    widgets: tuple[Widget, ...]
    scroll: int = 0
    """Page row shown at the top of the viewport, in ``[0, page_height - height]``."""
    focus: int = -1
    """Index of the focused text field; -1: none."""

    @property
    def scroll_step(self) -> int:
        return self.height // 2

    def scrolled(self, direction: str) -> int:
        """The scroll offset after one ``scroll(direction)``, clamped to the page."""
        if direction not in ("up", "down"):
            raise ValueError(f"direction={direction!r} must be 'up' or 'down'")
        step = self.scroll_step if direction == "down" else -self.scroll_step
        return min(max(self.scroll + step, 0), self.page_height - self.height)

    def visible(self, box: Box, scroll: int | None = None) -> bool:
        """Whether the page box lies wholly inside the viewport at ``scroll`` (default: the screen's)."""
        scroll = self.scroll if scroll is None else scroll
        return box[1] >= scroll and box[3] <= scroll + self.height

    def values(self) -> tuple[tuple, ...]:
        """Every widget's :attr:`Widget.value`, in order."""
        return tuple(w.value for w in self.widgets)


def text_width(text: str, scale: int = 1) -> int:
    """Pixel width of ``text`` drawn with :data:`FONT`."""
    return max(len(text) * (GLYPH_W + 1) - 1, 0) * scale


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """bool [7 scale, text_width(text, scale)]: the ink of ``text`` (unknown characters are an error)."""
    bad = sorted(set(text) - set(FONT))
    if bad:
        raise ValueError(f"text={text!r} has characters {bad} the built-in font lacks (it has {''.join(FONT)!r})")
    mask = np.zeros((GLYPH_H, max(len(text) * (GLYPH_W + 1) - 1, 0)), bool)
    for i, c in enumerate(text):
        mask[:, i * (GLYPH_W + 1):i * (GLYPH_W + 1) + GLYPH_W] = FONT[c]
    return np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)


# ---- layout: every size a multiple of the scale s -------------------------------------------------
def _pad(s):
    return 3 * s


def _row_h(s):  # button, field, checkbox and menu-button height
    return GLYPH_H * s + 2 * _pad(s)


def _item_h(s):
    return GLYPH_H * s + 4 * s


def _field_w(s):
    return text_width("x" * FIELD_CHARS, s) + 2 * _pad(s)


def _size(kind: str, label: str, s: int) -> tuple[int, int]:
    """(width, height) of a widget's box."""
    tw = text_width(label, s)
    width = {"button": tw + 2 * _pad(s) + 2 * s, "text_field": tw + 4 * s + _field_w(s),
             "checkbox": 9 * s + 3 * s + tw, "menu": tw + 7 * s + 2 * _pad(s)}[kind]
    return width, _row_h(s)


def field_box(widget: Widget, scale: int) -> Box:
    """A text field's input rectangle (page pixels)."""
    x0, y0, x1, y1 = widget.box
    return x1 - _field_w(scale), y0, x1, y1


def label_box(widget: Widget, scale: int) -> Box:
    """The rectangle of a widget's label ink (:func:`text_mask` of the label placed there), page pixels."""
    x0, y0, x1, y1 = widget.box
    tw, th = text_width(widget.label, scale), GLYPH_H * scale
    y = y0 + (y1 - y0 - th) // 2
    if widget.kind == "button":
        x = x0 + (x1 - x0 - tw) // 2
    elif widget.kind == "checkbox":
        x = x0 + 12 * scale
    else:  # text field, menu: label first
        x = x0 + (_pad(scale) if widget.kind == "menu" else 0)
    return x, y, x + tw, y + th


def _menu_items(label, items, box, s) -> tuple[Box, ...]:
    x0, _, x1, y1 = box
    width = max(x1 - x0, max(text_width(t, s) for t in items) + 2 * _pad(s))
    return tuple((x0, y1 + i * _item_h(s), x0 + width, y1 + (i + 1) * _item_h(s)) for i in range(len(items)))


def _overlaps(a: Box, b: Box, gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _place(rng, taken: list[Box], w: int, h: int, width: int, y_lo: int, y_hi: int, s: int) -> Box | None:
    """A free spot for a ``w x h`` footprint with ``y_lo <= y0`` and ``y1 <= y_hi``, at least 2s pixels from
    every footprint in ``taken`` and from the page's sides; None if 200 random tries find none."""
    margin = 2 * s
    if w > width - 2 * margin or y_hi - y_lo - 2 * margin < h:
        return None
    for _ in range(200):
        x0 = int(rng.integers(margin, width - margin - w + 1))
        y0 = int(rng.integers(y_lo + margin, y_hi - margin - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        if not any(_overlaps(box, t, margin) for t in taken):
            return box
    return None


def make_screen(key, cfg: ScreenConfig = ScreenConfig()) -> Screen:
    """One screen drawn from the PRNG ``key`` (see the module docstring)."""
    rng = host_rng(key)
    H, W = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
    tall = bool(rng.random() < cfg.tall_fraction)
    page_h, s = (2 * H if tall else H), max(1, min(H, W) // 160)
    pick = lambda words, n: [str(x) for x in rng.choice(words, size=n, replace=False)]  # noqa: E731
    fill = lambda: _FILLS[int(rng.integers(len(_FILLS)))]  # noqa: E731
    unused = {"button": pick(BUTTONS, len(BUTTONS)), "text_field": pick(FIELDS, len(FIELDS)),
              "checkbox": pick(CHECKBOXES, len(CHECKBOXES))}  # labels in a random order, each used once
    # (kind, label, region): "top" = within the first viewport, "below" = wholly under it, "page" = anywhere
    plan = [(kind, unused[kind].pop(), "top") for kind in ("button", "text_field", "checkbox")]
    plan += [("menu", m, "top") for m in pick(list(MENUS), int(rng.integers(cfg.max_menus + 1)))]
    if tall:
        plan.append(("button", unused["button"].pop(), "below"))
    for kind in rng.choice(list(unused), size=max(cfg.max_widgets - len(plan), 0)):
        if unused[str(kind)]:
            plan.append((str(kind), unused[str(kind)].pop(), "page"))
    regions = {"top": (0, H), "below": (H, page_h), "page": (0, page_h)}
    widgets, taken = [], []
    for kind, label, region in plan:
        if len(widgets) == cfg.max_widgets:
            break
        w, h = _size(kind, label, s)
        items = ()
        if kind == "menu":
            all_items = MENUS[label]
            keep = np.sort(rng.choice(len(all_items), size=int(rng.integers(3, len(all_items) + 1)), replace=False))
            items = tuple(all_items[i] for i in keep)
            probe = _menu_items(label, items, (0, 0, w, h), s)
            w, h = max(w, probe[-1][2]), probe[-1][3]  # the footprint: button and item list
        spot = _place(rng, taken, w, h, W, *regions[region], s)
        if spot is None:
            continue
        taken.append(spot)
        bw, bh = _size(kind, label, s)
        box = (spot[0], spot[1], spot[0] + bw, spot[1] + bh)
        widgets.append(Widget(kind, label, box, color=fill(), checked=bool(kind == "checkbox" and rng.random() < 0.5),
                              items=items, item_boxes=_menu_items(label, items, box, s) if items else ()))
    order = sorted(range(len(widgets)), key=lambda i: (widgets[i].box[1], widgets[i].box[0]))  # reading order
    return Screen(H, W, page_h, s, _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))],
                  tuple(widgets[i] for i in order))


# ---- rendering --------------------------------------------------------------------------------------
def _rect(canvas, box, color, border=None, thickness=1):
    x0, y0, x1, y1 = box
    canvas[y0:y1, x0:x1] = color
    if border is not None:
        t = thickness
        canvas[y0:y0 + t, x0:x1] = canvas[y1 - t:y1, x0:x1] = border
        canvas[y0:y1, x0:x0 + t] = canvas[y0:y1, x1 - t:x1] = border


def _text(canvas, text, x, y, s, color=TEXT_COLOR):
    mask = text_mask(text, s)
    canvas[y:y + mask.shape[0], x:x + mask.shape[1]][mask] = color


def _draw(canvas: np.ndarray, w: Widget, s: int, focused: bool) -> None:
    x0, y0, x1, y1 = w.box
    lx, ly, _, _ = label_box(w, s)
    if w.kind == "button":
        _rect(canvas, w.box, w.color, _BORDER)
    elif w.kind == "checkbox":
        top = y0 + (y1 - y0 - 9 * s) // 2
        _rect(canvas, (x0, top, x0 + 9 * s, top + 9 * s), _WHITE, _BORDER, s)
        if w.checked:
            canvas[top + 2 * s:top + 7 * s, x0 + 2 * s:x0 + 7 * s] = _MARK
    elif w.kind == "text_field":
        fx0, fy0, fx1, fy1 = field_box(w, s)
        _rect(canvas, (fx0, fy0, fx1, fy1), _WHITE, _FOCUS if focused else _BORDER, s)
        shown = w.text[len(w.text) - FIELD_CHARS:] if len(w.text) > FIELD_CHARS else w.text
        _text(canvas, shown, fx0 + _pad(s), ly, s)
        if focused:  # the cursor after the text
            cx = min(fx0 + _pad(s) + text_width(shown, s) + s, fx1 - 2 * s)
            canvas[ly:ly + GLYPH_H * s, cx:cx + s] = _FOCUS
    else:  # menu button: label and a down arrow; the item list when open
        _rect(canvas, w.box, _MENU if w.open else w.color, _BORDER)
        ax = x1 - _pad(s) - 5 * s
        for r in range(3):
            canvas[ly + (2 + r) * s:ly + (3 + r) * s, ax + r * s:ax + (5 - r) * s] = TEXT_COLOR
        if w.open:
            for item, box in zip(w.items, w.item_boxes, strict=True):
                _rect(canvas, box, _WHITE, _BORDER)
                _text(canvas, item, box[0] + _pad(s), box[1] + 2 * s, s)
    _text(canvas, w.label, lx, ly, s)


def render(screen: Screen) -> np.ndarray:
    """The viewport: uint8 [height, width, 3] RGB, page rows ``scroll .. scroll + height - 1``."""
    page = np.empty((screen.page_height, screen.width, 3), np.uint8)
    page[...] = screen.background
    for i, w in enumerate(screen.widgets):
        _draw(page, w, screen.scale, focused=i == screen.focus)
    return page[screen.scroll:screen.scroll + screen.height].copy()
