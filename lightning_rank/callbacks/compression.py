"""``RankCompression``: compress the model to its utilized rank inside ``max_epochs``, then fine-tune it.

Timeline inside ``trainer.fit`` with ``max_epochs=E`` and ``compress_at_epoch=c`` (an epoch index, or a
fraction ``f`` of ``E`` giving ``c = int(f * E)``, as ``StochasticWeightAveraging`` counts):

1. epochs ``0 .. c - 1`` train the dense model; the validation of epoch ``c - 1`` counts the layer
   inputs and gives the metric "before";
2. when epoch ``c - 1`` ends, each layer's statistics are summed over processes to one process, which
   decomposes it for ``plan_factorization`` (:mod:`~lightning_rank.callbacks.steps`); it decides the ranks and
   builds the low-rank layers (phase ``PLANNED``); the dense layers stay in place for that epoch's checkpoints;
3. when epoch ``c`` starts, the plan is applied (phase ``COMPRESSED``), DDP is set up again around the
   new parameters, the optimizers and schedulers are rebuilt from ``configure_optimizers``, and a
   validation gives "compressed";
4. epochs ``c .. E - 1`` fine-tune; the last validation gives "finetuned". ``trainer.max_epochs`` is
   never changed, so ``trainer.estimated_stepping_batches`` counts the whole run.

Checkpoints written after the swap hold the factorized structure (and, under the key ``"lightning_rank"``,
its layers and how to load it); resuming from one, or ``trainer.validate/test/predict(ckpt_path=...)`` with
this callback in the Trainer, rebuilds it before Lightning loads the weights. At the swap every
``ModelCheckpoint`` starts its ranking again and every ``EarlyStopping`` its patience: the compressed model
competes only with compressed models (the dense model's checkpoints stay on disk, untracked). When training
ends, a ``ModelCheckpoint`` that saved nothing since the swap saves the final model, so ``best_model_path``
(and ``last.ckpt``) hold the compressed model. A plan is not saved: resuming from a checkpoint of a dense
epoch at or after ``c - 1`` counts the inputs and plans again before the swap.

Progressive compression (``compress_at_epoch=[c1, c2, ...]`` with ``param_budget=[b1, b2, ...]`` or
``macs_budget``) repeats 1-4 at each ``c_k``: the validation before it counts the partly compressed model, the
plan treats each low-rank pair as the dense layer ``A B`` it stands for and replaces it by a pair of lower rank
at the same name (:mod:`~lightning_rank.compress.refactor`), and every budget is a fraction of the original
dense layers. ``compression.json`` gains ``steps``, one entry per step; checkpoints of any step resume.
With ``distill``, a frozen copy of the model from before the first swap is kept for
:func:`~lightning_rank.distillation_loss` (:mod:`~lightning_rank.callbacks.distillation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_rank.callbacks import _lightning
from lightning_rank.callbacks.base import (
    ValidationStatisticsCallback,
    check_validation_batches,
    check_validation_data,
    reports_dir,
)
from lightning_rank.callbacks.checkpoints import (
    describe_factorized,
    rebuild_before_load,
    restart_checkpointing,
    save_compressed,
)
from lightning_rank.callbacks.distillation import frozen_copy
from lightning_rank.callbacks.schedule import Phase, ScheduleState
from lightning_rank.callbacks.sharded import is_sharded, mesh_of, shard_swapped_layers
from lightning_rank.callbacks.steps import check_sharded, counting, plan_step
from lightning_rank.callbacks.summary import count_macs, monitored_value, publish, publish_epoch_start
from lightning_rank.checks import (
    MaskFn,
    StatisticsArguments,
    check_allocation,
    check_bool,
    check_distillation,
    check_forward,
    check_method,
    check_monitor,
    check_rank_choice,
    check_schedule,
    check_threshold,
    resolve_compress_at_epoch,
)
from lightning_rank.compress.factorize import FactorizationPlan, check_factorization
from lightning_rank.stats.collect import ForwardFn
from lightning_rank.targets import ModuleSelector


@dataclass
class _Run:
    """What one ``fit`` keeps and a checkpoint does not."""

    disabled: bool = False  # fast_dev_run
    plan: FactorizationPlan | None = None
    sample_batch: Any = None  # a counted validation batch, to count multiply-adds
    validated_epoch: int = -1
    unwrap_load_hook: Callable[[], None] | None = None


class RankCompression(ScheduleState, ValidationStatisticsCallback):
    r"""Compress the model to its utilized rank at ``compress_at_epoch``, then fine-tune it, within ``max_epochs``.

    Statistics come from the validation of epoch ``compress_at_epoch - 1``; the plan made from them is
    applied when epoch ``compress_at_epoch`` starts, and the remaining epochs fine-tune with optimizers and
    schedulers rebuilt from ``configure_optimizers`` (called again, ``compressed`` now True; a schedule of
    ``trainer.estimated_stepping_batches - trainer.global_step`` steps ends exactly at ``max_epochs``); if
    training stops before the swap, nothing is compressed. The metric ``monitor`` "before" the swap, right
    after it ("compressed") and after fine-tuning ("finetuned"), the parameter and multiply-add counts and the
    ranks go to every logger, ``.result``/``.metrics`` and ``<trainer.log_dir>/rank_reports/compression.json``.
    What can be checked is checked in ``setup``.

    Args:
        compress_at_epoch: the epoch whose start swaps the layers in: an epoch index in ``[1, max_epochs - 1]``,
            or a float in (0, 1), the fraction of ``max_epochs`` trained dense (``int(f * max_epochs)``).
            A list of increasing epochs, with a list of decreasing budgets, compresses in steps: each plans again
            from fresh statistics of the partly compressed model (a low-rank pair from its product, to a lower rank).
        threshold: energy threshold of the utilized ranks (used when neither ``ranks`` nor ``param_budget`` is).
        param_budget: fraction in (0, 1] of the replaceable layers' parameters to keep (of the original dense ones,
            at every step of a schedule).
        macs_budget: fraction in (0, 1] of the replaceable layers' multiply-adds per example to keep (CNNs: halving
            parameters can leave compute almost unchanged).
        allocation: how a budget is shared out (see :func:`~lightning_rank.plan_factorization`): ``"auto"`` lets
            the model's own output on the first validation batches decide (under DDP, those of every process,
            summed), or ``"probe"``, ``"uniform"``.
        method: ``"whiten"`` (least output error on the data), ``"projection"`` (the paper's ``P_T W P_S``) or ``"svd"``.
        monitor: the validation metric reported before, right after, and after fine-tuning.
        ranks: explicit ranks, one int or ``{name or regex: rank}``.
        target_modules, exclude_modules: the layers that may be replaced and those left dense (None: every
            supported layer / none; a regex, a list of names, or a callable ``(module, name) -> bool``).
        mask_fn, dtype, dataloader_idx, seed: how layer inputs are counted, as in :class:`~lightning_rank.RankMonitor`.
        max_rows_per_batch: the row policy: None (default: every row, exact statistics for the factors),
            ``"auto"`` or an int, as in :class:`~lightning_rank.RankMonitor`.
        dense_checkpoints: write checkpoints after the swap with dense layers (the original structure, loadable
            by the original model; resuming from them continues with dense layers).
        forward: ``forward(model, batch)`` used to count multiply-adds on one validation batch and to run the
            teacher (default: as in :func:`~lightning_rank.collect`).
        distill, temperature: keep a frozen copy of the model from before the first swap (the teacher), for
            :func:`~lightning_rank.distillation_loss` to mix in with weight ``distill`` in (0, 1] at ``temperature``.

    Example:
        >>> import lightning_rank as lr
        >>> compression = lr.RankCompression(compress_at_epoch=10, param_budget=0.5, monitor="val_acc")
        >>> compression.compress_at_epoch, compression.param_budget, compression.method, compression.allocation
        (10, 0.5, 'whiten', 'auto')

        In ``Trainer(max_epochs=12, callbacks=[compression]).fit(model)`` it swaps after 10 dense epochs and 2
        fine-tune. Every argument is checked when the callback is made:

        >>> lr.RankCompression(param_budget=1.5)
        Traceback (most recent call last):
        ...
        ValueError: `param_budget` must be a fraction in (0, 1] of the replaceable layers' parameters to keep, got 1.5
    """

    def __init__(
        self,
        compress_at_epoch: int | float | list[int] | list[float] = 0.8,
        threshold: float = 0.99,
        param_budget: float | list[float] | None = None,
        macs_budget: float | list[float] | None = None,
        allocation: str = "auto",
        method: str = "whiten",
        monitor: str = "val_loss",
        ranks: int | dict[str, int] | None = None,
        target_modules: ModuleSelector = None,
        exclude_modules: ModuleSelector = None,
        mask_fn: MaskFn | None = None,
        max_rows_per_batch: int | str | None = None,
        dtype: torch.dtype = torch.float32,
        dataloader_idx: int | None = None,
        dense_checkpoints: bool = False,
        forward: ForwardFn | None = None,
        seed: int = 0,
        distill: float | None = None,
        temperature: float = 1.0,
    ) -> None:
        epochs, self.budgets = check_schedule(compress_at_epoch, param_budget, macs_budget)
        self.compress_at_epoch = epochs if len(epochs) > 1 else epochs[0]
        self.threshold = check_threshold(threshold)
        self.ranks = check_rank_choice(ranks, *self.budgets[0])[0]
        self.param_budget, self.macs_budget = _given(self.budgets, 0), _given(self.budgets, 1)
        self.distill, self.temperature = check_distillation(distill, temperature)
        self.allocation = check_allocation(allocation)
        self.method = check_method(method)
        self.monitor = check_monitor(monitor)
        self.statistics_arguments = StatisticsArguments(
            target_modules, exclude_modules, mask_fn, max_rows_per_batch, dtype, seed, dataloader_idx
        )
        self.dense_checkpoints = check_bool(dense_checkpoints, "dense_checkpoints")
        self.forward = check_forward(forward)

        self._init_schedule()
        self.teacher: torch.nn.Module | None = None  # the dense model before the first swap, with `distill`
        self._run = _Run()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING.value:  # trainer.validate/test/predict(model, ckpt_path=<after the swap>)
            self._run = _Run(unwrap_load_hook=rebuild_before_load(trainer, pl_module))
            return
        _lightning.destroy_process_group_at_exit()
        self._run = _Run(disabled=bool(trainer.fast_dev_run))
        if self._run.disabled:
            rank_zero_info("RankCompression: `fast_dev_run` is on, so nothing is compressed.")
            return
        _lightning.check_strategy(trainer, "RankCompression")
        needs = f"RankCompression needs validation data: the statistics and the metric {self.monitor!r} come from"
        check_validation_data(trainer, pl_module, needs)
        built = not is_overridden("configure_model", pl_module)  # else its layers exist only in on_fit_start
        self.swap_epochs = _checked_swap_epochs(self, trainer, pl_module if built else None)
        self._run.unwrap_load_hook = rebuild_before_load(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._run.disabled:
            return
        if is_overridden("configure_model", pl_module):
            self.swap_epochs = _checked_swap_epochs(self, trainer, pl_module)  # its layers exist only now
        if isinstance(self.teacher, dict):  # restored from a checkpoint: the dense weights, for a dense copy
            self.teacher = frozen_copy(pl_module, self.teacher)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unwrap()  # the checkpoint, if any, is loaded (under FSDP2 after on_fit_start)
        if self._run.disabled:
            return
        if self.phase == Phase.FINISHED and self.compressed:
            self.phase = Phase.COMPRESSED  # a new fit from a finished run fine-tunes further
        check_validation_batches(trainer, "RankCompression", self.dataloader_idx)

    # -- counting over the validation before the swap ----------------------------------------
    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        upcoming = self._next_swap()
        counts = self._fit_validation(trainer) and upcoming is not None and self._statistics is None
        if counts and trainer.current_epoch == upcoming - 1:
            self._statistics = counting(trainer, pl_module, self.statistics_arguments)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._fit_validation(trainer):
            return
        self._run.validated_epoch = trainer.current_epoch
        if self.phase in (Phase.TRAINING, Phase.COMPRESSED):
            self.metrics["before" if self.phase == Phase.TRAINING else "finetuned"] = monitored_value(trainer, self.monitor)

    def _fit_validation(self, trainer: Trainer) -> bool:
        return not (self._run.disabled or trainer.sanity_checking) and trainer.state.fn == TrainerFn.FITTING

    # -- plan, then swap ---------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch, upcoming = trainer.current_epoch, self._next_swap()
        if upcoming is not None and epoch == upcoming - 1:
            self._make_plan(trainer, pl_module)
        elif self.phase == Phase.COMPRESSED and epoch == trainer.max_epochs - 1 and self._run.validated_epoch != epoch:
            _lightning.run_validation(trainer)  # the last epoch did not validate: "finetuned" needs one
            self.metrics["finetuned"] = monitored_value(trainer, self.monitor)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._run.disabled:
            return
        upcoming = self._next_swap()
        if upcoming is not None and trainer.current_epoch >= upcoming:
            self._make_plan(trainer, pl_module)  # resumed at or past a swap from a checkpoint before it
        swapped = self.phase == Phase.PLANNED
        if swapped:
            self._swap(trainer, pl_module)
        publish_epoch_start(trainer, self.summary() if self.compressed else None, swapped)

    def _make_plan(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Plan the factorization from this epoch's validation (run one if it had none); the model is not changed."""
        if self._statistics is None or self._run.validated_epoch != trainer.current_epoch:
            self._release()
            self._statistics = counting(trainer, pl_module, self.statistics_arguments)
            _lightning.run_validation(trainer, listener=self)
            self.metrics["before" if self.phase == Phase.TRAINING else "finetuned"] = monitored_value(trainer, self.monitor)
        statistics, self._statistics = self._statistics, None
        shared = statistics.finish(trainer)
        self._run.sample_batch = statistics.batches[0] if statistics.batches else None
        macs_before, later = count_macs(pl_module, self._run.sample_batch, self.forward), self.step > 0
        state = "stays dense" if not later else f"stays as compressed by step {self.step}"
        which = f" step {self.step + 1}" if len(self.swap_epochs) > 1 else ""
        try:
            plan = plan_step(self, trainer, pl_module, shared, statistics.batches)
        except Exception as error:  # a plan that fails never loses the run: it trains on as it is
            self.failure, self.phase = f"{type(error).__name__}: {error}", Phase.COMPRESSED if later else Phase.FINISHED
            rank_zero_warn(f"RankCompression could not plan the compression{which}, so the model {state} and trains "
                           f"on. The cause: {self.failure}")
            return
        if not plan.layers:
            reasons = "; ".join(f"{n}: {r}" for n, r in list(plan.result.not_replaced.items())[:5])
            rank_zero_warn(f"RankCompression{which} replaced no layer, so the model {state} and trains on ({reasons}).")
            self.step, self.result = self.step + later, plan.result if not later else self.result
            self.phase = Phase.COMPRESSED if later else Phase.FINISHED
            return
        if later:
            self._archive_step()
        self.macs = {"before": macs_before, "after": None}
        self._run.plan, self.result, self.phase = plan, plan.result, Phase.PLANNED

    def _swap(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.distill and self.teacher is None:
            self.teacher = frozen_copy(pl_module)
        mesh = mesh_of(pl_module) if is_sharded(pl_module) else None
        self._run.plan.apply_(pl_module)
        if mesh is not None:
            shard_swapped_layers(pl_module, self._run.plan.replaced, mesh)
        self._run.plan, self.phase, self.step = None, Phase.COMPRESSED, self.step + 1
        _lightning.rebuild_training_state(trainer)
        self.macs["after"] = count_macs(pl_module, self._run.sample_batch, self.forward)
        _lightning.run_validation(trainer)
        self.metrics["compressed"] = monitored_value(trainer, self.monitor)
        result, before, after = self.result, self.metrics["before"], self.metrics["compressed"]
        rank_zero_info(f"RankCompression step {self.step}: {len(result.layers)} layers replaced, parameters {result.params_before:,} -> "
                       f"{result.params_after:,}; {self.monitor} {before:.4g} -> {after:.4g}; fine-tuning begins.")
        restart_checkpointing(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._run.disabled and self.phase == Phase.COMPRESSED:
            save_compressed(trainer)  # runs before the checkpoint callbacks: Lightning puts them last

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release()
        if self._run.disabled:
            return
        if self.phase == Phase.PLANNED:
            self._unplan()
        if self.phase == Phase.TRAINING:
            rank_zero_warn(f"RankCompression: training stopped at epoch {trainer.current_epoch}, before the swap "
                           f"planned at epoch {self.swap_epoch}, so nothing was compressed.")
            return
        if self._next_swap() is not None:
            rank_zero_warn(f"RankCompression: training stopped at epoch {trainer.current_epoch}, after {self.step} of "
                           f"{len(self.swap_epochs)} compression steps; the later steps were not made.")
        self.phase = Phase.FINISHED
        folder = reports_dir(trainer)  # a collective under DDP: on every process
        if trainer.is_global_zero:
            publish(trainer, folder, self.summary())

    # -- checkpoints and clean-up ------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        describe_factorized(pl_module, checkpoint, dense=self.dense_checkpoints)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unwrap()  # also when fit failed before it started
        self._release()

    def _unwrap(self) -> None:
        unwrap, self._run.unwrap_load_hook = self._run.unwrap_load_hook, None
        if unwrap is not None:
            unwrap()


def _given(budgets: list[tuple[float | None, float | None]], index: int) -> float | list[float] | None:
    """One kind of budget as the user gave it: one number for one step, a list for a schedule."""
    values = [budget[index] for budget in budgets]
    return values[0] if len(values) == 1 or values[0] is None else values


def _checked_swap_epochs(
    compression: RankCompression, trainer: Trainer, pl_module: LightningModule | None
) -> list[int]:
    """The epochs whose starts swap each step in, once what needs ``max_epochs`` or the model's layers (when given)
    is checked: a ``MisconfigurationException`` naming the argument otherwise."""
    schedule = compression.compress_at_epoch
    try:
        epochs = [resolve_compress_at_epoch(e, trainer.max_epochs) for e in (
            schedule if isinstance(schedule, list) else [schedule])]
        if any(later <= earlier for earlier, later in zip(epochs, epochs[1:])):
            raise ValueError(f"`compress_at_epoch`={schedule} swaps at epochs {epochs} with max_epochs="
                             f"{trainer.max_epochs}: each step needs an epoch of its own, in increasing order")
        if pl_module is not None and is_sharded(pl_module):
            check_sharded(compression)
        if pl_module is not None and compression.phase == Phase.TRAINING:
            check_factorization(pl_module, ranks=compression.ranks, param_budget=compression.budgets[-1][0],
                                target_modules=compression.target_modules, exclude_modules=compression.exclude_modules,
                                refactorize=True)
    except ValueError as err:
        raise MisconfigurationException(f"RankCompression: {err}") from err
    return epochs
