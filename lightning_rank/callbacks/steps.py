"""How ``RankCompression`` plans one step under each strategy, from the statistics of one validation.

Single device and DDP: every process plans from the same summed statistics; a budget is shared out by the
model's own output on each process's first validation batches, summed over processes, so every process decides
the same ranks. FSDP2: the same, with every unit unsharded while planning (every process holds the full weights,
the model's forwards and backwards run on them, and the probe's truncations are written into them).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_rank.callbacks.distributed import moving_sum_reducer
from lightning_rank.callbacks.sharded import unsharded
from lightning_rank.compress.factorize import FactorizationPlan, plan_factorization


def check_sharded(compression: Any) -> None:
    """Raise for what ``compression`` (a ``RankCompression``) cannot do on FSDP2 yet: distillation (it keeps a frozen
    dense copy of the model, and FSDP2 modules cannot be copied)."""
    if compression.distill:
        raise ValueError("distill is not supported on a model sharded with FSDP2 yet (it keeps a dense copy of the "
                         "model): fine-tune without it")


def plan_step(
    compression: Any, trainer: Trainer, pl_module: LightningModule, stats: Any, batches: list[Any]
) -> FactorizationPlan:
    """The factorization ``compression`` (a ``RankCompression``) asks for at its current step, from the statistics and
    kept batches of one validation."""
    # Under DDP each process probes its own validation batches and the probe sums what it measures over all of
    # them, so every process allocates the same ranks; if any process kept no batch, none calibrates.
    reduce = moving_sum_reducer(trainer) if trainer.world_size > 1 else None
    if reduce is not None:
        empty = torch.tensor([float(not batches)], dtype=torch.float64)
        reduce(empty)
        batches = batches if float(empty) == 0 else []
    param_budget, macs_budget = compression.budgets[compression.step]
    with unsharded(pl_module):  # under FSDP2, every process plans from (and probes) the full weights
        return plan_factorization(
            pl_module, stats, threshold=compression.threshold, method=compression.method, ranks=compression.ranks,
            param_budget=param_budget, macs_budget=macs_budget, refactorize=True,
            target_modules=compression.target_modules, exclude_modules=compression.exclude_modules,
            allocation=compression.allocation, calibration=batches or None, forward=compression.forward,
            progress=trainer.is_global_zero, reduce=reduce,
        )  # fmt: skip
