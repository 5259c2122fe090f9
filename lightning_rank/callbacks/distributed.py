"""In-place sums over processes, for what the processes must decide alike (rank allocation)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch import Trainer
from torch import Tensor


def sum_reducer(trainer: Trainer) -> Callable[[Tensor], None]:
    """An in-place sum over processes: ``torch.distributed.all_reduce``, else the strategy's own ``reduce``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return lambda tensor: torch.distributed.all_reduce(tensor)

    def reduce(tensor: Tensor) -> None:
        out = trainer.strategy.reduce(tensor, reduce_op="sum")
        if out is not tensor:
            tensor.copy_(out)

    return reduce


def moving_sum_reducer(trainer: Trainer) -> Callable[[Tensor], None]:
    """:func:`sum_reducer` for a tensor on any device (e.g. a CPU one under NCCL): summed on the strategy's root
    device, then copied back in place."""
    reduce, device = sum_reducer(trainer), trainer.strategy.root_device

    def moved(tensor: Tensor) -> None:
        if tensor.device == device:
            reduce(tensor)
            return
        on_device = tensor.to(device)
        reduce(on_device)
        tensor.copy_(on_device)

    return moved
