"""Compress a model when its planned training ends, fine-tune it, and load the compressed checkpoint back.

With ``Trainer(max_epochs=E + F)`` and ``lr.RankCompression(compress_at_epoch=E)``, one ``trainer.fit`` runs
``E + F`` epochs: the inputs of every layer are counted during the validation of epoch ``E - 1``, the
layers are replaced by low-rank factors keeping ``param_budget`` of their parameters when epoch ``E``
starts, and the last ``F`` epochs fine-tune the smaller model. Checkpoints written after the swap hold the
factors; ``lr.load_factorized`` rebuilds that structure in a fresh model before loading them.

Run::

    .venv/bin/python examples/compress_after_fit.py --epochs 20 --finetune-epochs 3
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_rank as lr
from digits import DigitsDataModule, DigitsViT, accuracy

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs of dense training, before compression")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--param-budget", type=float, default=0.5)
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--root", type=Path, default=Path("runs"), help="TensorBoard log folder")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    L.seed_everything(0)
    data = DigitsDataModule()
    compression = lr.RankCompression(
        param_budget=args.param_budget, method="whiten", compress_at_epoch=args.epochs, monitor="val_acc"
    )
    checkpoints = ModelCheckpoint(save_last=True)
    trainer = L.Trainer(
        max_epochs=args.epochs + args.finetune_epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(args.root, name="compress_after_fit"),
        callbacks=[compression, checkpoints],
        limit_train_batches=args.limit_train_batches,
    )
    trainer.fit(DigitsViT(dense_epochs=args.epochs), data)

    summary = json.loads((Path(trainer.log_dir) / "rank_reports" / "compression.json").read_text())
    print(f"\nparameters {summary['params_before']:,} -> {summary['params_after']:,}, "
          f"multiply-adds per image {summary['macs_before']:,.0f} -> {summary['macs_after']:,.0f}")
    print("val_acc " + ", ".join(f"{stage} {value:.2%}" for stage, value in summary["metrics"].items()))

    # A fresh DigitsViT is dense; load_factorized swaps in low-rank layers of the checkpoint's ranks first.
    restored = lr.load_factorized(DigitsViT(), checkpoints.last_model_path)
    restored_accuracy = accuracy(restored, data.val_dataloader())
    print(f"{checkpoints.last_model_path} loaded into a fresh DigitsViT: val_acc {restored_accuracy:.2%}")
    return {"summary": summary, "restored": restored, "restored_accuracy": restored_accuracy}


if __name__ == "__main__":
    main()
