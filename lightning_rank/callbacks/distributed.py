"""Summing statistics over processes, after the processes agree on which accumulators exist."""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch import Trainer
from torch import Tensor

from lightning_rank.stats.collector import UNREACHED, StatisticsCollector
from lightning_rank.stats.sums import ActivationStatistics, InputStatistics
from lightning_rank.targets import weight_matrix


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
