"""Statistics of one validation epoch inside a Trainer: hooks per batch, then a sum over processes.

Both callbacks count layer inputs the same way: a :class:`StatisticsCollector` attached for the epoch,
one ``observe`` block per validation batch of the chosen dataloader (run eagerly when the model is
compiled, since hooks do not fire inside compiled code), and at the end a reduction over processes in
an order every process agrees on. Both write their reports under :func:`reports_dir`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from lightning_rank import _lightning
from lightning_rank._lightning import is_compiled  # noqa: F401  (re-exported for the callbacks)
from lightning_rank.checks import StatisticsArguments
from lightning_rank.statistics import UNREACHED, ActivationStatistics, InputStatistics, StatisticsCollector
from lightning_rank.targets import ModuleSelector, select_targets, weight_matrix

_set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6


REPORTS_FOLDER = "rank_reports"  # never the package's own name: a folder named so would shadow it on import


def reports_dir(trainer: Trainer) -> Path:
    """``<trainer.log_dir>/rank_reports`` (``default_root_dir`` without a logger). Call it on every process:
    under DDP ``trainer.log_dir`` is a collective."""
    return Path(trainer.log_dir or trainer.default_root_dir) / REPORTS_FOLDER


def check_validation_data(trainer: Trainer, pl_module: LightningModule, needs: str) -> None:
    """Raise unless the fit validates: a ``validation_step``, a validation dataloader, ``limit_val_batches`` > 0.

    ``needs`` starts the message: what needs the validation and why.
    """
    if not is_overridden("validation_step", pl_module):
        raise MisconfigurationException(f"{needs} `validation_step`, which {type(pl_module).__name__} does not define.")
    if trainer.limit_val_batches == 0 or not _lightning.has_validation_dataloader(trainer):
        raise MisconfigurationException(f"{needs} validation: pass a `val_dataloader` and `limit_val_batches` > 0.")


def check_validation_batches(trainer: Trainer, who: str, dataloader_idx: int | None) -> None:
    """Raise when the validation dataloader(s) counted have no batch, or ``dataloader_idx`` names none."""
    batches = _lightning.validation_batches(trainer)
    if dataloader_idx is not None and dataloader_idx >= len(batches):
        raise MisconfigurationException(
            f"{who}(dataloader_idx={dataloader_idx}): the fit has {len(batches)} validation dataloader(s)."
        )
    if sum(batches if dataloader_idx is None else batches[dataloader_idx : dataloader_idx + 1]) == 0:
        which = "validation dataloaders are" if dataloader_idx is None else f"validation dataloader {dataloader_idx} is"
        raise MisconfigurationException(f"{who} needs validation batches to count the layer inputs, but the {which} empty.")


def check_selection(pl_module: LightningModule, arguments: StatisticsArguments, who: str) -> None:
    """Raise now, naming the argument, when ``target_modules``/``exclude_modules`` select nothing countable in
    ``pl_module`` (what :class:`EpochStatistics` would raise at the first counted validation)."""
    try:
        select_targets(pl_module, arguments.target_modules, arguments.exclude_modules)
    except ValueError as err:
        raise MisconfigurationException(f"{who}: {err}") from err


def epoch_batches(trainer: Trainer, dataloader_idx: int | None) -> int | None:
    """How many validation batches this epoch counts over all processes (``None`` when a dataloader has no
    length): the row policy "auto" shares each layer's budget among them, so the sum over processes holds it."""
    counts = list(trainer.num_val_batches)
    if dataloader_idx is not None:
        counts = counts[dataloader_idx : dataloader_idx + 1]
    total = sum(counts)
    if not counts or not math.isfinite(total) or total <= 0:
        return None
    return int(total) * trainer.world_size


CALIBRATION_BATCHES = 4  # validation batches kept for rank allocation and counting multiply-adds


class EpochStatistics:
    """Count the inputs of ``pl_module``'s target layers over the validation batches of one epoch.

    Call :meth:`batch_start` / :meth:`batch_end` from the callback's validation batch hooks,
    :meth:`finish` at the epoch's end (on every process), and :meth:`release` on exceptions. Only the
    batches of ``arguments.dataloader_idx`` are counted (all dataloaders' when it is None).
    """

    def __init__(
        self, trainer: Trainer, pl_module: LightningModule, arguments: StatisticsArguments, keep_batches: int = 0
    ) -> None:
        batches = epoch_batches(trainer, arguments.dataloader_idx)
        self.collector = StatisticsCollector(pl_module, **arguments.collector_kwargs(), batches=batches)
        self.dataloader_idx = arguments.dataloader_idx
        self.keep_batches = keep_batches
        self.batches: list[Any] = []  # the first `keep_batches` counted, copied outside inference mode
        self.collector.attach()
        self._observing: contextlib.ExitStack | None = None

    def counts(self, dataloader_idx: int) -> bool:
        """Whether batches of the validation dataloader ``dataloader_idx`` are counted."""
        return self.dataloader_idx is None or dataloader_idx == self.dataloader_idx

    def batch_start(self, batch: Any, dataloader_idx: int = 0) -> None:
        if not self.counts(dataloader_idx):
            return
        if len(self.batches) < self.keep_batches:
            with torch.inference_mode(False):  # a later backward pass (rank allocation) may use them
                self.batches.append(apply_to_collection(batch, Tensor, Tensor.clone))
        stack = contextlib.ExitStack()
        if _set_stance is not None:
            stack.enter_context(_set_stance("force_eager"))
        stack.enter_context(self.collector.observe(batch))
        self._observing = stack

    def batch_end(self) -> None:
        if self._observing is not None:
            self._observing, stack = None, self._observing
            stack.close()

    def release(self) -> None:
        """Leave a pass left open (an exception in ``validation_step``) and remove the hooks."""
        self.batch_end()
        self.collector.detach()

    def finish(self, trainer: Trainer) -> ActivationStatistics:
        """Remove the hooks and return the statistics summed over every process."""
        self.release()
        stats = self.collector.compute()
        if trainer.world_size > 1:
            stats = sum_over_processes(self.collector, stats, trainer)
        return stats


