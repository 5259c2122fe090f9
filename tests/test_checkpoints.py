"""Checkpoints of compressed models: what ``ModelCheckpoint`` keeps after the swap, and loading them back."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn

import lightning_rank as lr
from tests.test_compression import Classifier, low_rank_dataset, make_trainer


def low_rank_keys(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` holds the factorized structure (and not dense weights)."""
    state = torch.load(path, weights_only=True)["state_dict"]
    if "net.0.first.weight" in state:
        assert "net.0.weight" not in state
        return True
    assert "net.0.weight" in state
    return False


class FrozenAfterSwap(Classifier):
    """Fine-tunes with learning rate 0, and logs ``size``: its parameter count, or minus it for ``mode="min"``.

    The compressed model has fewer parameters and never changes after the swap, so it never beats the dense
    model's best ``size`` in either mode, and every checkpoint of it equals the final model.
    """

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.sign = sign

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("size", self.sign * float(sum(p.numel() for p in self.parameters())))

    def configure_optimizers(self):
        compressed = any(isinstance(m, lr.LowRankLinear) for m in self.modules())
        return torch.optim.SGD(self.parameters(), lr=0.0 if compressed else 0.05)


def assert_loads_as(path: str | Path, model: nn.Module) -> None:
    """``lr.load_factorized(Classifier(), path)`` is low-rank and computes exactly what ``model`` computes."""
    restored = lr.load_factorized(Classifier(), path)
    assert isinstance(restored.net[0], lr.LowRankLinear)
    x = low_rank_dataset(32, 9).tensors[0]
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("save_last", [True, False])
@pytest.mark.parametrize("mode", ["max", "min"])
def test_best_and_last_checkpoints_hold_the_compressed_model(mode: str, save_last: bool, tmp_path: Path) -> None:
    L.seed_everything(0)
    model = FrozenAfterSwap(sign=1.0 if mode == "max" else -1.0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="size", mode=mode, save_top_k=1,
                                 save_last=save_last, filename="{epoch}")
    compression = lr.RankCompression(compress_at_epoch=2, monitor="val_loss")
    trainer = make_trainer(tmp_path, 4, [compression, checkpoint], logger=False)
    trainer.fit(model)
    assert compression.compressed
    dense_best = tmp_path / "ckpt" / "epoch=0.ckpt"  # the dense model's best size: kept, no longer tracked
    assert dense_best.exists() and not low_rank_keys(dense_best)
    assert Path(checkpoint.best_model_path).name == "epoch=2.ckpt"  # the first compressed epoch: best among them
    assert low_rank_keys(checkpoint.best_model_path)
    assert checkpoint.best_model_score == float(model.sign * sum(p.numel() for p in model.parameters()))
    assert_loads_as(checkpoint.best_model_path, model)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0.ckpt", "epoch=2.ckpt"] + (
        ["last.ckpt"] if save_last else []
    )
    if save_last:
        assert low_rank_keys(tmp_path / "ckpt" / "last.ckpt")
        assert_loads_as(tmp_path / "ckpt" / "last.ckpt", model)


def test_a_checkpoint_that_did_not_save_after_the_swap_saves_the_compressed_model_at_the_end(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = FrozenAfterSwap()
    every_other = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="size", mode="max", every_n_epochs=2,
                                  save_last=True, filename="{epoch}")  # saves after epochs 1, 3, ...: never after 2
    trainer = make_trainer(tmp_path, 3, [lr.RankCompression(compress_at_epoch=2), every_other], logger=False)
    trainer.fit(model)
    assert Path(every_other.best_model_path).name == "epoch=3.ckpt"  # its template, with trainer.current_epoch at the end
    assert low_rank_keys(every_other.best_model_path) and low_rank_keys(tmp_path / "ckpt" / "last.ckpt")
    assert_loads_as(every_other.best_model_path, model)
    assert not low_rank_keys(tmp_path / "ckpt" / "epoch=1.ckpt")


class Stops(Callback):
    def __init__(self) -> None:
        self.stopped_at: int | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.stopped_at = trainer.current_epoch


def test_early_stopping_counts_patience_from_the_swap(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = FrozenAfterSwap()
    stopping = EarlyStopping(monitor="size", mode="max", patience=3)  # the compressed size never beats the dense one
    stops = Stops()
    trainer = make_trainer(tmp_path, 8, [lr.RankCompression(compress_at_epoch=2), stopping, stops], logger=False,
                           enable_checkpointing=False)
    trainer.fit(model)
    # epochs 0-1 dense (0 is best: the size never grows), the swap at 2, its best; then 3 epochs of patience: 3, 4, 5
    # (without the restart, patience would have run out after epoch 3)
    assert stopping.stopped_epoch == 5 and stops.stopped_at == 6


def test_a_warning_when_the_compressed_model_cannot_be_saved(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="never_logged", every_n_epochs=10)  # never due
    trainer = make_trainer(tmp_path, 3, [lr.RankCompression(compress_at_epoch=2), checkpoint], logger=False)
    with pytest.warns(UserWarning, match=r"ModelCheckpoint\(monitor='never_logged'\) could not save the final model"):
        trainer.fit(FrozenAfterSwap())
    assert checkpoint.best_model_path == "" and not (tmp_path / "ckpt").exists()
