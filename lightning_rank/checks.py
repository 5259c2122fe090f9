"""Argument checks shared by the functions and the callbacks, with messages that name the argument.

Every check that needs only the value lives here; checks against a model (do these names exist, can
this budget be met) live next to the code that selects layers (``targets.py``, ``factorize.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_rank.targets import ModuleSelector, float_dtype

__all__ = [
    "METHODS",
    "Method",
    "StatisticsArguments",
    "check_bool",
    "check_budget",
    "check_eig_dtype",
    "check_fraction",
    "check_compress_at_epoch",
    "check_forward",
    "check_method",
    "check_monitor",
    "check_optional_index",
    "check_positive_int",
    "check_row_policy",
    "check_rank_choice",
    "check_ranks",
    "check_selector",
    "check_threshold",
    "resolve_compress_at_epoch",
]

Method = Literal["projection", "whiten", "svd"]
METHODS: tuple[str, ...] = get_args(Method)
RankSpec = int | Mapping[str, int] | None
MaskFn = Callable[[Any], Tensor | None]


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float in ``(0, 1]``, or a ``ValueError`` that names it."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"`threshold` must be a number in (0, 1], got {threshold!r}")
    return float(threshold)


def check_positive_int(value: Any, argument: str) -> int:
    """``value`` if it is an int >= 1, else a ``ValueError`` naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive int, got {value!r}")
    return value


def check_row_policy(value: Any, argument: str = "max_rows_per_batch") -> Any:
    """``value`` if it is a row policy: ``"auto"``, ``None`` (every row) or an int >= 1, else an error naming ``argument``."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{argument}` must be \"auto\" (rows sized by each layer's fan_in), None (every row: exact statistics) "
            f"or a positive int (at most that many rows of each input per batch), got {value!r}"
        )
    return value


def check_optional_index(value: Any, argument: str) -> int | None:
    """``value`` if it is None or an int >= 0, else a ``ValueError`` naming ``argument``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"`{argument}` must be None or an int >= 0, got {value!r}")
    return value


