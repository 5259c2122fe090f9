"""``RankMonitor``: the utilized rank of every layer, measured on each analyzed validation epoch.

Forward pre-hooks (a :class:`~lightning_rank.statistics.StatisticsCollector`) are attached only
during analyzed validation epochs and count the inputs the user's own ``validation_step`` feeds each
layer. At the epoch's end the statistics are summed over processes, analyzed, and published: the
report, its history, ``rank/mlu`` in ``trainer.callback_metrics``, scalars in every logger, a JSON file
per epoch, and TensorBoard views.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_rank import tensorboard as views
from lightning_rank.analysis import analyze
from lightning_rank.report import RankReport
from lightning_rank.spectrum import check_threshold, clean_spectrum
from lightning_rank.statistics import (
    ActivationStatistics,
    InputStatistics,
    MaskFn,
    StatisticsCollector,
    warn_about_rows,
)
from lightning_rank.targets import ModuleSelector, float_dtype, weight_matrix

# The reason `StatisticsCollector.compute` gives a target layer that no forward reached.
_UNREACHED = "never called"

_set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6


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
    ) -> None:
        self.threshold = check_threshold(threshold)
        self.every_n_epochs = _positive_int(every_n_epochs, "every_n_epochs")
        self.target_modules = _check_selector(target_modules, "target_modules")
        self.exclude_modules = _check_selector(exclude_modules, "exclude_modules")
        if mask_fn is not None and not callable(mask_fn):
            raise TypeError(f"`mask_fn` must be a callable batch -> bool mask or None, got {type(mask_fn).__name__}")
        self.mask_fn = mask_fn
        self.max_rows_per_batch = None if max_rows_per_batch is None else _positive_int(
            max_rows_per_batch, "max_rows_per_batch"
        )
        self.dtype = float_dtype(dtype)
        for name, flag in (("centered", centered), ("tensorboard", tensorboard)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {flag!r}")
        self.centered = centered
        self.tensorboard = tensorboard
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}")
        self.seed = seed

        self.report: RankReport | None = None
        self.history: list[dict[str, Any]] = []
        self._collector: StatisticsCollector | None = None
        self._observing: contextlib.ExitStack | None = None
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
        if _is_compiled(pl_module):
            if _set_stance is None:
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
        self._collector = StatisticsCollector(
            pl_module,
            target_modules=self.target_modules,
            exclude_modules=self.exclude_modules,
            mask_fn=self.mask_fn,
            max_rows_per_batch=self.max_rows_per_batch,
            dtype=self.dtype,
            seed=self.seed,
        )
        self._collector.attach()

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._collector is None:
            return
        stack = contextlib.ExitStack()
        if _set_stance is not None:
            stack.enter_context(_set_stance("force_eager"))  # hooks do not fire inside compiled code
        stack.enter_context(self._collector.observe(batch))
        self._observing = stack

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
        if self._observing is not None:
            self._observing, stack = None, self._observing
            stack.close()

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        collector = self._collector
        if collector is None:
            return
        self._release()
        stats = collector.compute()
        if trainer.world_size > 1:
            stats = _sum_over_processes(collector, stats, trainer)
        report = analyze(pl_module, stats, threshold=self.threshold, centered=self.centered)
        if not report.analyzed:
            rank_zero_warn(
                f"RankMonitor observed {collector.batches} validation batches but none of the {len(collector.targets)} "
                "target layers was called by them. If the forward runs through code compiled with torch.compile "
                "that this torch cannot run eagerly, or bypasses the modules' forward, hooks cannot see it."
            )
        if trainer.is_global_zero:
            warn_about_rows(stats)
        self._publish(trainer, pl_module, report, stats)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        """Leave a pass left open (an exception in ``validation_step``) and remove the hooks."""
        if self._observing is not None:
            self._observing, stack = None, self._observing
            stack.close()
        if self._collector is not None:
            self._collector.detach()
            self._collector = None

    # -- results -----------------------------------------------------------------------------
    def _publish(self, trainer: Trainer, pl_module: LightningModule, report: RankReport, stats: ActivationStatistics) -> None:
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
                self._write_views(writers, report, stats, step)

    def _write_views(self, writers: list[Any], report: RankReport, stats: ActivationStatistics, step: int) -> None:
        spectra = input_spectra(stats, centered=self.centered)
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


def input_spectra(stats: ActivationStatistics, centered: bool = False) -> dict[str, Tensor]:
    """Eigenvalues (float64, descending, round-off cleaned) of each analyzed layer's input moment.

    Layers sharing an input share one tensor; inputs of the same size are decomposed in one batched call.
    """
    by_dim: dict[int, list[str]] = defaultdict(list)
    for key, s in stats.inputs.items():
        by_dim[s.dim].append(key)
    spectra: dict[str, Tensor] = {}
    for dim, keys in by_dim.items():
        values = torch.linalg.eigvalsh(torch.stack([stats.inputs[key].second_moment(centered) for key in keys]))
        for key, eigenvalues in zip(keys, values):
            rtol = dim * torch.finfo(stats.inputs[key].gram.dtype).eps
            spectra[key] = clean_spectrum(eigenvalues, rtol).flip(-1)
    return {name: spectra[key] for name, key in stats.sources.items()}


def _sum_over_processes(collector: StatisticsCollector, stats: ActivationStatistics, trainer: Trainer) -> ActivationStatistics:
    """``stats`` summed over processes in place, after the processes agree on which accumulators exist.

    A layer may be reached on one process only, and accumulators are created lazily and keyed by the first
    layer that saw an input, so each process first shares, per target (in the same order everywhere),
    the index of its accumulator's layer and whether its input sharing diverged. Missing accumulators
    become zeros of the layer's fan_in; then every accumulator is reduced, in that agreed order.
    """
    names = list(collector.targets)
    index = {name: i for i, name in enumerate(names)}
    device = trainer.strategy.root_device
    keys = [index[stats.sources[name]] if name in stats.sources else -1 for name in names]
    diverged = [int(name in stats.skipped and not stats.skipped[name].startswith(_UNREACHED)) for name in names]
    codes = torch.tensor([keys, diverged], dtype=torch.int64, device=device)
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
    return agreed.all_reduce_(_sum_reducer(trainer))


def _sum_reducer(trainer: Trainer) -> Callable[[Tensor], None]:
    """An in-place sum over processes: ``torch.distributed.all_reduce``, else the strategy's own ``reduce``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return lambda tensor: torch.distributed.all_reduce(tensor)

    def reduce(tensor: Tensor) -> None:
        out = trainer.strategy.reduce(tensor, reduce_op="sum")
        if out is not tensor:
            tensor.copy_(out)

    return reduce


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was given to the Trainer compiled, or holds a compiled submodule."""
    if getattr(module, "_compiler_ctx", None) is not None:
        return True
    return any(type(m).__name__ == "OptimizedModule" for m in module.modules())


def _positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive int, got {value!r}")
    return value


def _check_selector(selector: Any, argument: str) -> ModuleSelector:
    """Check the form of a module selector now; whether its names exist is checked against the model later."""
    if selector is None or callable(selector):
        return selector
    if isinstance(selector, str):
        try:
            re.compile(selector)
        except re.error as err:
            raise ValueError(f"`{argument}`={selector!r} is not a valid regular expression: {err}") from None
        return selector
    if isinstance(selector, Sequence) and all(isinstance(item, str) for item in selector):
        if not selector and argument == "target_modules":
            raise ValueError("`target_modules` is an empty list; pass None to select every layer")
        return list(selector)
    raise TypeError(
        f"`{argument}` must be None, a regex str, a list of names or a callable (module, name) -> bool, "
        f"got {selector!r}"
    )
