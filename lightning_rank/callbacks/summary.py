"""What ``RankCompression`` measures and reports: multiply-adds per example, ``compression.json``, logger scalars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_rank.spectral.report import write_json_atomic
from lightning_rank.stats.collect import ForwardFn, default_forward, eval_mode
from lightning_rank.views.tags import before_last_step, compression_scalars, kept_ratios
from lightning_rank.views.writers import write_compression, write_scalars


def count_macs(model: nn.Module, batch: Any, forward: ForwardFn | None) -> float | None:
    """Multiply-adds per example of one forward of ``model`` (in eval mode) over ``batch`` (None if it cannot run)."""
    if batch is None:
        return None
    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            (forward or default_forward)(model, batch)
        return counter.get_total_flops() / 2 / extract_batch_size(batch)
    except Exception as err:  # a forward that does not take the batch as `collect` passes it
        rank_zero_warn(f"RankCompression could not count multiply-adds ({err}); pass `forward=` to count them.")
        return None


def monitored_value(trainer: Trainer, monitor: str) -> float:
    """The value of the metric ``monitor`` the last validation logged; a clear error naming what was logged."""
    value = trainer.callback_metrics.get(monitor)
    if value is None:
        raise MisconfigurationException(
            f"RankCompression(monitor={monitor!r}): the validation logged no such metric. Logged metrics: "
            f"{sorted(trainer.callback_metrics)}. Log it with `self.log({monitor!r}, ...)` in `validation_step`."
        )
    return float(value)


def compression_summary(
    factorization: dict[str, Any] | None,
    metrics: dict[str, float | None],
    macs: dict[str, float | None],
    monitor: str,
    failure: str | None = None,
) -> dict[str, Any]:
    """What ``compression.json`` holds: ``params_before``/``after``, ``macs_before``/``after`` (per example),
    ``layers`` ({name: rank}), ``metrics`` ({"before", "compressed", "finetuned"}), the factorization details
    (``factorization`` is ``FactorizationResult.to_dict()``, None when planning failed) and, when planning failed,
    ``failure``: why, the model having trained on dense."""
    factorization = factorization or {"params_before": None, "params_after": None, "layers": {}}
    summary = {
        "params_before": factorization["params_before"],
        "params_after": factorization["params_after"],
        "macs_before": macs["before"],
        "macs_after": macs["after"],
        "layers": factorization["layers"],
        "metrics": dict(metrics),
        "monitor": monitor,
        **{k: v for k, v in factorization.items() if k not in ("params_before", "params_after", "layers")},
    }
    return summary if failure is None else {**summary, "failure": failure}


def publish(trainer: Trainer, folder: Path, summary: dict[str, Any]) -> None:
    """At the end of fit: write ``folder/compression.json`` and, at the last step, the headline scalars (the last
    point of the kept-parameter and multiply-add lines, the metric's change after fine-tuning) to every logger; each
    ``TensorBoardLogger`` also gets the results table with the fine-tuned figure (see
    :func:`~lightning_rank.views.writers.write_compression`). Global rank zero only."""
    write_json_atomic(folder / "compression.json", summary)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            write_compression(logger.experiment, summary, trainer.global_step, at="end")
        else:
            logger.log_metrics(compression_scalars(summary, at="end"), step=trainer.global_step)


def publish_epoch_start(trainer: Trainer, summary: dict[str, Any] | None, swapped: bool) -> None:
    """When a training epoch starts, after a swap due then: the parameters and multiply-adds kept
    (:func:`~lightning_rank.views.tags.kept_ratios`; 1.0 while dense, ``summary`` None) at the global step, so the
    two lines run through the whole fit and drop at each swap. At a swap (``swapped``) also: the value before it at
    the step before (so the drop is drawn at the swap's step, not across an epoch), the metric's change right after
    the swap, and the results table as known then (the fine-tuned figure follows at the end). Every process calls it;
    global rank zero writes."""
    if not trainer.is_global_zero:
        return
    step, swap = trainer.global_step, swapped and summary is not None
    before = [(step - 1, kept_ratios(before_last_step(summary)))] if swap and step > 0 else []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for at_step, scalars in before:
                write_scalars(logger.experiment, scalars, at_step)
            if swap:
                write_compression(logger.experiment, summary, step, at="swap", epoch=trainer.current_epoch)
            else:
                write_scalars(logger.experiment, kept_ratios(summary), step)
        else:
            for at_step, scalars in [*before, (step, compression_scalars(summary, "swap") if swap else kept_ratios(summary))]:
                logger.log_metrics(scalars, step=at_step)


def step_record(
    epoch: int | None, factorization: dict[str, Any] | None, metrics: dict[str, float | None],
    macs: dict[str, float | None],
) -> dict[str, Any]:
    """One compression step as kept in the callback's state: its swap epoch, ``FactorizationResult.to_dict()``,
    the metric before / right after / after fine-tuning, and the multiply-adds before and after."""
    return {"epoch": epoch, "factorization": factorization, "metrics": dict(metrics), "macs": dict(macs)}


def schedule_summary(steps: list[dict[str, Any]], monitor: str, failure: str | None = None) -> dict[str, Any]:
    """What ``compression.json`` holds for the steps done (:func:`step_record` each, in order): with one step, the
    :func:`compression_summary` of it; with several, the last step's summary whose counts and metrics span the
    whole schedule (``params_before``/``macs_before``/``metrics.before`` from the first step, ``layers`` the rank of
    every low-rank layer at the end, the rest from the last step), and ``steps``: each step's own summary with its ``epoch``."""
    summaries = [
        {"epoch": s["epoch"], **compression_summary(s["factorization"], s["metrics"], s["macs"], monitor)} for s in steps
    ]
    if len(summaries) == 1:
        only = {k: v for k, v in summaries[0].items() if k != "epoch"}
        return only if failure is None else {**only, "failure": failure}
    first, last = summaries[0], summaries[-1]
    summary = {k: v for k, v in last.items() if k != "epoch"}
    layers = {name: rank for step in summaries for name, rank in step["layers"].items()}  # later steps win
    summary.update(params_before=first["params_before"], macs_before=first["macs_before"], layers=layers,
                   metrics={**last["metrics"], "before": first["metrics"]["before"]}, steps=summaries)
    return summary if failure is None else {**summary, "failure": failure}