def check_bool(value: Any, argument: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{argument}` must be a bool, got {value!r}")
    return value


def check_monitor(monitor: Any) -> str:
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"`monitor` must be the name of a logged validation metric, got {monitor!r}")
    return monitor


def check_forward(forward: Any) -> Callable[[Any, Any], Any] | None:
    if forward is not None and not callable(forward):
        raise TypeError(f"`forward` must be a callable (model, batch) -> output or None, got {type(forward).__name__}")
    return forward


def check_method(method: Any) -> Method:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return method


def check_fraction(value: Any, argument: str, meaning: str) -> float | None:
    """``value`` as a float in (0, 1], or None; a ``ValueError`` naming ``argument`` says it is ``meaning``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"`{argument}` must be a fraction in (0, 1] {meaning}, got {value!r}")
    return float(value)


def check_budget(budget: Any, argument: str = "param_budget") -> float | None:
    """A budget (``param_budget`` or ``macs_budget``) as a float in (0, 1], or None."""
    what = "parameters" if argument == "param_budget" else "multiply-adds per example"
    return check_fraction(budget, argument, f"of the replaceable layers' {what} to keep")


def check_eig_dtype(eig_dtype: Any) -> torch.dtype:
    """``eig_dtype`` if it is torch.float32 or torch.float64, else a ``ValueError`` naming it."""
    if eig_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`eig_dtype` must be torch.float32 or torch.float64, got {eig_dtype!r}")
    return eig_dtype


ALLOCATIONS = ("auto", "probe", "uniform")


def check_allocation(allocation: Any) -> str:
    """``allocation`` if it names a rank-allocation rule, else a ``ValueError`` naming the argument."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"`allocation` must be one of {', '.join(map(repr, ALLOCATIONS))}, got {allocation!r}")
    return allocation


def check_ranks(ranks: Any, param_budget: float | None) -> RankSpec:
    """The form of ``ranks`` (None, an int, or ``{name or regex: int}``); keys and ranks are checked against the
    selected layers later (``[1, min(out, fan_in)]`` each)."""
    if ranks is not None and param_budget is not None:
        raise ValueError("pass either `ranks` or a budget (`param_budget`, `macs_budget`), not both")
    if ranks is None or (isinstance(ranks, int) and not isinstance(ranks, bool)):
        return ranks
    if not isinstance(ranks, Mapping):
        raise TypeError(f"`ranks` must be None, an int or a dict {{name or regex: rank}}, got {type(ranks).__name__}")
    for key, rank in ranks.items():
        if not isinstance(key, str):
            raise TypeError(f"`ranks` keys must be layer names or regexes (str), got {key!r}")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"`ranks` gives {key!r} rank {rank!r}; ranks must be ints")
    return dict(ranks)


def check_rank_choice(
    ranks: Any, param_budget: Any, macs_budget: Any
) -> tuple[RankSpec, float | None, float | None]:
    """``(ranks, param_budget, macs_budget)`` checked: at most one of them, each of its form."""
    param_budget, macs_budget = check_budget(param_budget), check_budget(macs_budget, "macs_budget")
    if param_budget is not None and macs_budget is not None:
        raise ValueError("pass either `param_budget` or `macs_budget`, not both")
    return check_ranks(ranks, param_budget if param_budget is not None else macs_budget), param_budget, macs_budget


def check_compress_at_epoch(value: Any) -> int | float:
    """An epoch index (int >= 1) or a fraction of ``max_epochs`` (float in (0, 1)), as ``StochasticWeightAveraging``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`compress_at_epoch` must be an int epoch index or a float fraction of max_epochs, got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(
            f"`compress_at_epoch` must be an epoch index >= 1 (at least one epoch trains the dense model), got {value}"
        )
    if isinstance(value, float) and not 0 < value < 1:
        raise ValueError(f"`compress_at_epoch` as a fraction of max_epochs must be in (0, 1), got {value}")
    return value


def resolve_compress_at_epoch(compress_at_epoch: int | float, max_epochs: int | None) -> int:
    """The epoch whose start swaps the layers in: ``compress_at_epoch`` itself, or ``int(fraction * max_epochs)``;
    it must leave at least one dense and one fine-tuning epoch inside ``max_epochs`` (-1 or None: unbounded)."""
    finite = max_epochs is not None and max_epochs >= 0
    if isinstance(compress_at_epoch, float) and not finite:
        raise ValueError(
            f"`compress_at_epoch`={compress_at_epoch} is a fraction of max_epochs, but max_epochs is {max_epochs}: "
            "pass an epoch index instead"
        )
    epoch = int(compress_at_epoch * max_epochs) if isinstance(compress_at_epoch, float) else compress_at_epoch
    if finite and not 1 <= epoch < max_epochs:
        raise ValueError(
            f"`compress_at_epoch`={compress_at_epoch} swaps the layers when epoch {epoch} starts, but max_epochs="
            f"{max_epochs} allows epochs 1 to {max_epochs - 1}: at least one epoch trains the dense model and one "
            "fine-tunes the compressed one"
        )
    return epoch


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


def check_mask_fn(mask_fn: Any) -> MaskFn | None:
    """``mask_fn`` unless it is neither None nor callable (a ``TypeError`` naming it)."""
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"`mask_fn` must be a callable batch -> bool mask or None, got {type(mask_fn).__name__}")
    return mask_fn


@dataclass(frozen=True)
class StatisticsArguments:
    """How both callbacks count layer inputs during a validation epoch, checked when constructed.

    ``dataloader_idx`` picks the validation dataloader whose batches are counted (None: all of them);
    the other fields are the keyword arguments of :class:`~lightning_rank.StatisticsCollector`.
    """

    target_modules: ModuleSelector = None
    exclude_modules: ModuleSelector = None
    mask_fn: MaskFn | None = None
    max_rows_per_batch: int | str | None = "auto"
    dtype: torch.dtype = torch.float32
    seed: int = 0
    dataloader_idx: int | None = None

    def __post_init__(self) -> None:
        check_mask_fn(self.mask_fn)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"`seed` must be an int, got {self.seed!r}")
        check_row_policy(self.max_rows_per_batch)
        float_dtype(self.dtype)
        check_optional_index(self.dataloader_idx, "dataloader_idx")
        # normalized forms (a list for a sequence of names)
        object.__setattr__(self, "target_modules", check_selector(self.target_modules, "target_modules"))
        object.__setattr__(self, "exclude_modules", check_selector(self.exclude_modules, "exclude_modules"))

    def collector_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~lightning_rank.StatisticsCollector`."""
        return {
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "mask_fn": self.mask_fn,
            "max_rows_per_batch": self.max_rows_per_batch,
            "dtype": self.dtype,
            "seed": self.seed,
        }


def check_schedule(
    compress_at_epoch: Any, param_budget: Any, macs_budget: Any
) -> tuple[list[int | float], list[tuple[float | None, float | None]]]:
    """The compression steps ``([epoch, ...], [(param_budget, macs_budget), ...])``, one entry per step.

    One epoch (an int or a float, as ``StochasticWeightAveraging`` counts) is one step with the budgets as given.
    A list of epochs is a progressive schedule: it needs a list of as many budgets (``param_budget`` or
    ``macs_budget``), each a fraction of the original layers, decreasing from step to step, and epochs that
    increase (checked again against ``max_epochs`` in ``setup``)."""
    epochs = list(compress_at_epoch) if isinstance(compress_at_epoch, (list, tuple)) else [compress_at_epoch]
    if not epochs:
        raise ValueError("`compress_at_epoch` must name at least one epoch, got an empty list")
    epochs = [check_compress_at_epoch(epoch) for epoch in epochs]
    lists = {name: value for name, value in (("param_budget", param_budget), ("macs_budget", macs_budget))
             if isinstance(value, (list, tuple))}
    if len(epochs) == 1 and not lists:
        return epochs, [(check_budget(param_budget), check_budget(macs_budget, "macs_budget"))]
    if len(lists) != 1 or (param_budget is not None and macs_budget is not None):
        raise ValueError(
            f"`compress_at_epoch`={compress_at_epoch!r} is a schedule of {len(epochs)} steps: pass one budget per step "
            "as a list, `param_budget=[...]` or `macs_budget=[...]` (fractions of the original layers), and not both"
        )
    (argument, budgets), = lists.items()
    if len(budgets) != len(epochs):
        raise ValueError(f"`{argument}` has {len(budgets)} budgets but `compress_at_epoch` has {len(epochs)} epochs: "
                         "pass one budget per compression step")
    budgets = [check_budget(budget, argument) for budget in budgets]
    if any(b is None for b in budgets) or any(later >= earlier for earlier, later in zip(budgets, budgets[1:])):
        raise ValueError(f"`{argument}`={budgets} must decrease from step to step (each is a fraction of the "
                         "original layers, so a later step keeps less)")
    if any(type(epoch) is not type(epochs[0]) for epoch in epochs) or any(
            later <= earlier for earlier, later in zip(epochs, epochs[1:])):
        raise ValueError(f"`compress_at_epoch`={epochs} must increase from step to step, all epoch indices or all "
                         "fractions of max_epochs")
    return epochs, [(b, None) if argument == "param_budget" else (None, b) for b in budgets]


def check_distillation(distill: Any, temperature: Any) -> tuple[float | None, float]:
    """``(distill, temperature)``: the weight in (0, 1] of the distillation loss (None: no teacher is kept) and a
    softmax temperature > 0."""
    distill = check_fraction(distill, "distill", "the weight of the distillation loss against the task loss")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
    return distill, float(temperature)
