"""Eager argument checks shared by the callbacks, with messages that name the argument."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning_rank.targets import ModuleSelector, float_dtype


def check_positive_int(value: Any, argument: str) -> int:
    """``value`` if it is an int >= 1, else a ``ValueError`` naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive int, got {value!r}")
    return value


def check_mask_fn(mask_fn: Any) -> None:
    """A ``TypeError`` naming ``mask_fn`` unless it is None or callable."""
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"`mask_fn` must be a callable batch -> bool mask or None, got {type(mask_fn).__name__}")


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


COLLECTION_ARGUMENTS = ("target_modules", "exclude_modules", "mask_fn", "max_rows_per_batch", "dtype", "seed")


def collection_arguments(
    target_modules: Any,
    exclude_modules: Any,
    mask_fn: Any,
    max_rows_per_batch: Any,
    dtype: Any,
    seed: Any,
) -> dict[str, Any]:
    """The statistics arguments both callbacks take, checked now: keyword arguments of ``StatisticsCollector``."""
    check_mask_fn(mask_fn)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {seed!r}")
    return {
        "target_modules": check_selector(target_modules, "target_modules"),
        "exclude_modules": check_selector(exclude_modules, "exclude_modules"),
        "mask_fn": mask_fn,
        "max_rows_per_batch": None if max_rows_per_batch is None else check_positive_int(
            max_rows_per_batch, "max_rows_per_batch"
        ),
        "dtype": float_dtype(dtype),
        "seed": seed,
    }


def collection_of(callback: Any) -> dict[str, Any]:
    """A callback's statistics arguments (its attributes of those names), as keyword arguments of ``StatisticsCollector``."""
    return {name: getattr(callback, name) for name in COLLECTION_ARGUMENTS}
