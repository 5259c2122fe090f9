"""Every use of Lightning internals (names starting with ``_`` or undocumented hooks), in one place.

Each function says which public behaviour it stands in for, so an upgrade of Lightning has one module
to check. Tested with lightning 2.2 to 2.6 (pinned ``<2.7`` in ``pyproject.toml``).
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, ProgressBar
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:  # lightning >= 2.4
    from lightning.pytorch.strategies import ModelParallelStrategy
except ImportError:
    ModelParallelStrategy = None

SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)
FSDP2 = ("`ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)` with `fully_shard` on the layers in "
         "`configure_model` (FSDP2)")


def check_strategy(trainer: Trainer, who: str) -> None:
    """Reject strategies the callbacks cannot follow: ``FSDPStrategy`` (FSDP1), tensor parallelism, and any but
    single-device, DDP and FSDP2 (``ModelParallelStrategy`` with tensor parallel size 1), naming what is supported.

    Reads ``ModelParallelStrategy._tensor_parallel_size`` (no public getter; resolved from "auto" before setup).
    """
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        raise MisconfigurationException(
            f"{who} does not support FSDPStrategy (FSDP1, whose flat parameters hide each layer's weight). For sharded "
            f"training use {FSDP2}."
        )
    if ModelParallelStrategy is not None and isinstance(strategy, ModelParallelStrategy):
        tensor_parallel = strategy._tensor_parallel_size
        tensor_parallel = strategy.num_processes if tensor_parallel == "auto" else tensor_parallel
        if tensor_parallel != 1:
            raise MisconfigurationException(
                f"{who} supports ModelParallelStrategy with tensor_parallel_size=1 only (FSDP2: each process holds "
                f"whole layers' inputs), got tensor_parallel_size={tensor_parallel}. Use {FSDP2}."
            )
        return
    if not isinstance(strategy, SUPPORTED_STRATEGIES):
        raise MisconfigurationException(
            f"{who} supports single-device training, DDP (`strategy='ddp'`, `'ddp_spawn'`) and {FSDP2}, not "
            f"{type(strategy).__name__}."
        )


def has_validation_dataloader(trainer: Trainer) -> bool:
    """Whether the fit has a validation dataloader (passed to ``fit``, or a ``val_dataloader`` hook).

    Stands in for: ``trainer.val_dataloaders is not None``, which is only set once the loop loaded them.
    """
    return trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined()


def validation_batches(trainer: Trainer) -> list[int | float]:
    """The number of batches of each validation dataloader of the fit, loading the dataloaders if needed.

    Stands in for: ``trainer.num_val_batches``, which Lightning fills only when epoch 0 validates; this
    loads them as ``fit_loop.on_run_start`` does.
    """
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    if trainer.val_dataloaders is None:
        trainer.validating = True
        try:
            val_loop.setup_data()
        finally:
            trainer.training = True
    return list(trainer.num_val_batches)


def run_validation(trainer: Trainer, listener: Callback | None = None) -> None:
    """Run the fit loop's validation now, heard only by progress bars (and ``listener``).

    Stands in for: a validation inside ``fit`` at a time of the callback's choosing (``trainer.validate``
    cannot be called from a hook). Checkpointing, early stopping and monitors do not hear this run, so it
    cannot overwrite a checkpoint of this epoch or count as one more check. Mirrors what
    ``_TrainingEpochLoop`` does around ``val_loop.run()``.
    """
    connector = trainer._logger_connector
    first_loop_iter = connector._first_loop_iter
    callbacks = trainer.callbacks
    trainer.callbacks = [c for c in callbacks if isinstance(c, ProgressBar) or c is listener]
    trainer.validating = True
    try:
        trainer.fit_loop.epoch_loop.val_loop.run()
    finally:
        trainer.callbacks = callbacks
        trainer.training = True
        connector._first_loop_iter = first_loop_iter


def rebuild_training_state(trainer: Trainer) -> None:
    """After layers were swapped: wrap the model in DDP again and rebuild optimizers and schedulers (under FSDP2 the
    new layers are sharded already, by :func:`~lightning_rank.callbacks.sharded.shard_swapped_layers`).

    Stands in for: the part of ``strategy.setup(trainer)`` that runs after ``configure_model``
    (``configure_ddp`` wraps the LightningModule so the new parameters' gradients are synchronized;
    ``setup_optimizers`` calls ``configure_optimizers``; the optimizers' state goes to the device).
    """
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.model.module
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
    _optimizers_to_device(strategy.optimizers, strategy.root_device)


def before_weights_load(pl_module: LightningModule, prepare: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
    """Call ``prepare(checkpoint)`` right before Lightning loads a checkpoint's weights into ``pl_module``.

    Stands in for: a callback hook between ``configure_model`` and the weights load (a callback's
    ``load_state_dict``/``on_load_checkpoint`` runs after it, and ``setup`` does not know ``ckpt_path``).
    The module's ``on_load_checkpoint``, which Lightning calls with the checkpoint just before
    ``load_state_dict``, is wrapped on the instance; returns the function that unwraps it.
    """
    return _call_first(pl_module, "on_load_checkpoint", prepare)


def before_strategy_load(strategy: Any, prepare: Callable[[Path], None]) -> Callable[[], None]:
    """Call ``prepare(path)`` right before ``strategy`` loads the checkpoint at ``path`` into the model and optimizers.

    Stands in for: a hook before ``ModelParallelStrategy.load_checkpoint``, which loads a distributed checkpoint in
    place into the sharded model and the optimizers already built, before any module or callback hook hears of
    it (``restore_checkpoint_after_setup``). ``load_checkpoint`` is wrapped on the instance; returns the function
    that unwraps it.
    """
    return _call_first(strategy, "load_checkpoint", lambda path, *_, **__: prepare(Path(strategy.broadcast(path))))


def _call_first(owner: Any, method: str, before: Callable[..., None]) -> Callable[[], None]:
    """Wrap ``owner.<method>`` on the instance so that ``before`` gets its arguments first; returns the function that
    puts back what the instance had (its own attribute, or none, so the class's method shows again)."""
    own_attribute = vars(owner).get(method)
    original = getattr(owner, method)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        before(*args, **kwargs)
        return original(*args, **kwargs)

    def restore() -> None:
        if own_attribute is None:
            vars(owner).pop(method, None)
        else:
            setattr(owner, method, own_attribute)

    setattr(owner, method, wrapped)
    return restore


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was given to the Trainer compiled, or holds a compiled submodule.

    Stands in for: a public "was this LightningModule compiled" flag; Lightning marks a module it
    unwrapped from ``torch.compile`` with ``_compiler_ctx``.
    """
    if getattr(module, "_compiler_ctx", None) is not None:
        return True
    return any(type(m).__name__ == "OptimizedModule" for m in module.modules())


def restart_ranking(checkpoint: ModelCheckpoint) -> str:
    """Make ``checkpoint`` forget the checkpoints it ranked so far, so the next one it considers is its best.

    Stands in for: a ``ModelCheckpoint`` method that starts its top-k ranking again (here: after the model
    changed structure). Resets the attributes ``__init__`` sets (``best_k_models``, ``best_model_path``,
    ``best_model_score``, ``kth_best_model_path``, ``kth_value``, ``current_score``); ``last_model_path`` is
    kept, so ``last.ckpt`` keeps its name. The files already written stay on disk, untracked (never removed
    by later saves). Returns the best model path it had.
    """
    previous = checkpoint.best_model_path
    checkpoint.best_k_models = {}
    checkpoint.best_model_path = ""
    checkpoint.best_model_score = None
    checkpoint.kth_best_model_path = ""
    checkpoint.kth_value = torch.tensor(torch.inf if checkpoint.mode == "min" else -torch.inf)
    checkpoint.current_score = None
    return previous


def restart_early_stopping(early_stopping: EarlyStopping) -> None:
    """Make ``early_stopping`` forget the best score and the patience used so far.

    Stands in for: an ``EarlyStopping`` method that starts counting again; resets ``best_score`` and
    ``wait_count`` to what ``__init__`` sets.
    """
    early_stopping.wait_count = 0
    early_stopping.best_score = torch.tensor(torch.inf if early_stopping.monitor_op == torch.lt else -torch.inf)


def save_checkpoint_now(checkpoint: ModelCheckpoint, trainer: Trainer) -> bool:
    """Have ``checkpoint`` consider the model now, as it does after a validation: rank it among its top-k
    (saving it if it ranks), then write ``last.ckpt`` with it when ``save_last`` is set. Call on every process.

    Stands in for: a public ``ModelCheckpoint.save(trainer)``; uses what its ``on_validation_end`` calls
    (``_monitor_candidates``, ``_save_topk_checkpoint``, ``_save_last_checkpoint``), so file names, the
    version counter, top-k bookkeeping, ``best_model_path`` and the loggers' ``after_save_checkpoint`` are
    Lightning's own. Returns False, with a warning, when the monitored metric is missing, so nothing is saved.
    """
    candidates = checkpoint._monitor_candidates(trainer)
    if checkpoint.monitor is not None and checkpoint.monitor not in candidates:
        rank_zero_warn(
            f"ModelCheckpoint(monitor={checkpoint.monitor!r}) could not save the final model: the metric is not "
            f"among the logged metrics {sorted(candidates)}. Save it with `trainer.save_checkpoint(path)`."
        )
        return False
    checkpoint._save_topk_checkpoint(trainer, candidates)
    if checkpoint.save_last:
        checkpoint._save_last_checkpoint(trainer, candidates)
    return True


_destroy_at_exit_registered = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when this process exits, while Python is still fully alive.

    Stands in for what Lightning does for NCCL only (``_destroy_dist_connection`` at teardown). With gloo,
    a worker thread of the process group can hold the last reference to a finished collective's tensors;
    if it drops it while the interpreter finalizes, it needs the GIL, Python ends the thread with
    ``pthread_exit``, and the forced unwind through a ``noexcept`` destructor aborts the process
    ("terminate called without an active exception", SIGABRT), so ``ddp_spawn`` raises from ``fit`` after
    training completed. An ``atexit`` handler runs before finalization; destroying the group there joins
    those threads first. Needs an initialized group; registered once per process.
    """
    global _destroy_at_exit_registered
    if not _destroy_at_exit_registered and torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.register(_destroy_dist_connection)
        _destroy_at_exit_registered = True
