"""``RankMonitor``: the utilized rank of every layer, measured on each analyzed validation epoch.

Forward pre-hooks (a :class:`~lightning_rank.stats.collector.StatisticsCollector`) are attached only
during analyzed validation epochs and count the inputs the user's own ``validation_step`` feeds each
layer. At the epoch's end the statistics are summed over processes, analyzed, and published: the
report, its history, ``rank/mlu`` in ``trainer.callback_metrics``, scalars in every logger, a JSON file
per epoch, and TensorBoard views.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from typing_extensions import override

from lightning_rank.callbacks import _lightning
from lightning_rank.callbacks._lightning import is_compiled
from lightning_rank.callbacks.base import (
    REPORTS_FOLDER,
    ValidationStatisticsCallback,
    check_selection,
    check_validation_batches,
    check_validation_data,
    reports_dir,
)
from lightning_rank.callbacks.budgets import CostWatch, FigureBudget
from lightning_rank.callbacks.epoch import EpochStatistics, can_run_eagerly
from lightning_rank.callbacks.owners import analyze_shared
from lightning_rank.checks import (
    MaskFn,
    StatisticsArguments,
    check_bool,
    check_eig_dtype,
    check_fraction,
    check_positive_int,
    check_threshold,
)
from lightning_rank.compress.loading import factorized_layers
from lightning_rank.spectral.analysis import UnanalyzableError
from lightning_rank.spectral.report import RankReport, write_json_atomic
from lightning_rank.stats.collect import warn_about_rows
from lightning_rank.stats.collector import UNREACHED
from lightning_rank.targets import ModuleSelector
from lightning_rank.views import tags, writers
from lightning_rank.views.tags import report_scalars

_clock = time.perf_counter  # every time the monitor weighs or records is read from this clock (tests replace it)


def _now() -> float:
    """:data:`_clock`'s time, looked up when called (so a replaced clock is read; and picklable, for ddp_spawn)."""
    return _clock()


