"""Every use of Lightning internals (names starting with ``_`` or undocumented hooks), in one place.

Each function says which public behaviour it stands in for, so an upgrade of Lightning has one module
to check. Tested with lightning 2.2 to 2.6 (pinned ``<2.7`` in ``pyproject.toml``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.parallel import DistributedDataParallel

SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)


def check_strategy(trainer: Trainer, who: str) -> None:
    """Reject strategies whose model wrapping a swap of layers cannot rebuild (sharded, model-parallel, ...).

    Public API only; here because it names what ``rebuild_training_state`` supports.
    """
    if not isinstance(trainer.strategy, SUPPORTED_STRATEGIES):
        raise MisconfigurationException(
            f"{who} supports single-device training and DDP (`strategy='ddp'`, `'ddp_spawn'`), not "
            f"{type(trainer.strategy).__name__}: after the swap the model must be wrapped again around the new "
            "layers, which sharded and model-parallel strategies do not allow."
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
    """After layers were swapped: wrap the model in DDP again and rebuild optimizers and schedulers.

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
    user_hook = pl_module.on_load_checkpoint
    own_attribute = vars(pl_module).get("on_load_checkpoint")

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        prepare(checkpoint)
        user_hook(checkpoint)

    def restore() -> None:
        if own_attribute is None:
            vars(pl_module).pop("on_load_checkpoint", None)
        else:
            pl_module.on_load_checkpoint = own_attribute

    pl_module.on_load_checkpoint = on_load_checkpoint
    return restore


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was given to the Trainer compiled, or holds a compiled submodule.

    Stands in for: a public "was this LightningModule compiled" flag; Lightning marks a module it
    unwrapped from ``torch.compile`` with ``_compiler_ctx``.
    """
    if getattr(module, "_compiler_ctx", None) is not None:
        return True
    return any(type(m).__name__ == "OptimizedModule" for m in module.modules())
