"""What both callbacks share: the statistics arguments as attributes, the validation batch hooks, the checks of
the validation data, and where reports are written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_rank.callbacks import _lightning
from lightning_rank.callbacks.epoch import EpochStatistics
from lightning_rank.checks import StatisticsArguments
from lightning_rank.targets import select_targets

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


class _Argument:
    """A field of the callback's :class:`StatisticsArguments`, read as the callback's own attribute (read-only: the
    arguments are checked once, when the callback is made)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, callback: Any, owner: type | None = None) -> Any:
        return self if callback is None else getattr(callback.statistics_arguments, self.name)

    def __set__(self, callback: Any, value: Any) -> None:
        raise AttributeError(f"`{self.name}` is set when the callback is made; make a new one to change it")


class ValidationStatisticsCallback(Callback):
    """What both callbacks share: checked :class:`StatisticsArguments`, readable as flat attributes
    (``target_modules``, ...), and the validation batch hooks that feed an open :class:`EpochStatistics`."""

    statistics_arguments: StatisticsArguments
    _statistics: EpochStatistics | None = None
    target_modules = _Argument()
    exclude_modules = _Argument()
    mask_fn = _Argument()
    max_rows_per_batch = _Argument()
    dtype = _Argument()
    seed = _Argument()
    dataloader_idx = _Argument()

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
