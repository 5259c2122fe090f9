"""How ``RankCompression`` counts and plans one step under each strategy, from the statistics of one validation.

Single device: one process counts and plans. DDP and FSDP2: every process counts every layer's rows, and each
layer's sums go to one process, its owner (:class:`~lightning_rank.callbacks.owners.PooledShare`: the sum over
every process's rows); the owner alone decomposes the layer and builds its factors, and sends
every process what it needs (:mod:`~lightning_rank.compress.sharing`). A budget is shared out by the model's own
output on each process's first validation batches, summed over processes, so every process decides the same ranks
and builds its low-rank layers from the owner's factors. FSDP2: the model stays sharded while planning. An owner gathers
its own layers' full weights (one layer after another, each process keeping only its own); the probe runs the sharded
model as training does and writes each truncation into the local shards; the whitened bases stay on their owners,
sent one layer at a time while the probe uses them. A later step of progressive compression plans its low-rank pairs
from dense stand-ins that are FSDP2 units themselves (:func:`~lightning_rank.callbacks.sharded.sharded_stand_ins`).
"""

from __future__ import annotations

import contextlib
from typing import Any

from lightning.pytorch import LightningModule, Trainer

from lightning_rank.callbacks.distributed import moving_sum_reducer
from lightning_rank.callbacks.epoch import CALIBRATION_BATCHES, EpochStatistics
from lightning_rank.callbacks.owners import PooledShare, SharedStatistics, plan_owners
from lightning_rank.callbacks.sharded import is_sharded, sharded_stand_ins
from lightning_rank.checks import StatisticsArguments
from lightning_rank.compress.factorize import FactorizationPlan, plan_factorization
from lightning_rank.compress.probe import reshard
from lightning_rank.compress.refactor import onto_pairs
from lightning_rank.stats.ownership import assign_owners


def check_sharded(compression: Any) -> None:
    """Raise for what ``compression`` (a ``RankCompression``) cannot do on FSDP2 yet: distillation (it keeps a frozen
    dense copy of the model, and FSDP2 modules cannot be copied)."""
    if compression.distill:
        raise ValueError("distill is not supported on a model sharded with FSDP2 yet (it keeps a dense copy of the "
                         "model): fine-tune without it")


def counting(trainer: Trainer, pl_module: LightningModule, arguments: StatisticsArguments) -> EpochStatistics:
    """The statistics of one validation for a plan: under several processes each layer's exact sums go to its owner."""
    statistics = EpochStatistics(trainer, pl_module, arguments, CALIBRATION_BATCHES)
    if trainer.world_size > 1:
        owners = assign_owners(statistics.collector.targets, trainer.world_size)
        statistics.collector.share = PooledShare(trainer.global_rank, trainer.world_size, owners)
    return statistics


def plan_step(
    compression: Any, trainer: Trainer, pl_module: LightningModule, shared: SharedStatistics, batches: list[Any]
) -> FactorizationPlan:
    """The factorization ``compression`` (a ``RankCompression``) asks for at its current step, from the statistics
    (this process's share, from :func:`counting`) and kept batches of one validation."""
    # Under DDP and FSDP2 each process probes its own validation batches and sums what it measures over all of them, so
    # every process allocates the same ranks.
    reduce = moving_sum_reducer(trainer) if trainer.world_size > 1 else None
    param_budget, macs_budget = compression.budgets[compression.step]
    owners = plan_owners(pl_module, shared, trainer.global_rank, trainer.strategy.root_device) if reduce else None
    stats = shared.planning_view() if owners is not None else shared.stats
    reshard(pl_module)  # FSDP2 leaves a root unit gathered after a forward: planning and the swap need its shards
    with sharded_stand_ins(pl_module) if is_sharded(pl_module) else contextlib.nullcontext({}) as pairs:
        plan = plan_factorization(
            pl_module, stats, threshold=compression.threshold, method=compression.method, ranks=compression.ranks,
            param_budget=param_budget, macs_budget=macs_budget, refactorize=True,
            target_modules=compression.target_modules, exclude_modules=compression.exclude_modules,
            allocation=compression.allocation, calibration=batches or None, forward=compression.forward,
            progress=trainer.is_global_zero, reduce=reduce, owners=owners,
        )  # fmt: skip
    if pairs:  # planned on sharded stand-ins of the low-rank pairs: the plan turned into one for the pairs
        onto_pairs(plan.modules, plan.replaced, plan.result, pairs, pl_module)
    reshard(pl_module)
    return plan
