"""``RankCompression``: when the planned epochs end, swap layers for low-rank ones and fine-tune, in one ``fit``.

Timeline inside ``trainer.fit`` with ``max_epochs=E`` and ``finetune_epochs=F`` (the fit loop is
extended to ``E + F`` epochs in ``setup``):

1. the validation of epoch ``E - 1`` is run as usual, with hooks counting the layer inputs, and
   gives the metric "before";
2. at the end of that epoch the statistics are summed over processes and ``factorize_`` builds the
   low-rank layers; the dense ones stay in place for that epoch's checkpoints;
3. when epoch ``E`` starts the layers are swapped, DDP is set up again around the new parameters,
   the optimizers and schedulers are rebuilt from ``configure_optimizers``, and a validation run
   gives "compressed";
4. epochs ``E .. E + F - 1`` fine-tune; their last validation gives "finetuned".

Checkpoints written after the swap hold the factorized structure; resuming from one rebuilds it in
``setup``, before Lightning loads the weights.
"""

from __future__ import annotations

import atexit
import math
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

from lightning_rank.epoch_statistics import EpochStatistics
from lightning_rank.factorize import METHODS, FactorizationResult, factorize_, rebuild_factorized_
from lightning_rank.layers import LOW_RANK_TYPES
from lightning_rank.checks import collection_arguments, collection_of
from lightning_rank.report import write_json_atomic
from lightning_rank.spectrum import check_threshold
from lightning_rank.statistics import ForwardFn, MaskFn, default_forward
from lightning_rank.targets import ModuleSelector