class RankMonitor(ValidationStatisticsCallback):
    r"""Measure how much of its input and output space every layer uses, epoch by epoch.

    On each analyzed validation epoch (every ``every_n_epochs``-th epoch of ``trainer.fit``, and every
    ``trainer.validate``; never the sanity check) the inputs of the target layers are counted through
    the user's own ``validation_step`` over every validation dataloader (or the one ``dataloader_idx`` names). Afterwards, on every process:

    - ``monitor.report`` holds the :class:`~lightning_rank.RankReport`, ``monitor.history`` one
      ``{"epoch", "step", "stage", "factorized", "report", "seconds"}`` entry per analyzed epoch (``report`` is
      ``to_dict()``; ``factorized``: the low-rank layers the model held, ``{name: rank}`` (empty while dense), so
      each of ``RankCompression``'s steps shows;
      ``seconds``: what the monitor spent on that epoch, ``{"statistics", "analysis", "publish"}``, the last
      being the report's JSON, logged scalars and TensorBoard views; ``statistics_bytes``: what each process held);
    - ``trainer.callback_metrics["rank/mlu"]`` holds the MLU (so ``ModelCheckpoint`` and ``EarlyStopping``
      can monitor it);

    and on global rank zero: every logger receives the headline scalars ``0_rank_summary/mlu`` and
    ``0_rank_summary/mlu_weighted`` and one ``rank/utilization/<layer>`` per analyzed layer, at step
    ``trainer.global_step``; ``<trainer.log_dir>/rank_reports/epoch_{E:03d}.json`` holds the report. Each
    ``TensorBoardLogger`` gets those scalars with descriptions, a custom-scalars layout (the MLU, then
    every layer's utilization by block and by role, at most five lines a chart) and the ``views``.

    If during ``fit`` the monitor takes more than a quarter of the time since the previous analyzed epoch (or
    the start), it says so once, with where the time went and what lowers it (a ``PossibleUserWarning``).

    Under DDP and FSDP2 each layer input has an owning process that counts it on its own share of the data (row
    budget ``"auto"``; rows of every process when its share is short or every row counts: ``pooled``) and
    analyzes it; every process ends with the same report. A compiled model is run eagerly during analyzed epochs
    (``torch.compiler.set_stance("force_eager")``), because hooks do not fire inside compiled code.

    Args:
        threshold: energy threshold of the ranks, in (0, 1].
        every_n_epochs: analyze the validation of every ``n``-th training epoch (``(epoch + 1) % n == 0``).
            A ``ModelCheckpoint``/``EarlyStopping`` monitoring ``rank/mlu`` should check on the same epochs
            (e.g. ``ModelCheckpoint(every_n_epochs=n)``): other validations do not log it.
        target_modules: which layers (None: all supported ones; a regex, a list of names, or a callable).
        exclude_modules: layers to leave out, in the same forms.
        mask_fn: ``mask_fn(batch)`` returns a bool mask over the inputs' leading dims (e.g. ``(B, T)``),
            so padding rows are not counted.
        max_rows_per_batch: the row policy. ``"auto"`` (default): count about ``max(4096, 64 * fan_in)`` uniformly drawn
            rows of each layer input per analyzed epoch, the same fraction of each of the epoch's validation batches
            (one draw per batch shared by the layers), which keeps ranks within +-1 of exact statistics at a fraction of
            the cost; an int: at most that many rows a batch; ``None``: every row (exact statistics). Each layer's
            ``rows`` in the report says how many rows were counted.
        dtype: accumulation dtype, ``torch.float32`` or ``torch.float64``.
        centered: use covariances instead of uncentered second moments.
        tensorboard: write the layout and the ``views`` to each ``TensorBoardLogger``.
        views: which extras to write (names from ``lightning_rank.views.tags.VIEWS``). Default
            ``("heatmap", "energy", "table")``: a labelled utilization heatmap (layers x analyzed epochs, the
            compression marked) as ``0_rank_summary/utilization_heatmap``, cumulative-energy figures per block
            (``rank_energy/<block>``; both drawn with Pillow, a few milliseconds each) and the report as a text
            table (``rank/report``).
            Opt-in: ``"ranks"`` logs ``rank_detail/in_rank/<layer>`` and ``rank_detail/out_rank/<layer>`` to
            every logger, ``"spectra"`` writes eigenvalue histograms ``rank_detail/spectrum/<layer>``.
        figure_budget: the most of the run's time the heatmap and energy figures may take. They are drawn for
            an analyzed epoch only when their last drawing took at most ``figure_budget`` of the time since it
            ended (before the first: ``FIGURE_SECONDS`` a figure, against the time since the fit started), and
            always for the last analyzed epoch (at the end of ``fit``, at that epoch's step, and on every
            ``trainer.validate``): runs with epochs of seconds get them on every analyzed epoch, a fit of a few
            seconds only at its end. ``None``: on every analyzed epoch. Scalars, the layout, the table and the
            histograms are written on every analyzed epoch whatever this says.
        seed: seed of the row subsampling.
        eig_dtype: precision of the epoch-end eigenproblems: float32 (default), certified to give float64's ranks.
        dataloader_idx: the validation dataloader whose batches are counted (None: all of them, pooled).

    Example:
        >>> import lightning_rank as lr
        >>> monitor = lr.RankMonitor(every_n_epochs=2)  # then: Trainer(callbacks=[monitor]).fit(model)
        >>> monitor.every_n_epochs, monitor.threshold, monitor.eig_dtype, monitor.report, monitor.history
        (2, 0.99, torch.float32, None, [])
    """

    def __init__(
        self,
        threshold: float = 0.99,
        every_n_epochs: int = 1,
        target_modules: ModuleSelector = None,
        exclude_modules: ModuleSelector = None,
        mask_fn: MaskFn | None = None,
        max_rows_per_batch: int | str | None = "auto",
        dtype: torch.dtype = torch.float32,
        centered: bool = False,
        tensorboard: bool = True,
        views: Sequence[str] = tags.DEFAULT_VIEWS,
        figure_budget: float | None = 0.01,
        seed: int = 0,
        eig_dtype: torch.dtype = torch.float32,
        dataloader_idx: int | None = None,
    ) -> None:
        self.threshold = check_threshold(threshold)
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs")
        self.statistics_arguments = StatisticsArguments(
            target_modules, exclude_modules, mask_fn, max_rows_per_batch, dtype, seed, dataloader_idx
        )
        self.centered = check_bool(centered, "centered")
        self.eig_dtype = check_eig_dtype(eig_dtype)
        self.tensorboard = check_bool(tensorboard, "tensorboard")
        self.views = tags.check_views(views)
        self.figure_budget = check_fraction(
            figure_budget, "figure_budget", "of the run's time the figures may take, or None (draw them on every "
            "analyzed epoch)")

        self.report: RankReport | None = None
        self.history: list[dict[str, Any]] = []
        self._statistics: EpochStatistics | None = None
        self._skip = False
        self._selection_checked = False
        self._layouts_written: dict[str, tuple[str, ...]] = {}  # log dir -> its layout's layers (picklable)
        self._warned_no_logger = False
        self._pending_figures: tuple[dict[str, Any], int, int] | None = None  # (spectra, step, epoch) not drawn yet
        self._figure_budget = FigureBudget(self.figure_budget, clock=_now)
        self._cost = CostWatch(clock=_now)

    @functools.cached_property
    @override
    def state_key(self) -> str:  # cached: Lightning reads it on every hook call, and the arguments never change
        def stable(selector: ModuleSelector) -> Any:  # a callable's repr holds its address
            return getattr(selector, "__qualname__", selector)

        return self._generate_state_key(
            threshold=self.threshold,
            every_n_epochs=self.every_n_epochs,
            target_modules=stable(self.target_modules),
            exclude_modules=stable(self.exclude_modules),
            **({"dataloader_idx": self.dataloader_idx} if self.dataloader_idx is not None else {}),
        )

    # -- lifecycle ---------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _lightning.destroy_process_group_at_exit()
        _lightning.check_strategy(trainer, "RankMonitor")
        self._skip = bool(trainer.fast_dev_run)
        if self._skip:
            rank_zero_info("RankMonitor: `fast_dev_run` is on, so no rank analysis is run.")
            return
        self._selection_checked = stage not in (TrainerFn.FITTING.value, TrainerFn.VALIDATING.value)
        if not is_overridden("configure_model", pl_module):
            self._check_selection(pl_module)  # else its layers exist only after `configure_model`: at the start
        if not trainer.loggers and not self._warned_no_logger:
            self._warned_no_logger = True
            rank_zero_warn(
                "RankMonitor: the Trainer has no logger, so rank scalars are not logged; reports are kept in "
                f"`monitor.report`/`monitor.history` and written to {Path(trainer.default_root_dir) / REPORTS_FOLDER}."
            )
        if is_compiled(pl_module):
            if not can_run_eagerly():
                rank_zero_warn(
                    "RankMonitor: the model is compiled and this torch has no `torch.compiler.set_stance`, so layer "
                    "hooks may not fire and layers may be reported as never called. Pass the uncompiled model."
                )
            else:
                rank_zero_info("RankMonitor: the model is compiled; analyzed validation epochs run it eagerly.")

    def _check_selection(self, pl_module: LightningModule) -> None:
        if not self._selection_checked:
            self._selection_checked = True
            check_selection(pl_module, self.statistics_arguments, "RankMonitor")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._figure_budget.restart()
        self._cost.restart()
        if not self._skip:
            self._check_selection(pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._skip:
            return
        try:  # never fails the run: without validation the monitor only has nothing to say
            check_validation_data(trainer, pl_module, "RankMonitor measures ranks during validation, so it needs")
            check_validation_batches(trainer, "RankMonitor", self.dataloader_idx)
        except MisconfigurationException as error:
            rank_zero_warn(f"{error} Until then it measures nothing.")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._skip:
            self._check_selection(pl_module)  # trainer.validate of a model that builds its layers in configure_model

    def _should_observe(self, trainer: Trainer) -> bool:
        if self._skip or trainer.sanity_checking:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return True
        return trainer.state.fn == TrainerFn.FITTING and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release()
        if not self._should_observe(trainer):
            return
        self._statistics = EpochStatistics(trainer, pl_module, self.statistics_arguments, owned=True)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        statistics, self._statistics = self._statistics, None
        if statistics is None:
            return
        start = _clock()
        shared = statistics.finish(trainer)
        share = statistics.collector.share
        try:
            report = analyze_shared(pl_module, shared, share, list(statistics.collector.targets),
                                    threshold=self.threshold, centered=self.centered, eig_dtype=self.eig_dtype,
                                    progress=trainer.is_global_zero)
        except UnanalyzableError as error:  # the run goes on: the monitor reports, it does not stop training
            rank_zero_warn(f"RankMonitor analyzed nothing at epoch {trainer.current_epoch}: {error}")
            return
        analyzed = _clock()
        if not report.analyzed:
            rank_zero_warn(_nothing_analyzed(report, statistics.collector.batches))
        if trainer.is_global_zero or share is not None:  # with owners, each process holds its own layers
            warn_about_rows(shared.stats)
        self._publish(trainer, pl_module, report)
        self.history[-1]["statistics_bytes"] = shared.nbytes
        seconds = {"statistics": statistics.collector.seconds, "analysis": analyzed - start,
                   "publish": _clock() - analyzed}
        self.history[-1]["seconds"] = seconds
        if trainer.state.fn == TrainerFn.FITTING:
            warning = self._cost.weigh(seconds)
            if warning is not None:
                rank_zero_warn(warning, category=PossibleUserWarning)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._draw_figures(self._writers(trainer))  # the last analyzed epoch's, when the budget held them back

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        try:  # an interrupted run still shows the figures of its last analyzed epoch
            self._draw_figures(self._writers(trainer))
        except Exception as error:  # never hide the exception that stopped the run
            rank_zero_warn(f"RankMonitor could not draw the figures of the last analyzed epoch: {error!r}")
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    # -- results -----------------------------------------------------------------------------
    def _publish(self, trainer: Trainer, pl_module: LightningModule, report: RankReport) -> None:
        epoch, step, stage = trainer.current_epoch, trainer.global_step, trainer.state.fn.value
        factorized = factorized_layers(pl_module)  # {name: rank}: each compression step changes it
        entry = {"epoch": epoch, "step": step, "stage": stage, "factorized": factorized, "report": report.to_dict()}
        self.history = [h for h in self.history if (h["epoch"], h["step"], h["stage"]) != (epoch, step, stage)]
        self.history.append(entry)
        self.report = report
        pl_module.log("rank/mlu", report.mlu, logger=False, sync_dist=trainer.world_size > 1)

        folder = reports_dir(trainer)  # a collective under DDP: on every process
        if not trainer.is_global_zero:
            return
        write_json_atomic(folder / self._report_name(epoch, step, stage), entry["report"])  # report.save(), one to_dict
        metrics = report_scalars(report, ranks="ranks" in self.views)
        for logger in trainer.loggers:
            if not (self.tensorboard and isinstance(logger, TensorBoardLogger)):  # those are written below, with descriptions
                logger.log_metrics(metrics, step=step)
        summary_writers = self._writers(trainer)
        if summary_writers:
            self._write_views(summary_writers, report, metrics, step, final=stage == TrainerFn.VALIDATING.value)

    def _report_name(self, epoch: int, step: int, stage: str) -> str:
        """``epoch_{E:03d}.json`` for an epoch's first report; its later ones (``val_check_interval < 1``, or a
        ``trainer.validate`` after a fit) add their step and stage, so no report overwrites another."""
        first = next(h for h in self.history if h["epoch"] == epoch)
        if (first["step"], first["stage"]) == (step, stage):
            return f"epoch_{epoch:03d}.json"
        return f"epoch_{epoch:03d}_step_{step:06d}" + ("" if stage == TrainerFn.FITTING.value else f"_{stage}") + ".json"

    def _writers(self, trainer: Trainer) -> list[Any]:
        """The ``SummaryWriter`` of every ``TensorBoardLogger`` the views go to (none off global rank zero)."""
        if not self.tensorboard or not trainer.is_global_zero:
            return []
        return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def _write_views(
        self, summary_writers: list[Any], report: RankReport, metrics: dict[str, float], step: int, final: bool
    ) -> None:
        spectra = {name: spectrum_in for name, (spectrum_in, _) in report.spectra.items()}
        layers = tuple(dict.fromkeys(  # every layer analyzed so far, so no chart is dropped when layers change
            name for entry in self.history for name, layer in entry["report"]["layers"].items()
            if layer.get("utilization") is not None
        ))
        for writer in summary_writers:
            writers.write_scalars(writer, metrics, step)
            if self._layouts_written.get(writer.get_logdir()) != layers:  # new layers get their charts
                writers.write_layout(writer, layers)
                self._layouts_written[writer.get_logdir()] = layers
            if "spectra" in self.views:
                writers.write_spectra(writer, spectra, step)
            if "table" in self.views:
                writers.write_report_text(writer, report, step)
            writer.flush()
        if {"heatmap", "energy"} & set(self.views):
            self._pending_figures = (spectra, step, self.history[-1]["epoch"])
            count = ("heatmap" in self.views) + ("energy" in self.views) * len(tags.group_layers(list(spectra)))
            if final or self._figure_budget.due(count):
                self._draw_figures(summary_writers)

    def _draw_figures(self, summary_writers: list[Any]) -> None:
        """Draw the heatmap and energy figures of the pending analyzed epoch, at its step, and time them."""
        pending, self._pending_figures = self._pending_figures, None
        if pending is None or not summary_writers:
            return
        spectra, step, epoch = pending
        with self._figure_budget.drawing():
            for writer in summary_writers:
                if "heatmap" in self.views:
                    writers.write_heatmap(writer, self.history, step)
                if "energy" in self.views:
                    writers.write_energy_curves(writer, spectra, self.threshold, step, epoch=epoch)
                writer.flush()

    # -- checkpointing -----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.report = RankReport.from_dict(self.history[-1]["report"]) if self.history else None


def _nothing_analyzed(report: RankReport, batches: int) -> str:
    """Why a validation of ``batches`` batches gave no analyzed layer, from the reasons its layers were skipped."""
    reasons = dict.fromkeys(report.skipped.values())
    if set(reasons) <= {UNREACHED}:
        return (f"RankMonitor observed {batches} validation batches but none of the {len(report.skipped)} target "
                "layers was called by them. If the forward runs through code compiled with torch.compile that this "
                "torch cannot run eagerly, or bypasses the modules' forward, hooks cannot see it.")
    return f"RankMonitor observed {batches} validation batches but could analyze no layer: {'; '.join(reasons)}."
