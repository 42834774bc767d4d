"""Config validation helpers: one way to check a frozen dataclass's fields in ``__post_init__``, with
errors that name the field and its value.

    def __post_init__(self):
        check_positive(self, "steps", "batch_size")             # numbers >= 1 (minimum=0: >= 0)
        check_greater(self, "lr", "temperature")                # numbers > 0
        check_choice(self, "mixer", MIXERS)
        check_range(self, "gamma", 0.0, 1.0)                    # 0 <= gamma <= 1
        check_range(self, "tau", 0.0, 1.0, open_low=True)       # 0 < tau <= 1
        check(self.batch % self.minibatches == 0, f"{self.batch=} ...")   # anything else
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

__all__ = ["check", "check_choice", "check_greater", "check_positive", "check_range"]


def check_positive(obj: Any, *names: str, minimum: int = 1, integer: bool = False) -> None:
    """``ValueError`` naming the first field of ``names`` that is not a number ``>= minimum`` (an int with
    ``integer``; booleans are not numbers here)."""
    kinds = (int,) if integer else (int, float)
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, kinds) or not value >= minimum:
            raise ValueError(f"{name}={value!r} must be {'an int ' if integer else ''}>= {minimum}")


def check_greater(obj: Any, *names: str, bound: float = 0.0) -> None:
    """``ValueError`` naming the first field of ``names`` that is not a number ``> bound`` (NaN fails)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > bound:
            raise ValueError(f"{name}={value!r} must be > {bound}")


def check_choice(obj: Any, name: str, choices: Collection[Any]) -> None:
    """``ValueError`` unless field ``name`` is one of ``choices``."""
    value = getattr(obj, name)
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {tuple(choices)}")


def check_range(obj: Any, name: str, low: float, high: float, *, open_low: bool = False,
                open_high: bool = False) -> None:
    """``ValueError`` unless ``low <= field <= high`` (``<`` at an open end; NaN fails)."""
    value = getattr(obj, name)
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    above = number and (value > low if open_low else value >= low)
    below = number and (value < high if open_high else value <= high)
    if not (above and below):
        raise ValueError(f"{name}={value!r} must be in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}")


def check(condition: bool, message: str) -> None:
    """``ValueError(message)`` unless ``condition``: for relations between fields that the helpers above do
    not express (the message names the fields and their values)."""
    if not condition:
        raise ValueError(message)
