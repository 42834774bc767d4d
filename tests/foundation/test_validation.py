"""The config validation helpers: each accepts its boundary and rejects the value just past it, naming
the field and the value."""

import dataclasses
import math

import pytest

from jaxlab.validation import check, check_choice, check_greater, check_positive, check_range


@dataclasses.dataclass(frozen=True)
class _Cfg:
    x: object = 1


def _ok(fn, value, *args, **kwargs):
    fn(_Cfg(value), "x", *args, **kwargs)


def _bad(fn, value, message, *args, **kwargs):
    with pytest.raises(ValueError, match=message):
        fn(_Cfg(value), "x", *args, **kwargs)


def test_check_positive():
    _ok(check_positive, 1)
    _ok(check_positive, 0, minimum=0)
    _bad(check_positive, 0, r"x=0 must be >= 1")
    _bad(check_positive, 1.5, r"x=1.5 must be an int >= 1", integer=True)
    _bad(check_positive, True, "x=True")                     # a bool is not a number here
    _bad(check_positive, -1, r"x=-1 must be >= 0", minimum=0)


def test_check_greater():
    _ok(check_greater, 1e-9)
    _bad(check_greater, 0.0, r"x=0.0 must be > 0.0")
    _bad(check_greater, math.nan, "x=nan")


def test_check_range_closed_and_open_ends():
    _ok(check_range, 0.0, 0.0, 1.0)
    _ok(check_range, 1.0, 0.0, 1.0)
    _bad(check_range, 1.0001, r"x=1.0001 must be in \[0.0, 1.0\]", 0.0, 1.0)
    _ok(check_range, 1.0, 0.0, 1.0, open_low=True)
    _bad(check_range, 0.0, r"x=0.0 must be in \(0.0, 1.0\]", 0.0, 1.0, open_low=True)
    _bad(check_range, 1.0, r"x=1.0 must be in \[0.0, 1.0\)", 0.0, 1.0, open_high=True)
    _ok(check_range, 0.5, 0.0, 1.0, open_low=True, open_high=True)
    _bad(check_range, math.nan, "x=nan", 0.0, 1.0)


def test_check_choice_and_check():
    _ok(check_choice, "a", ("a", "b"))
    _bad(check_choice, "c", r"x='c' must be one of \('a', 'b'\)", ("a", "b"))
    check(True, "never raised")
    with pytest.raises(ValueError, match="num_minibatches=3 must divide"):
        check(False, "num_minibatches=3 must divide 40")
