"""``RankMonitor``: the utilized rank of every layer, measured on each analyzed validation epoch.

Forward pre-hooks (a :class:`~lightning_rank.statistics.StatisticsCollector`) are attached only
during analyzed validation epochs and count the inputs the user's own ``validation_step`` feeds each
layer. At the epoch's end the statistics are summed over processes, analyzed, and published: the
report, its history, ``rank/mlu`` in ``trainer.callback_metrics``, scalars in every logger, a JSON file
per epoch, and TensorBoard views.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_rank import tensorboard as views
from lightning_rank.analysis import analyze
from lightning_rank.report import RankReport
from lightning_rank.checks import check_positive_int, collection_arguments, collection_of
from lightning_rank.compression import destroy_process_group_at_exit
from lightning_rank.epoch_statistics import EpochStatistics, can_run_eagerly, is_compiled
from lightning_rank.spectrum import check_threshold
from lightning_rank.statistics import MaskFn, warn_about_rows
from lightning_rank.targets import ModuleSelector


class RankMonitor(Callback):
    r"""Measure how much of its input and output space every layer uses, epoch by epoch.

    On each analyzed validation epoch (every ``every_n_epochs``-th epoch of ``trainer.fit``, and every
    ``trainer.validate``; never the sanity check) the inputs of the target layers are counted through
    the user's own ``validation_step`` over every validation dataloader. Afterwards, on every process:

    - ``monitor.report`` holds the :class:`~lightning_rank.RankReport`, ``monitor.history`` one
      ``{"epoch", "step", "stage", "report"}`` entry per analyzed epoch (``report`` is ``to_dict()``);
    - ``trainer.callback_metrics["rank/mlu"]`` holds the MLU (so ``ModelCheckpoint`` and ``EarlyStopping``
      can monitor it);

    and on global rank zero: every logger receives ``rank/mlu``, ``rank/weighted_mlu`` and, per layer,
    ``rank/utilization/<layer>``, ``rank/in_rank/<layer>`` and ``rank/out_rank/<layer>`` at step
    ``trainer.global_step``; ``<trainer.log_dir>/lightning_rank/epoch_{E:03d}.json`` holds the report;
    each ``TensorBoardLogger`` also gets a custom-scalars layout, a utilization heatmap (layers x
    analyzed epochs), eigen-spectrum histograms, cumulative-energy figures and the report as a table.

    Under DDP the statistics are summed over processes before any rank is computed, so the report equals
    that of one process that saw all the data. A compiled model is run eagerly during analyzed epochs
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
        max_rows_per_batch: count at most this many random rows of each input per batch (None: all).
        dtype: accumulation dtype, ``torch.float32`` or ``torch.float64``.
        centered: use covariances instead of uncentered second moments.
        tensorboard: write the TensorBoard views to each ``TensorBoardLogger``.
        seed: seed of the row subsampling.
        eig_dtype: precision of the epoch-end eigenproblems (float32 is about 2-3x faster on CPU).

    Example::

        trainer = Trainer(callbacks=[lr.RankMonitor(every_n_epochs=2)])
    """

    def __init__(
        self,
        threshold: float = 0.99,
        every_n_epochs: int = 1,
        target_modules: ModuleSelector = None,
        exclude_modules: ModuleSelector = None,
        mask_fn: MaskFn | None = None,
        max_rows_per_batch: int | None = None,
        dtype: torch.dtype = torch.float32,
        centered: bool = False,
        tensorboard: bool = True,
        seed: int = 0,
        eig_dtype: torch.dtype = torch.float64,
    ) -> None:
        self.threshold = check_threshold(threshold)
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs")
        checked = collection_arguments(target_modules, exclude_modules, mask_fn, max_rows_per_batch, dtype, seed)
        for name, value in checked.items():
            setattr(self, name, value)
        for name, flag in (("centered", centered), ("tensorboard", tensorboard)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {flag!r}")
        self.centered = centered
        if eig_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`eig_dtype` must be torch.float32 or torch.float64, got {eig_dtype!r}")
        self.eig_dtype = eig_dtype
        self.tensorboard = tensorboard

        self.report: RankReport | None = None
        self.history: list[dict[str, Any]] = []
        self._statistics: EpochStatistics | None = None
        self._skip = False
        self._layouts_written: set[str] = set()  # log dirs (a callback must pickle for ddp_spawn)
        self._told_no_matplotlib = False
        self._warned_no_logger = False

    @property
    @override
    def state_key(self) -> str:
        def stable(selector: ModuleSelector) -> Any:  # a callable's repr holds its address
            return getattr(selector, "__qualname__", selector)

        return self._generate_state_key(
            threshold=self.threshold,
            every_n_epochs=self.every_n_epochs,
            target_modules=stable(self.target_modules),
            exclude_modules=stable(self.exclude_modules),
        )

    # -- lifecycle ---------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        destroy_process_group_at_exit()
        self._skip = bool(trainer.fast_dev_run)
        if self._skip:
            rank_zero_info("RankMonitor: `fast_dev_run` is on, so no rank analysis is run.")
            return
        if not trainer.loggers and not self._warned_no_logger:
            self._warned_no_logger = True
            rank_zero_warn(
                "RankMonitor: the Trainer has no logger, so rank scalars are not logged; reports are kept in "
                f"`monitor.report`/`monitor.history` and written to {Path(trainer.default_root_dir) / 'lightning_rank'}."
            )
        if is_compiled(pl_module):
            if not can_run_eagerly():
                rank_zero_warn(
                    "RankMonitor: the model is compiled and this torch has no `torch.compiler.set_stance`, so layer "
                    "hooks may not fire and layers may be reported as never called. Pass the uncompiled model."
                )
            else:
                rank_zero_info("RankMonitor: the model is compiled; analyzed validation epochs run it eagerly.")

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
        self._statistics = EpochStatistics(pl_module, **collection_of(self))

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._statistics is not None:
            self._statistics.batch_start(batch)

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._statistics is not None:
            self._statistics.batch_end()

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        statistics, self._statistics = self._statistics, None
        if statistics is None:
            return
        stats = statistics.finish(trainer)
        report = analyze(pl_module, stats, threshold=self.threshold, centered=self.centered, eig_dtype=self.eig_dtype)
        if not report.analyzed:
            collector = statistics.collector
            rank_zero_warn(
                f"RankMonitor observed {collector.batches} validation batches but none of the {len(collector.targets)} "
                "target layers was called by them. If the forward runs through code compiled with torch.compile "
                "that this torch cannot run eagerly, or bypasses the modules' forward, hooks cannot see it."
            )
        if trainer.is_global_zero:
            warn_about_rows(stats)
        self._publish(trainer, pl_module, report)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        """Leave a pass left open (an exception in ``validation_step``) and remove the hooks."""
        if self._statistics is not None:
            self._statistics.release()
            self._statistics = None

    # -- results -----------------------------------------------------------------------------
    def _publish(self, trainer: Trainer, pl_module: LightningModule, report: RankReport) -> None:
        epoch, step, stage = trainer.current_epoch, trainer.global_step, trainer.state.fn.value
        entry = {"epoch": epoch, "step": step, "stage": stage, "report": report.to_dict()}
        self.history = [h for h in self.history if (h["epoch"], h["step"], h["stage"]) != (epoch, step, stage)]
        self.history.append(entry)
        self.report = report
        pl_module.log("rank/mlu", report.mlu, logger=False, sync_dist=trainer.world_size > 1)

        log_dir = trainer.log_dir  # a collective under DDP: read it on every process
        if not trainer.is_global_zero:
            return
        report.save(Path(log_dir or trainer.default_root_dir) / "lightning_rank" / f"epoch_{epoch:03d}.json")
        metrics = report_scalars(report)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.tensorboard:
            writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
            if writers:
                self._write_views(writers, report, step)

    def _write_views(self, writers: list[Any], report: RankReport, step: int) -> None:
        spectra = {name: spectrum_in for name, (spectrum_in, _) in report.spectra.items()}
        for writer in writers:
            if writer.get_logdir() not in self._layouts_written:
                views.write_layout(writer, list(report.analyzed))
                self._layouts_written.add(writer.get_logdir())
            views.write_heatmap(writer, [h["report"] for h in self.history], step)
            views.write_spectra(writer, spectra, step)
            if not views.write_energy_curves(writer, spectra, self.threshold, step) and not self._told_no_matplotlib:
                rank_zero_info("RankMonitor: matplotlib is not installed, so no cumulative-energy figures are drawn.")
                self._told_no_matplotlib = True
            views.write_report_text(writer, report, step)
            writer.flush()

    # -- checkpointing -----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.report = RankReport.from_dict(self.history[-1]["report"]) if self.history else None


def report_scalars(report: RankReport, prefix: str = "rank") -> dict[str, float]:
    """The scalars logged for ``report``: MLU, weighted MLU, and per analyzed layer utilization, in and out rank."""
    metrics = {f"{prefix}/mlu": report.mlu, f"{prefix}/weighted_mlu": report.weighted_mlu}
    for name, layer in report.analyzed.items():
        metrics[f"{prefix}/utilization/{name}"] = layer.utilization
        metrics[f"{prefix}/in_rank/{name}"] = float(layer.in_rank)
        metrics[f"{prefix}/out_rank/{name}"] = float(layer.out_rank)
    return metrics