class ValidationStatisticsCallback(Callback):
    """What both callbacks share: checked :class:`StatisticsArguments`, readable as flat attributes
    (``target_modules``, ...), and the validation batch hooks that feed an open :class:`EpochStatistics`."""

    statistics_arguments: StatisticsArguments
    _statistics: EpochStatistics | None = None

    @property
    def target_modules(self) -> ModuleSelector:
        return self.statistics_arguments.target_modules

    @property
    def exclude_modules(self) -> ModuleSelector:
        return self.statistics_arguments.exclude_modules

    @property
    def mask_fn(self) -> Any:
        return self.statistics_arguments.mask_fn

    @property
    def max_rows_per_batch(self) -> int | str | None:
        return self.statistics_arguments.max_rows_per_batch

    @property
    def dtype(self) -> torch.dtype:
        return self.statistics_arguments.dtype

    @property
    def seed(self) -> int:
        return self.statistics_arguments.seed

    @property
    def dataloader_idx(self) -> int | None:
        return self.statistics_arguments.dataloader_idx

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._statistics is not None:
            self._statistics.batch_start(batch, dataloader_idx)

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._statistics is not None:
            self._statistics.batch_end()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        """Leave a pass left open (an exception in ``validation_step``) and remove the hooks."""
        if self._statistics is not None:
            self._statistics.release()
            self._statistics = None


def sum_over_processes(collector: StatisticsCollector, stats: ActivationStatistics, trainer: Trainer) -> ActivationStatistics:
    """``stats`` summed over processes in place, after the processes agree on which accumulators exist.

    A layer may be reached on one process only, and accumulators are created lazily and keyed by the first
    layer that saw an input, so each process first shares, per target (in the same order everywhere),
    the index of its accumulator's layer and whether its input sharing diverged. Missing accumulators
    become zeros of the layer's fan_in; then every accumulator is reduced, in that agreed order.
    """
    names = list(collector.targets)
    index = {name: i for i, name in enumerate(names)}
    device = trainer.strategy.root_device
    codes = torch.full((2, len(names)), -1, dtype=torch.int64, device=device)  # (key index, diverged)
    for i, name in enumerate(names):
        if name in stats.sources:
            codes[0, i] = index[stats.sources[name]]
        codes[1, i] = int(name in stats.skipped and stats.skipped[name] != UNREACHED)
    gathered = trainer.strategy.all_gather(codes).reshape(-1, 2, len(names)).cpu()  # a few ints per layer
    keys, diverged = gathered[:, 0], gathered[:, 1].amax(dim=0) > 0
    reached = keys >= 0
    highest = keys.amax(dim=0)
    lowest = torch.where(reached, keys, len(names)).amin(dim=0)

    skipped = {name: reason for name, reason in stats.skipped.items() if name not in index}
    sources: dict[str, str] = {}
    for i, name in enumerate(names):
        if diverged[i]:
            skipped[name] = stats.skipped.get(name) or "its input was shared with other layers differently on another process"
        elif not reached[:, i].any():
            skipped[name] = stats.skipped[name]
        elif highest[i] != lowest[i]:
            skipped[name] = "its input was shared with other layers on some processes but not on others"
        else:
            sources[name] = names[int(highest[i])]
    inputs: dict[str, InputStatistics] = {}
    for key in dict.fromkeys(sources.values()):
        local = stats.inputs.get(key)
        if local is None:
            fan_in = weight_matrix(collector.targets[key])[0].shape[1]
            local = InputStatistics.zeros(fan_in, collector.dtype, device)
        inputs[key] = local
    agreed = ActivationStatistics(inputs, sources, skipped, list(stats.unmasked))
    return agreed.all_reduce_(sum_reducer(trainer))


def sum_reducer(trainer: Trainer) -> Callable[[Tensor], None]:
    """An in-place sum over processes: ``torch.distributed.all_reduce``, else the strategy's own ``reduce``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return lambda tensor: torch.distributed.all_reduce(tensor)

    def reduce(tensor: Tensor) -> None:
        out = trainer.strategy.reduce(tensor, reduce_op="sum")
        if out is not tensor:
            tensor.copy_(out)

    return reduce


def can_run_eagerly() -> bool:
    """Whether this torch can force compiled code to run eagerly (``torch.compiler.set_stance``)."""
    return _set_stance is not None
