"""Statistics of one validation epoch inside a Trainer: hooks per batch, then sums over processes.

A :class:`~lightning_rank.stats.collector.StatisticsCollector` is attached for the epoch, with one
``observe`` block per validation batch of the chosen dataloader (run eagerly when the model is compiled,
since hooks do not fire inside compiled code); at the end the statistics are summed over processes
(:mod:`~lightning_rank.callbacks.owners`): to each layer's owner, or to every process.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_rank.callbacks.owners import SharedStatistics, reduce_to_owners
from lightning_rank.checks import StatisticsArguments
from lightning_rank.stats.collect import CALIBRATION_BATCHES  # noqa: F401 (RankCompression's, from here)
from lightning_rank.stats.collector import StatisticsCollector
from lightning_rank.stats.ownership import ProcessShare, assign_owners

_set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6


def epoch_batches(trainer: Trainer, dataloader_idx: int | None) -> int | None:
    """How many validation batches this process counts this epoch (``None`` when a dataloader has no length): the
    row policy "auto" shares each layer's budget among them (among every process's, for a pooled layer)."""
    counts = list(trainer.num_val_batches)
    if dataloader_idx is not None:
        counts = counts[dataloader_idx : dataloader_idx + 1]
    total = sum(counts)
    if not counts or not math.isfinite(total) or total <= 0:
        return None
    return int(total)


class EpochStatistics:
    """Count the inputs of ``pl_module``'s target layers over the validation batches of one epoch.

    Call :meth:`batch_start` / :meth:`batch_end` from the callback's validation batch hooks,
    :meth:`finish` at the epoch's end (on every process), and :meth:`release` on exceptions. Only the
    batches of ``arguments.dataloader_idx`` are counted (all dataloaders' when it is None).

    Under several processes, ``owned`` gives each layer an owner that alone ends with (and analyzes) its
    statistics; otherwise every process ends with every layer's.
    """

    def __init__(
        self, trainer: Trainer, pl_module: LightningModule, arguments: StatisticsArguments, keep_batches: int = 0,
        owned: bool = False,
    ) -> None:
        batches = epoch_batches(trainer, arguments.dataloader_idx)
        self.collector = StatisticsCollector(pl_module, **arguments.collector_kwargs(), batches=batches)
        if trainer.world_size > 1:
            owners = assign_owners(self.collector.targets, trainer.world_size) if owned else {}
            self.collector.share = ProcessShare(trainer.global_rank, trainer.world_size, owners)
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

    def finish(self, trainer: Trainer) -> SharedStatistics:
        """Remove the hooks and return the statistics this process analyzes, summed over every process."""
        self.release()
        stats = self.collector.compute()
        if self.collector.share is None:
            return SharedStatistics(stats, dict.fromkeys(stats.sources, 0), {}, [self.collector.nbytes])
        shared = reduce_to_owners(self.collector, stats, self.collector.share, trainer.strategy.root_device)
        self.collector.drop_sums()  # the sums summed to other processes are freed before the analysis
        return shared

def can_run_eagerly() -> bool:
    """Whether this torch can force compiled code to run eagerly (``torch.compiler.set_stance``)."""
    return _set_stance is not None
