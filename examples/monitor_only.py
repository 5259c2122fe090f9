"""Watch how much of its space each layer uses while a model trains: ``lr.RankMonitor`` alone.

After each analyzed validation epoch the monitor holds the report (``monitor.report``), keeps its history,
puts ``rank/mlu`` into ``trainer.callback_metrics`` (so ``ModelCheckpoint`` or ``EarlyStopping`` can use it),
logs scalars and TensorBoard views, and writes ``<log_dir>/rank_reports/epoch_{E:03d}.json``.

Run::

    .venv/bin/python examples/monitor_only.py --epochs 10
    .venv/bin/tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_rank as lr
from digits import DigitsDataModule, DigitsViT

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def main(argv: list[str] | None = None) -> lr.RankMonitor:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--every-n-epochs", type=int, default=2)
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--root", type=Path, default=Path("runs"), help="TensorBoard log folder")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    L.seed_everything(0)
    monitor = lr.RankMonitor(threshold=0.99, every_n_epochs=args.every_n_epochs)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(args.root, name="monitor_only"),
        callbacks=[monitor],
        limit_train_batches=args.limit_train_batches,
        enable_checkpointing=False,
    )
    trainer.fit(DigitsViT(), DigitsDataModule())

    print("\n" + monitor.report.to_markdown())
    print("MLU per analyzed epoch: " + ", ".join(f"epoch {h['epoch']}: {h['report']['mlu']:.1%}" for h in monitor.history))
    print(f"JSON reports: {Path(trainer.log_dir) / 'rank_reports'}")
    return monitor


if __name__ == "__main__":
    main()
