"""``RankCompression``: compress the model to its utilized rank inside ``max_epochs``, then fine-tune it.

Timeline inside ``trainer.fit`` with ``max_epochs=E`` and ``compress_at_epoch=c`` (an epoch index, or a
fraction ``f`` of ``E`` giving ``c = int(f * E)``, as ``StochasticWeightAveraging`` counts):

1. epochs ``0 .. c - 1`` train the dense model; the validation of epoch ``c - 1`` counts the layer
   inputs and gives the metric "before";
2. when epoch ``c - 1`` ends, the statistics are summed over processes and ``plan_factorization``
   decides the ranks and builds the low-rank layers (phase ``PLANNED``); the dense layers stay in
   place for that epoch's checkpoints;
3. when epoch ``c`` starts, the plan is applied (phase ``COMPRESSED``), DDP is set up again around the
   new parameters, the optimizers and schedulers are rebuilt from ``configure_optimizers``, and a
   validation gives "compressed";
4. epochs ``c .. E - 1`` fine-tune; the last validation gives "finetuned". ``trainer.max_epochs`` is
   never changed, so ``trainer.estimated_stepping_batches`` counts the whole run.

Checkpoints written after the swap hold the factorized structure; resuming from one rebuilds it before
Lightning loads the weights. A plan is not saved: resuming from a checkpoint of a dense epoch at or
after ``c - 1`` counts the inputs and plans again before the swap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

from lightning_rank import _lightning
from lightning_rank.checks import (
    StatisticsArguments,
    check_bool,
    check_budget,
    check_compress_at_epoch,
    check_method,
    check_ranks,
    check_threshold,
)
from lightning_rank.epoch_statistics import EpochStatistics, StatisticsArgumentsMixin, reports_dir
from lightning_rank.factorize import FactorizationPlan, FactorizationResult, check_factorization, plan_factorization
from lightning_rank.layers import LOW_RANK_TYPES
from lightning_rank.report import write_json_atomic
from lightning_rank.statistics import ForwardFn, MaskFn, default_forward
from lightning_rank.structure import rebuild_factorized_
from lightning_rank.targets import ModuleSelector


class Phase(str, Enum):
    """Where a :class:`RankCompression` is: saved in its ``state_dict``."""

    TRAINING = "training"  # the dense model trains
    PLANNED = "planned"  # the plan is made; the swap happens when the next epoch starts
    COMPRESSED = "compressed"  # the low-rank layers are in place and fine-tune
    FINISHED = "finished"  # the fit ended after compression, or there was nothing to replace


class RankCompression(StatisticsArgumentsMixin, Callback):
    r"""Compress the model to its utilized rank at ``compress_at_epoch``, then fine-tune it, within ``max_epochs``.

    The layers are factorized by :func:`~lightning_rank.plan_factorization` with statistics counted over
    the validation of epoch ``compress_at_epoch - 1`` and swapped in when epoch ``compress_at_epoch``
    starts (so the checkpoints of the epoch before still hold the trained dense model); the remaining
    epochs fine-tune the smaller model with optimizers and schedulers rebuilt from ``configure_optimizers``
    (called again after the swap, when ``compressed`` is True; a schedule sized by
    ``trainer.estimated_stepping_batches - trainer.global_step`` then ends exactly at ``max_epochs``). If
    training stops before the swap (early stopping), nothing is compressed.

    The monitored metric is validated "before" the swap, right after it ("compressed") and after
    fine-tuning ("finetuned"). These, the parameter and multiply-add counts and the per-layer ranks go
    to every logger (``compression/*``), to ``compression.result``/``.metrics``, and to
    ``<trainer.log_dir>/rank_reports/compression.json``; a ``TensorBoardLogger`` also gets the
    per-layer table as text. Every argument, layer name, rank and budget that can be checked against the
    model is checked in ``setup``; the validation data before the first training step.

    Args:
        compress_at_epoch: the epoch whose start swaps the layers in: an epoch index in ``[1, max_epochs - 1]``,
            or a float in (0, 1), the fraction of ``max_epochs`` trained dense (``int(f * max_epochs)``).
        threshold: energy threshold of the utilized ranks (used when neither ``ranks`` nor ``param_budget`` is).
        param_budget: fraction in (0, 1] of the selected layers' parameters to keep; ranks are allocated where
            they lose the least output energy.
        method: ``"whiten"`` (least output error on the data), ``"projection"`` (the paper's ``P_T W P_S``) or ``"svd"``.
        monitor: the validation metric reported before, right after, and after fine-tuning.
        ranks: explicit ranks, one int or ``{name or regex: rank}``.
        target_modules: which layers may be replaced (None: all supported; a regex, a list of names, a callable).
        exclude_modules: layers to leave dense, in the same forms.
        mask_fn: ``mask_fn(batch)`` returns a bool mask over the inputs' leading dims (padding rows are not counted).
        max_rows_per_batch: count at most this many random rows of each input per batch.
        dtype: accumulation dtype of the statistics.
        dataloader_idx: the validation dataloader whose batches are counted (None: all of them).
        dense_checkpoints: write checkpoints after the swap with dense layers (the original structure, loadable
            by the original model; resuming from them continues with dense layers).
        forward: ``forward(model, batch)`` used to count multiply-adds on one validation batch (default: as in
            :func:`~lightning_rank.collect`).
        seed: seed of the row subsampling.

    Example::

        trainer = Trainer(max_epochs=12, callbacks=[lr.RankCompression(compress_at_epoch=10, param_budget=0.5,
                                                                       monitor="val_acc")])
    """

    def __init__(
        self,
        compress_at_epoch: int | float = 0.8,
        threshold: float = 0.99,
        param_budget: float | None = None,
        method: str = "whiten",
        monitor: str = "val_loss",
        ranks: int | dict[str, int] | None = None,
        target_modules: ModuleSelector = None,
        exclude_modules: ModuleSelector = None,
        mask_fn: MaskFn | None = None,
        max_rows_per_batch: int | None = None,
        dtype: torch.dtype = torch.float32,
        dataloader_idx: int | None = None,
        dense_checkpoints: bool = False,
        forward: ForwardFn | None = None,
        seed: int = 0,
    ) -> None:
        self.compress_at_epoch = check_compress_at_epoch(compress_at_epoch)
        self.threshold = check_threshold(threshold)
        self.param_budget = check_budget(param_budget)
        self.ranks = check_ranks(ranks, self.param_budget)
        self.method = check_method(method)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be the name of a logged validation metric, got {monitor!r}")
        if forward is not None and not callable(forward):
            raise TypeError(f"`forward` must be a callable (model, batch) -> output or None, got {type(forward).__name__}")
        self.monitor = monitor
        self.statistics_arguments = StatisticsArguments(
            target_modules, exclude_modules, mask_fn, max_rows_per_batch, dtype, seed, dataloader_idx
        )
        self.dense_checkpoints = check_bool(dense_checkpoints, "dense_checkpoints")
        self.forward = forward

        self.phase = Phase.TRAINING
        self.result: FactorizationResult | None = None
        self.metrics: dict[str, float | None] = {"before": None, "compressed": None, "finetuned": None}
        self.macs: dict[str, float | None] = {"before": None, "after": None}
        self._swap_epoch: int | None = None
        self._factorization: dict[str, Any] | None = None  # result.to_dict(), kept across a resume
        self._plan: FactorizationPlan | None = None
        self._statistics: EpochStatistics | None = None
        self._sample_batch: Any = None  # a validation batch, to count multiply-adds
        self._validated_epoch = -1
        self._disabled = False
        self._unwrap_load_hook: Callable[[], None] | None = None

    @property
    def swap_epoch(self) -> int | None:
        """The epoch at whose start the layers are swapped (``compress_at_epoch`` resolved in ``setup``)."""
        return self._swap_epoch

    @property
    def compressed(self) -> bool:
        """Whether the low-rank layers are in place."""
        return self.phase in (Phase.COMPRESSED, Phase.FINISHED) and bool((self._factorization or {}).get("layers"))

    # -- checks and set-up -------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING.value:
            return
        self._disabled = bool(trainer.fast_dev_run)
        if self._disabled:
            rank_zero_info("RankCompression: `fast_dev_run` is on, so nothing is compressed.")
            return
        _lightning.check_strategy(trainer, "RankCompression")
        self._swap_epoch = self._resolve_epoch(trainer.max_epochs)
        needs = f"RankCompression needs validation data: the statistics and the metric {self.monitor!r} come from"
        if not is_overridden("validation_step", pl_module):
            raise MisconfigurationException(f"{needs} `validation_step`, which {type(pl_module).__name__} does not define.")
        if trainer.limit_val_batches == 0 or not _lightning.has_validation_dataloader(trainer):
            raise MisconfigurationException(f"{needs} validation: pass a `val_dataloader` and `limit_val_batches` > 0.")
        if self.phase == Phase.TRAINING and not is_overridden("configure_model", pl_module):
            self._check_model(pl_module)
        self._unwrap_load_hook = _lightning.before_weights_load(pl_module, lambda ckpt: self._rebuild(pl_module, ckpt))

    def _resolve_epoch(self, max_epochs: int | None) -> int:
        given, finite = self.compress_at_epoch, max_epochs is not None and max_epochs >= 0
        if isinstance(given, float) and not finite:
            raise MisconfigurationException(
                f"RankCompression(compress_at_epoch={given}) is a fraction of max_epochs, but max_epochs is {max_epochs}: "
                "pass an epoch index instead."
            )
        epoch = int(given * max_epochs) if isinstance(given, float) else given
        if finite and not 1 <= epoch < max_epochs:
            raise MisconfigurationException(
                f"RankCompression(compress_at_epoch={given}) swaps the layers when epoch {epoch} starts, but "
                f"Trainer(max_epochs={max_epochs}) allows epochs 1 to {max_epochs - 1}: at least one epoch trains the "
                "dense model and one fine-tunes the compressed one."
            )
        return epoch

    def _check_model(self, pl_module: LightningModule) -> None:
        try:
            check_factorization(
                pl_module, ranks=self.ranks, param_budget=self.param_budget,
                target_modules=self.target_modules, exclude_modules=self.exclude_modules,
            )  # fmt: skip
        except ValueError as err:
            raise MisconfigurationException(f"RankCompression: {err}") from err

    def _rebuild(self, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if rebuild_factorized_(pl_module, checkpoint["state_dict"]):
            rank_zero_info("RankCompression: rebuilt the factorized layers of the checkpoint before loading it.")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unwrap()
        if self._disabled:
            return
        if self.phase == Phase.TRAINING and is_overridden("configure_model", pl_module):
            self._check_model(pl_module)  # its layers exist only now
        if self.phase == Phase.FINISHED and self.compressed:
            self.phase = Phase.COMPRESSED  # a new fit from a finished run fine-tunes further

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._disabled:
            return
        batches = _lightning.validation_batches(trainer)
        index = self.dataloader_idx
        if index is not None and index >= len(batches):
            raise MisconfigurationException(
                f"RankCompression(dataloader_idx={index}): the fit has {len(batches)} validation dataloader(s)."
            )
        if sum(batches if index is None else batches[index : index + 1]) == 0:
            which = "validation dataloaders are" if index is None else f"validation dataloader {index} is"
            raise MisconfigurationException(
                f"RankCompression needs validation batches to count the layer inputs, but the {which} empty."
            )

    # -- counting over the validation before the swap ----------------------------------------
    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._disabled or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.phase == Phase.TRAINING and trainer.current_epoch == self._swap_epoch - 1 and self._statistics is None:
            self._statistics = EpochStatistics(pl_module, self.statistics_arguments)

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._statistics is not None:
            self._statistics.batch_start(batch, dataloader_idx)

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._statistics is not None:
            self._statistics.batch_end()

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._disabled or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._validated_epoch = trainer.current_epoch
        if self.phase in (Phase.TRAINING, Phase.COMPRESSED):
            self.metrics["before" if self.phase == Phase.TRAINING else "finetuned"] = self._metric(trainer)

    def _metric(self, trainer: Trainer) -> float:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise MisconfigurationException(
                f"RankCompression(monitor={self.monitor!r}): the validation logged no such metric. Logged metrics: "
                f"{sorted(trainer.callback_metrics)}. Log it with `self.log({self.monitor!r}, ...)` in `validation_step`."
            )
        return float(value)

    # -- plan, then swap ---------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.phase == Phase.TRAINING and not self._disabled and epoch == self._swap_epoch - 1:
            self._make_plan(trainer, pl_module)
        elif self.phase == Phase.COMPRESSED and epoch == trainer.max_epochs - 1 and self._validated_epoch != epoch:
            _lightning.run_validation(trainer)  # the last epoch did not validate: "finetuned" needs one
            self.metrics["finetuned"] = self._metric(trainer)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._disabled:
            return
        if self.phase == Phase.TRAINING and trainer.current_epoch >= self._swap_epoch:
            self._make_plan(trainer, pl_module)  # resumed at or past the swap from a dense checkpoint
        if self.phase == Phase.PLANNED:
            self._swap(trainer, pl_module)

    def _make_plan(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Plan the factorization from this epoch's validation (run one if it had none); the model is not changed."""
        if self._statistics is None or self._validated_epoch != trainer.current_epoch:
            self._release()
            self._statistics = EpochStatistics(pl_module, self.statistics_arguments)
            _lightning.run_validation(trainer, listener=self)
            self.metrics["before"] = self._metric(trainer)
        statistics, self._statistics = self._statistics, None
        stats = statistics.finish(trainer)
        self._sample_batch = statistics.first_batch
        self.macs["before"] = self._count_macs(pl_module)
        self._plan = plan_factorization(
            pl_module, stats, threshold=self.threshold, method=self.method, ranks=self.ranks,
            param_budget=self.param_budget, target_modules=self.target_modules, exclude_modules=self.exclude_modules,
        )  # fmt: skip
        self.result = self._plan.result
        self._factorization = self.result.to_dict()
        self.phase = Phase.PLANNED
        if not self._plan.layers:
            reasons = "; ".join(f"{n}: {r}" for n, r in list(self.result.not_replaced.items())[:5])
            rank_zero_warn(f"RankCompression replaced no layer, so the model stays dense and trains on ({reasons}).")
            self._plan, self.phase = None, Phase.FINISHED

    def _swap(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._plan.apply_(pl_module)
        self._plan, self.phase = None, Phase.COMPRESSED
        _lightning.rebuild_training_state(trainer)
        self.macs["after"] = self._count_macs(pl_module)
        _lightning.run_validation(trainer)
        self.metrics["compressed"] = self._metric(trainer)
        rank_zero_info(
            f"RankCompression: {len(self.result.layers)} layers replaced, parameters {self.result.params_before:,} -> "
            f"{self.result.params_after:,}; {self.monitor} {self.metrics['before']:.4g} -> "
            f"{self.metrics['compressed']:.4g}; fine-tuning {trainer.max_epochs - trainer.current_epoch} epochs."
        )

    def _count_macs(self, pl_module: LightningModule) -> float | None:
        """Multiply-adds per example of one forward over a counted validation batch (None if it cannot run)."""
        batch = self._sample_batch
        if batch is None:
            return None
        training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                (self.forward or default_forward)(pl_module, batch)
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
        if self._disabled:
            return
        if self.phase in (Phase.TRAINING, Phase.PLANNED):
            self._plan, self.phase = None, Phase.TRAINING
            rank_zero_warn(
                f"RankCompression: training stopped at epoch {trainer.current_epoch}, before the swap planned at epoch "
                f"{self._swap_epoch}, so nothing was compressed."
            )
            return
        self.phase = Phase.FINISHED
        folder = reports_dir(trainer)  # a collective under DDP: on every process
        if trainer.is_global_zero:
            self._publish(trainer, folder)

    def _publish(self, trainer: Trainer, folder: Any) -> None:
        summary = self.summary()
        write_json_atomic(folder / "compression.json", summary)
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
        if self._factorization is None:
            raise RuntimeError("RankCompression has not planned a compression yet")
        factorization = self._factorization
        return {
            "params_before": factorization["params_before"],
            "params_after": factorization["params_after"],
            "macs_before": self.macs["before"],
            "macs_after": self.macs["after"],
            "layers": factorization["layers"],
            "metrics": dict(self.metrics),
            "monitor": self.monitor,
            **{k: v for k, v in factorization.items() if k not in ("params_before", "params_after", "layers")},
        }

    def _markdown(self) -> str:
        metrics = ", ".join(f"{stage} {'n/a' if v is None or math.isnan(v) else f'{v:.4g}'}" for stage, v in self.metrics.items())
        lines = [f"**{self.monitor}**: {metrics}", "", "| layer | rank |", "|---|---:|"]
        lines += [f"| {name} | {rank} |" for name, rank in self._factorization["layers"].items()]
        return "\n".join(lines) + "\n"

    # -- checkpoints and clean-up ------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.dense_checkpoints and self.compressed:
            checkpoint["state_dict"] = _dense_state_dict(pl_module, checkpoint["state_dict"])

    @override
    def state_dict(self) -> dict[str, Any]:
        done = self.phase in (Phase.COMPRESSED, Phase.FINISHED)
        return {
            "phase": self.phase.value,
            "swap_epoch": self._swap_epoch,
            "metrics": dict(self.metrics),
            "macs": dict(self.macs),
            "factorization": self._factorization if done else None,  # a plan is made again on resume
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "phase" in state_dict:
            phase = Phase(state_dict["phase"])
        else:  # written before phases: {"compressed", "planned_epochs", "metrics", "macs", "factorization"}
            phase = Phase.COMPRESSED if state_dict.get("compressed") else Phase.TRAINING
        self.phase = Phase.TRAINING if phase == Phase.PLANNED else phase  # the plan's modules are not saved
        self.metrics.update(state_dict["metrics"])
        self.macs.update(state_dict["macs"])
        self._factorization = state_dict["factorization"] if self.phase != Phase.TRAINING else None

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unwrap()  # also when fit failed before it started
        self._release()

    def _unwrap(self) -> None:
        if self._unwrap_load_hook is not None:
            self._unwrap_load_hook()
            self._unwrap_load_hook = None

    def _release(self) -> None:
        if self._statistics is not None:
            self._statistics.release()
            self._statistics = None


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
