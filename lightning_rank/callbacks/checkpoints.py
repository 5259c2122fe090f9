"""What ``RankCompression`` does with checkpoints: the user's ``ModelCheckpoint`` and ``EarlyStopping`` callbacks,
what it writes into a checkpoint of a factorized model, and rebuilding that structure before one loads.

After the swap the dense model is no longer what is trained, so it must not stay the "best" checkpoint:
every ``ModelCheckpoint`` ranks compressed models only, every ``EarlyStopping`` counts its patience from
the swap, and when training ends a ``ModelCheckpoint`` that saved nothing since the swap saves the final
(compressed) model through its own naming, top-k and ``save_last`` logic.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lightning_rank.callbacks import _lightning
from lightning_rank.callbacks.sharded import full_weights, mesh_of, shard_swapped_layers
from lightning_rank.compress.loading import (
    CHECKPOINT_KEY,
    LOAD_HINT,
    dense_state_dict,
    factorized_layers,
    factorized_modules,
    install_factorized,
    rebuild_factorized_,
)
from lightning_rank.targets import select_targets


def restart_checkpointing(trainer: Trainer) -> None:
    """At the swap: every ``ModelCheckpoint`` starts its ranking again (the dense model's checkpoints stay on
    disk, untracked) and every ``EarlyStopping`` its patience."""
    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping):
            _lightning.restart_early_stopping(callback)
    for checkpoint in trainer.checkpoint_callbacks:
        if not isinstance(checkpoint, ModelCheckpoint):
            continue
        dense_best = _lightning.restart_ranking(checkpoint)
        if dense_best:
            rank_zero_info(f"RankCompression: ModelCheckpoint(monitor={checkpoint.monitor!r}) now ranks the compressed "
                           f"model only; the dense model's best checkpoint stays at {dense_best}.")


def save_compressed(trainer: Trainer) -> None:
    """When training ends: see that every ``ModelCheckpoint`` holds the compressed model, saving it now where
    one saved nothing since the swap."""
    for checkpoint in trainer.checkpoint_callbacks:
        if isinstance(checkpoint, ModelCheckpoint):
            _save_compressed(trainer, checkpoint)


def _save_compressed(trainer: Trainer, checkpoint: ModelCheckpoint) -> None:
    if checkpoint.save_top_k == 0:
        if not checkpoint.save_last:
            rank_zero_info("RankCompression: ModelCheckpoint(save_top_k=0, save_last=False) writes no checkpoint, so "
                           "the compressed model is in none; save it with `trainer.save_checkpoint(path)`.")
        return  # with save_last, its own `on_train_end` writes last.ckpt, which holds the compressed model
    if checkpoint.best_model_path:
        return  # its ranking restarted at the swap: whatever it holds now is compressed
    if _lightning.save_checkpoint_now(checkpoint, trainer):
        rank_zero_info(f"RankCompression: saved the compressed model to {checkpoint.best_model_path}, since "
                       f"ModelCheckpoint(monitor={checkpoint.monitor!r}) had saved nothing since the swap.")


def describe_factorized(pl_module: LightningModule, checkpoint: dict[str, Any], dense: bool) -> None:
    """For a checkpoint of a model holding low-rank layers: with ``dense``, its weights as the dense layers (the
    original structure); else a note, for whoever opens the file, of which layers are low-rank and how to load it."""
    layers = factorized_layers(pl_module)
    if dense and layers:
        checkpoint["state_dict"] = dense_state_dict(pl_module, checkpoint["state_dict"])
    elif layers:
        checkpoint[CHECKPOINT_KEY] = {"factorized_layers": layers, "how_to_load": LOAD_HINT}


def rebuild_before_load(trainer: Trainer, pl_module: LightningModule) -> Callable[[], None]:
    """Rebuild the low-rank layers a checkpoint holds in ``pl_module`` right before Lightning loads its weights (under
    FSDP2: before the strategy loads it); returns the function that stops doing so."""
    unwraps = [rebuild_before_weights_load(pl_module)]
    if isinstance(trainer.strategy, _lightning.ModelParallelStrategy or ()):
        unwraps.append(rebuild_before_sharded_load(trainer, pl_module))

    def unwrap() -> None:
        for undo in reversed(unwraps):
            undo()

    return unwrap


def rebuild_before_weights_load(pl_module: LightningModule) -> Callable[[], None]:
    """Rebuild the low-rank layers a checkpoint holds in ``pl_module`` right before Lightning loads its weights;
    returns the function that stops doing so."""

    def rebuild(checkpoint: dict[str, Any]) -> None:  # a distributed checkpoint's weights are loaded already
        if "state_dict" in checkpoint and rebuild_factorized_(pl_module, checkpoint["state_dict"]):
            rank_zero_info("RankCompression: rebuilt the factorized layers of the checkpoint before loading it.")

    return _lightning.before_weights_load(pl_module, rebuild)


def rebuild_before_sharded_load(trainer: Trainer, pl_module: LightningModule) -> Callable[[], None]:
    """Under FSDP2, rebuild the low-rank layers a checkpoint holds in ``pl_module`` (sharded like the swap shards
    them) and the optimizers right before the strategy loads it; returns the function that stops doing so.

    A distributed checkpoint is loaded in place into the model and optimizers the strategy already built, so the
    structure must be there first. The factors' shapes come from the checkpoint's metadata, without reading it.
    """

    def rebuild(path: Path) -> None:
        shapes, (targets, _) = checkpoint_shapes(path), select_targets(pl_module)
        names = [key[: -len(".first.weight")] for key in shapes if key.endswith(".first.weight")]
        names = [name for name in names if name in targets and f"{name}.second.weight" in shapes]
        modules = {}
        for name in names:  # placeholders made like the full dense weights, one layer gathered at a time
            with full_weights(pl_module, [name], keep=[name]):
                factors = (f"{name}.first.weight", f"{name}.second.weight")
                modules.update(factorized_modules(pl_module, {key: shapes[key] for key in factors}))
        if not modules:
            return
        replaced, mesh = {name: pl_module.get_submodule(name) for name in modules}, mesh_of(pl_module)
        install_factorized(pl_module, modules)
        shard_swapped_layers(pl_module, replaced, mesh)
        if trainer.state.fn == TrainerFn.FITTING:  # the optimizers load from the checkpoint next
            _lightning.rebuild_training_state(trainer)
        rank_zero_info("RankCompression: rebuilt the factorized layers of the checkpoint before loading it.")

    return _lightning.before_strategy_load(trainer.strategy, rebuild)


def checkpoint_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors in the checkpoint at ``path`` (a distributed checkpoint's folder, or a file) as empty
    tensors of their shapes on the meta device, by name; nothing is read but the metadata."""
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(path).read_metadata().state_dict_metadata
        return {key[len("state_dict."):]: torch.empty(tuple(entry.size), device="meta")
                for key, entry in metadata.items() if key.startswith("state_dict.") and hasattr(entry, "size")}
    # Lightning's own load reads the whole file next; here it is mapped, on the meta device
    state = torch.load(path, map_location="meta", weights_only=False, mmap=True).get("state_dict", {})
    return {key: torch.empty(value.shape, device="meta") for key, value in state.items()}