class RankCompression(Callback):
    r"""Compress the model to its utilized rank when the planned training ends, then fine-tune it.

    With ``Trainer(max_epochs=E)``, the fit loop runs ``E + finetune_epochs`` epochs: the layers are
    factorized by :func:`~lightning_rank.factorize_` with statistics counted over the validation of
    epoch ``E - 1``, swapped in when epoch ``E`` starts (so the checkpoints of epoch ``E - 1`` still hold
    the trained dense model), and the remaining epochs fine-tune the smaller model with optimizers and
    schedulers rebuilt from ``configure_optimizers``. If training stops before epoch ``E - 1`` ends
    (early stopping), nothing is compressed.

    The monitored metric is validated three times: "before" the swap, right after it ("compressed")
    and after fine-tuning ("finetuned"). These, the parameter and multiply-add counts and the
    per-layer ranks go to every logger (``compression/*``), to ``compression.result``/``.metrics``, and
    to ``<trainer.log_dir>/lightning_rank/compression.json``; a ``TensorBoardLogger`` also gets the
    per-layer table as text.

    Args:
        threshold: energy threshold of the utilized ranks (used when neither ``ranks`` nor ``param_budget`` is).
        param_budget: fraction in (0, 1] of the selected layers' parameters to keep; ranks are allocated where
            they lose the least output energy.
        method: ``"whiten"`` (least output error on the data), ``"projection"`` (the paper's ``P_T W P_S``) or ``"svd"``.
        finetune_epochs: epochs of fine-tuning after the swap (0: none).
        monitor: the validation metric reported before, right after, and after fine-tuning.
        ranks: explicit ranks, one int or ``{name or regex: rank}``.
        target_modules: which layers may be replaced (None: all supported; a regex, a list of names, a callable).
        exclude_modules: layers to leave dense, in the same forms.
        mask_fn: ``mask_fn(batch)`` returns a bool mask over the inputs' leading dims (padding rows are not counted).
        max_rows_per_batch: count at most this many random rows of each input per batch.
        dtype: accumulation dtype of the statistics.
        dense_checkpoints: write checkpoints after the swap with dense layers (the original structure, loadable
            by the original model; resuming from them continues with dense layers).
        forward: ``forward(model, batch)`` used to count multiply-adds on one validation batch (default: as in
            :func:`~lightning_rank.collect`).
        seed: seed of the row subsampling.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[lr.RankCompression(param_budget=0.5, finetune_epochs=2,
                                                                       monitor="val_acc")])
    """

    def __init__(
        self,
        threshold: float = 0.99,
        param_budget: float | None = None,
        method: str = "whiten",
        finetune_epochs: int = 1,
        monitor: str = "val_loss",
        ranks: int | dict[str, int] | None = None,
        target_modules: ModuleSelector = None,
        exclude_modules: ModuleSelector = None,
        mask_fn: MaskFn | None = None,
        max_rows_per_batch: int | None = None,
        dtype: torch.dtype = torch.float32,
        dense_checkpoints: bool = False,
        forward: ForwardFn | None = None,
        seed: int = 0,
    ) -> None:
        self.threshold = check_threshold(threshold)
        if param_budget is not None and (
            isinstance(param_budget, bool) or not isinstance(param_budget, (int, float)) or not 0 < param_budget <= 1
        ):
            raise ValueError(f"`param_budget` must be a fraction in (0, 1] or None, got {param_budget!r}")
        if param_budget is not None and ranks is not None:
            raise ValueError("pass either `ranks` or `param_budget`, not both")
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
        if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
            raise ValueError(f"`finetune_epochs` must be an int >= 0, got {finetune_epochs!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be the name of a logged validation metric, got {monitor!r}")
        if forward is not None and not callable(forward):
            raise TypeError(f"`forward` must be a callable (model, batch) -> output or None, got {type(forward).__name__}")
        if not isinstance(dense_checkpoints, bool):
            raise TypeError(f"`dense_checkpoints` must be a bool, got {dense_checkpoints!r}")
        self.param_budget = param_budget
        self.method = method
        self.finetune_epochs = finetune_epochs
        self.monitor = monitor
        self.ranks = ranks
        checked = collection_arguments(target_modules, exclude_modules, mask_fn, max_rows_per_batch, dtype, seed)
        for name, value in checked.items():
            setattr(self, name, value)
        self.dense_checkpoints = dense_checkpoints
        self.forward = forward

        self.result: FactorizationResult | None = None
        self.metrics: dict[str, float | None] = {"before": None, "compressed": None, "finetuned": None}
        self.macs: dict[str, float | None] = {"before": None, "after": None}
        self.compressed = False
        self._planned_epochs: int | None = None
        self._statistics: EpochStatistics | None = None
        self._first_batch: Any = None
        self._validated_epoch = -1
        self._summary: dict[str, Any] | None = None  # what factorize_ did, kept across a resume
        self._pending: dict[str, torch.nn.Module] = {}  # factorized layers waiting for the next epoch
        self._skip = False
        self._restore_hook: Callable[[], Any] | None = None

    @property
    def planned_epochs(self) -> int | None:
        """The ``max_epochs`` the Trainer was given, before the fine-tuning epochs were added (None before ``fit``).

        ``trainer.max_epochs`` and ``trainer.estimated_stepping_batches`` include the fine-tuning epochs;
        a ``configure_optimizers`` that sizes a schedule for the planned training can use this instead
        (it is called again after the swap, when ``compressed`` is True).
        """
        return self._planned_epochs

    # -- set-up ------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING.value:
            return
        destroy_process_group_at_exit()
        self._skip = bool(trainer.fast_dev_run)
        if self._skip:
            rank_zero_info("RankCompression: `fast_dev_run` is on, so nothing is compressed.")
            return
        planned = trainer.fit_loop.max_epochs
        if planned is None or planned < 1:
            raise MisconfigurationException(
                "RankCompression compresses when the planned epochs end: set `Trainer(max_epochs=...)` to a positive number."
            )
        if self._planned_epochs is None:
            self._planned_epochs = planned
            trainer.fit_loop.max_epochs = planned + self.finetune_epochs
        if not is_overridden("validation_step", pl_module):
            raise MisconfigurationException(
                "RankCompression needs validation data: the statistics and the metric "
                f"{self.monitor!r} come from `validation_step`, which {type(pl_module).__name__} does not define."
            )
        self._rebuild_before_weights_load(pl_module)

    def _rebuild_before_weights_load(self, pl_module: LightningModule) -> None:
        """Give ``pl_module`` the factorized structure of a post-swap checkpoint before Lightning loads its weights.

        The checkpoint path of ``fit(ckpt_path=...)`` is not known in ``setup``, and the callbacks' own
        checkpoint hooks run after the weights load, so the module's ``on_load_checkpoint`` (called with
        the loaded checkpoint right before its state dict is loaded) is wrapped until ``on_fit_start``.
        """
        user_hook = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            if rebuild_factorized_(pl_module, checkpoint["state_dict"]):
                rank_zero_info("RankCompression: rebuilt the factorized layers of the checkpoint before loading it.")
            user_hook(checkpoint)

        own_attribute = vars(pl_module).get("on_load_checkpoint")

        def restore() -> None:
            if own_attribute is None:
                del pl_module.on_load_checkpoint
            else:
                pl_module.on_load_checkpoint = own_attribute

        pl_module.on_load_checkpoint = on_load_checkpoint
        self._restore_hook = restore

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unwrap_hook()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unwrap_hook()  # also when fit failed before it started
        self._release()

    def _unwrap_hook(self) -> None:
        if self._restore_hook is not None:
            self._restore_hook()
            self._restore_hook = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._skip:
            return
        if trainer.limit_val_batches == 0 or not trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined():
            raise MisconfigurationException(
                "RankCompression needs validation data (a `val_dataloader` and `limit_val_batches` > 0): the statistics "
                f"and the metric {self.monitor!r} come from validation."
            )

    # -- collecting over the last planned validation -----------------------------------------
    def _is_compression_epoch(self, trainer: Trainer) -> bool:
        return not (self._skip or self.compressed) and trainer.current_epoch == self._planned_epochs - 1

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._is_compression_epoch(trainer) and self._statistics is None:
            self._start_collecting(pl_module)

    def _start_collecting(self, pl_module: LightningModule) -> None:
        self._statistics = EpochStatistics(pl_module, **collection_of(self))
        self._first_batch = None

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._statistics is not None:
            if self._first_batch is None:
                self._first_batch = batch
            self._statistics.batch_start(batch)

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._statistics is not None:
            self._statistics.batch_end()

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._validated_epoch = trainer.current_epoch
        metric = self._metric(trainer)
        if self.compressed and trainer.current_epoch == trainer.fit_loop.max_epochs - 1:
            self.metrics["finetuned"] = metric
        elif not self.compressed:
            self.metrics["before"] = metric

    def _metric(self, trainer: Trainer) -> float:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = sorted(trainer.callback_metrics)
            raise MisconfigurationException(
                f"RankCompression(monitor={self.monitor!r}): the validation logged no such metric. "
                f"Logged metrics: {logged}. Log it with `self.log({self.monitor!r}, ...)` in `validation_step`."
            )
        return float(value)

    # -- the swap ----------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.compressed:
            if trainer.current_epoch == trainer.fit_loop.max_epochs - 1 and self._validated_epoch != trainer.current_epoch:
                self._run_validation(trainer)
                self.metrics["finetuned"] = self._metric(trainer)
            return
        if not self._is_compression_epoch(trainer):
            return
        if self._statistics is None or self._validated_epoch != trainer.current_epoch:
            self._collect_now(trainer, pl_module)  # this epoch had no validation: run one to count the inputs
        if not self._plan(trainer, pl_module):
            trainer.fit_loop.max_epochs = trainer.current_epoch + 1

    def _collect_now(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Run a validation that counts the layer inputs and gives the metric "before"."""
        self._release()
        self._start_collecting(pl_module)
        self._run_validation(trainer, listen=True)
        self.metrics["before"] = self._metric(trainer)

    def _plan(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Factorize now, but keep the trained dense layers in place until the next epoch starts; whether any was replaced.

        So this epoch's checkpoints and early-stopping checks still see the model as trained, and a
        compression that replaces nothing can end training right here.
        """
        statistics, self._statistics = self._statistics, None
        stats = statistics.finish(trainer)
        self.macs["before"] = self._count_macs(pl_module)
        dense = dict(pl_module.named_modules())
        self.result = factorize_(
            pl_module,
            stats,
            threshold=self.threshold,
            method=self.method,
            ranks=self.ranks,
            param_budget=self.param_budget,
            target_modules=self.target_modules,
            exclude_modules=self.exclude_modules,
        )
        self._summary = self.result.to_dict()
        if not self.result.layers:
            reasons = "; ".join(f"{n}: {r}" for n, r in list(self.result.not_replaced.items())[:5])
            rank_zero_warn(f"RankCompression replaced no layer, so the model is kept as it is and training ends ({reasons}).")
            return False
        self._pending = {name: pl_module.get_submodule(name) for name in self.result.layers}
        for name in self._pending:
            _set_submodule(pl_module, name, dense[name])
        return True

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        resumed_past_plan = self._summary is None and trainer.current_epoch >= (self._planned_epochs or math.inf)
        if resumed_past_plan and not self._skip:  # e.g. resumed from the last checkpoint of a finished dense run
            self._collect_now(trainer, pl_module)
            if not self._plan(trainer, pl_module):
                trainer.should_stop = True
                return
        if not self._pending:
            return
        for name, module in self._pending.items():
            _set_submodule(pl_module, name, module)
        self._pending = {}
        self.compressed = True
        _rebuild_training_state(trainer)
        self.macs["after"] = self._count_macs(pl_module)
        self._run_validation(trainer)
        self.metrics["compressed"] = self._metric(trainer)
        if self.finetune_epochs == 0:
            self.metrics["finetuned"] = self.metrics["compressed"]
        rank_zero_info(
            f"RankCompression: {len(self.result.layers)} layers replaced, parameters "
            f"{self.result.params_before:,} -> {self.result.params_after:,}; {self.monitor} "
            f"{self.metrics['before']:.4g} -> {self.metrics['compressed']:.4g}; fine-tuning {self.finetune_epochs} epochs."
        )

    def _run_validation(self, trainer: Trainer, listen: bool = False) -> None:
        """Run the fit loop's validation now, heard only by progress bars (and this callback if ``listen``).

        Checkpointing, early stopping and monitors do not see this extra run, so it cannot overwrite a
        checkpoint of this epoch or count as one more check.
        """
        connector = trainer._logger_connector
        first_loop_iter = connector._first_loop_iter
        callbacks = trainer.callbacks
        trainer.callbacks = [c for c in callbacks if isinstance(c, ProgressBar) or (listen and c is self)]
        trainer.validating = True
        try:
            trainer.fit_loop.epoch_loop.val_loop.run()
        finally:
            trainer.callbacks = callbacks
            trainer.training = True
            connector._first_loop_iter = first_loop_iter

    def _count_macs(self, pl_module: LightningModule) -> float | None:
        """Multiply-adds per example of one forward over the first validation batch (None if it cannot run)."""
        batch = self._first_batch
        if batch is None:
            return None
        forward = self.forward or default_forward
        training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                forward(pl_module, batch)
            return counter.get_total_flops() / 2 / extract_batch_size(batch)
        except Exception as err:  # a forward that does not take the batch as `collect` passes it
            rank_zero_warn(f"RankCompression could not count multiply-adds ({err}); pass `forward=` to count them.")
            return None
        finally:
            pl_module.train(training)

    # -- results -----------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release()
        if self._skip:
            return
        if self._summary is None:
            rank_zero_warn(
                f"RankCompression: training stopped at epoch {trainer.current_epoch} before the planned "
                f"{self._planned_epochs} epochs ended, so nothing was compressed."
            )
        log_dir = trainer.log_dir  # a collective under DDP: read it on every process
        if self._summary is None or not trainer.is_global_zero:
            return
        summary = self.summary()
        write_json_atomic(Path(log_dir or trainer.default_root_dir) / "lightning_rank" / "compression.json", summary)
        scalars = {
            f"compression/{key}": float(value)
            for key, value in (
                ("params_before", summary["params_before"]),
                ("params_after", summary["params_after"]),
                ("macs_before", summary["macs_before"]),
                ("macs_after", summary["macs_after"]),
                *((f"{self.monitor}/{stage}", v) for stage, v in summary["metrics"].items()),
                *((f"rank/{name}", rank) for name, rank in summary["layers"].items()),
            )
            if value is not None
        }
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("compression", self._markdown(), global_step=trainer.global_step)
                logger.experiment.flush()

    def summary(self) -> dict[str, Any]:
        """What ``compression.json`` holds: ``params_before``/``after``, ``macs_before``/``after`` (per example),
        ``layers`` ({name: rank}), ``metrics`` ({"before", "compressed", "finetuned"}), and the factorization details."""
        if self._summary is None:
            raise RuntimeError("RankCompression has not compressed anything yet")
        return {
            "params_before": self._summary["params_before"],
            "params_after": self._summary["params_after"],
            "macs_before": self.macs["before"],
            "macs_after": self.macs["after"],
            "layers": self._summary["layers"],
            "metrics": dict(self.metrics),
            "monitor": self.monitor,
            **{k: v for k, v in self._summary.items() if k not in ("params_before", "params_after", "layers")},
        }

    def _markdown(self) -> str:
        metrics = ", ".join(
            f"{stage} {'n/a' if v is None or math.isnan(v) else f'{v:.4g}'}" for stage, v in self.metrics.items()
        )
        lines = [f"**{self.monitor}**: {metrics}", "", "| layer | rank |", "|---|---:|"]
        lines += [f"| {name} | {rank} |" for name, rank in self._summary["layers"].items()]
        return "\n".join(lines) + "\n"

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.dense_checkpoints and self.compressed:
            checkpoint["state_dict"] = _dense_state_dict(pl_module, checkpoint["state_dict"])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "compressed": self.compressed,
            "planned_epochs": self._planned_epochs,
            "metrics": dict(self.metrics),
            "macs": dict(self.macs),
            "factorization": self._summary if self.compressed else None,  # a planned swap is redone on resume
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.compressed = state_dict["compressed"]
        self.metrics.update(state_dict["metrics"])
        self.macs.update(state_dict["macs"])
        self._summary = state_dict["factorization"]

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._statistics is not None:
            self._statistics.release()
            self._statistics = None


def _set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _rebuild_training_state(trainer: Trainer) -> None:
    """After a swap: wrap the model in DDP again (so the new parameters' gradients are synchronized) and
    rebuild optimizers and schedulers from ``configure_optimizers``."""
    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.model.module
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
    _optimizers_to_device(strategy.optimizers, strategy.root_device)


_destroy_at_exit_registered = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when this process exits, while Python is still fully alive.

    Lightning does this for NCCL only. With gloo, a worker thread of the process group can hold the last
    reference to a finished collective's tensors; if it drops it while the interpreter finalizes, it needs
    the GIL, Python ends the thread with ``pthread_exit``, and the forced unwind through a ``noexcept``
    destructor aborts the process ("terminate called without an active exception", SIGABRT), so
    ``ddp_spawn`` raises from ``fit`` after training completed. An ``atexit`` handler runs before
    finalization; destroying the group there joins those threads first. Needs an initialized group.
    """
    global _destroy_at_exit_registered
    if not _destroy_at_exit_registered and torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.register(_destroy_dist_connection)
        _destroy_at_exit_registered = True


def _dense_state_dict(pl_module: LightningModule, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each low-rank layer's ``first``/``second`` entries replaced by its dense weights."""
    dense = dict(state_dict)
    for name, module in pl_module.named_modules():
        if not isinstance(module, LOW_RANK_TYPES):
            continue
        for key in [k for k in dense if k.startswith(f"{name}.first.") or k.startswith(f"{name}.second.")]:
            del dense[key]
        for key, value in module.to_dense().state_dict().items():
            dense[f"{name}.{key}"] = value.detach()
    return dense
