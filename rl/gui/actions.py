"""GUI actions as text (UI-TARS, Qin et al. 2025, arXiv 2501.12326, its unified action space): what a
policy writes, parsed on the host into a small dataclass.

    click(x, y)        a left click at viewport pixel (x, y): x the column, y the row, both ints >= 0
    type("text")       type text into the focused field ('\\"' and '\\\\' escape a quote and a backslash)
    scroll(up|down)    move the viewport half its height (scroll(down) shows rows further down the page)
    finished()         end the episode; success is judged on the screen as it is then

Whitespace around the action, its arguments and commas is allowed; anything else (another name, a
missing or extra argument, a negative or fractional coordinate, an unterminated string, a character
the screens' font lacks, text after the closing parenthesis) is a ``ValueError`` quoting the text, naming
the problem and stating what was expected. :func:`format_action` writes the canonical text back
(``parse_action(format_action(a)) == a``).

    parse_action('click(40, 17)')      # Click(x=40, y=17)
    parse_action('type("hello")')      # Type(text='hello')
"""

from __future__ import annotations

import dataclasses
import re

from jaxlab.models.gui_screens import FONT

__all__ = ["ACTION_SPACE", "SCROLL_DIRECTIONS", "Action", "Click", "Finished", "Scroll", "Type", "format_action",
           "parse_action"]

SCROLL_DIRECTIONS = ("up", "down")
ACTION_SPACE = 'click(x, y), type("text"), scroll(up|down), finished()'
"""The action space, as a policy's prompt states it and as errors quote it."""


@dataclasses.dataclass(frozen=True)
class Click:
    x: int
    """Column in viewport pixels."""
    y: int
    """Row in viewport pixels."""

    def __post_init__(self):
        for name in ("x", "y"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Click {name}={value!r} must be an int >= 0")


@dataclasses.dataclass(frozen=True)
class Type:
    text: str

    def __post_init__(self):
        bad = sorted(set(self.text) - set(FONT)) if isinstance(self.text, str) else None
        if bad is None or bad:
            raise ValueError(f"Type text={self.text!r} must be a str of characters screens can show "
                             f"({'not a str' if bad is None else f'{bad} are not in the font'})")


@dataclasses.dataclass(frozen=True)
class Scroll:
    direction: str
    """"up" or "down"."""

    def __post_init__(self):
        if self.direction not in SCROLL_DIRECTIONS:
            raise ValueError(f"Scroll direction={self.direction!r} must be one of {SCROLL_DIRECTIONS}")


@dataclasses.dataclass(frozen=True)
class Finished:
    pass


Action = Click | Type | Scroll | Finished

_CALL = re.compile(r"\s*([A-Za-z_]\w*)\s*\((.*)\)\s*", re.DOTALL)
_INT = re.compile(r"\s*([0-9]+)\s*")
_STRING = re.compile(r'\s*"((?:[^"\\]|\\.)*)"\s*', re.DOTALL)
_OPEN_STRING = re.compile(r'\s*"(?:[^"\\]|\\.)*\\?', re.DOTALL)  # a quote opened, never closed
_EXPECTED = {"click": "click(x, y) with two ints >= 0", "type": 'type("text") with one double-quoted string',
             "scroll": "scroll(up) or scroll(down)", "finished": "finished() with no arguments"}


def _error(text: str, problem: str, name: str | None = None) -> ValueError:
    expected = _EXPECTED[name] if name in _EXPECTED else f"one of {ACTION_SPACE}"
    return ValueError(f"malformed action {text!r}: {problem}; expected {expected}")


def parse_action(text: str) -> Action:
    """The action written in ``text`` (see the module docstring); ``ValueError`` if it is malformed."""
    if not isinstance(text, str):
        raise TypeError(f"an action is a str, got {type(text).__name__} {text!r}")
    call = _CALL.fullmatch(text)
    if call is None:
        problem = ("it is empty" if not text.strip() else "it does not end with ')'" if "(" in text
                   else "it is not a call name(arguments)")
        raise _error(text, problem)
    name, args = call.groups()
    if name not in _EXPECTED:
        raise _error(text, f"unknown action {name!r}")
    if name == "click":
        parts = args.split(",")
        if len(parts) != 2:
            raise _error(text, f"click takes 2 arguments, got {len(parts) if args.strip() else 0}", name)
        coords = [_INT.fullmatch(p) for p in parts]
        for axis, part, match in zip("xy", parts, coords, strict=True):
            if match is None:
                raise _error(text, f"{axis}={part.strip()!r} is not an int >= 0", name)
        return Click(int(coords[0].group(1)), int(coords[1].group(1)))
    if name == "type":
        match = _STRING.fullmatch(args)
        if match is None:
            problem = ("the string is not terminated" if _OPEN_STRING.fullmatch(args)
                       else f"the argument {args.strip()!r} is not one double-quoted string")
            raise _error(text, problem, name)
        body = re.sub(r"\\(.)", r"\1", match.group(1), flags=re.DOTALL)
        bad = sorted(set(body) - set(FONT))
        if bad:
            raise _error(text, f"the text has characters {bad} that screens cannot show", name)
        return Type(body)
    if name == "scroll":
        direction = args.strip()
        if direction not in SCROLL_DIRECTIONS:
            raise _error(text, f"direction {direction!r} is not one of {SCROLL_DIRECTIONS}", name)
        return Scroll(direction)
    if args.strip():
        raise _error(text, f"finished takes no arguments, got {args.strip()!r}", name)
    return Finished()


def format_action(action: Action) -> str:
    """The canonical text of ``action`` (what :func:`parse_action` reads back as the same action)."""
    if isinstance(action, Click):
        return f"click({action.x}, {action.y})"
    if isinstance(action, Type):
        escaped = action.text.replace("\\", "\\\\").replace('"', '\\"')
        return f'type("{escaped}")'
    if isinstance(action, Scroll):
        return f"scroll({action.direction})"
    if isinstance(action, Finished):
        return "finished()"
    raise TypeError(f"not an action: {action!r} (expected Click, Type, Scroll or Finished)")
