"""Eager argument checks shared by the callbacks, with messages that name the argument."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning_rank.targets import ModuleSelector


def check_positive_int(value: Any, argument: str) -> int:
    """``value`` if it is an int >= 1, else a ``ValueError`` naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive int, got {value!r}")
    return value


def check_selector(selector: Any, argument: str) -> ModuleSelector:
    """Check the form of a module selector now; whether its names exist is checked against the model later."""
    if selector is None or callable(selector):
        return selector
    if isinstance(selector, str):
        try:
            re.compile(selector)
        except re.error as err:
            raise ValueError(f"`{argument}`={selector!r} is not a valid regular expression: {err}") from None
        return selector
    if isinstance(selector, Sequence) and all(isinstance(item, str) for item in selector):
        if not selector and argument == "target_modules":
            raise ValueError("`target_modules` is an empty list; pass None to select every layer")
        return list(selector)
    raise TypeError(
        f"`{argument}` must be None, a regex str, a list of names or a callable (module, name) -> bool, "
        f"got {selector!r}"
    )
