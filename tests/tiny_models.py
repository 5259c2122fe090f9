"""Small models, data and a callback shared by the tests and by the DDP script they launch
(tests/ddp_scripts/run_ddp.py)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import TensorDataset

import lightning_rank as lr

DIM, HIDDEN, CLASSES, SUBSPACE = 32, 64, 4, 3


def low_rank_dataset(n: int, seed: int) -> TensorDataset:
    """Inputs in a 3-dim subspace of R^32; the class is a linear function of the subspace coordinates."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(SUBSPACE, DIM, generator=torch.Generator().manual_seed(0))
    z = torch.randn(n, SUBSPACE, generator=g)
    labels = (z @ torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.5, 1.0, -1.0, 0.2], [0.0, 0.3, 1.0, -1.0]])).argmax(1)
    return TensorDataset(z @ basis, labels)


class Classifier(L.LightningModule):
    """A 3-layer MLP on :func:`low_rank_dataset`, logging ``val_loss`` and ``val_acc``; SGD at ``lr_``."""

    def __init__(self, lr_: float = 0.05) -> None:
        super().__init__()
        self.lr_ = lr_
        self.net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                                 nn.Linear(HIDDEN, CLASSES))
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr_, momentum=0.9)


def split_subspaces(n: int = 32) -> TensorDataset:
    """Even samples span features 0-2, odd ones features 3-5 plus the marker 7: the interleaving
    DistributedSampler gives each rank one subspace, so one rank alone never sees rank 7."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 8)
    x[0::2, 0:3] = torch.randn(n // 2, 3, generator=g)
    x[1::2, 3:6] = torch.randn(n // 2, 3, generator=g)
    x[1::2, 7] = 1.0
    return TensorDataset(x)


class Branchy(L.LightningModule):
    """``extra`` runs only on samples marked by their last feature: under DDP, only on rank 1."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.extra, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        marked = x[:, -1] > 0
        if marked.any():
            h = h.clone()
            h[marked] = h[marked] + self.extra(h[marked])
        return self.out(h)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(batch[0]).square().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ParameterCheck(Callback):
    """On every process at the end of training, written to ``<out>/params_rank{R}.json``: whether all ranks hold the
    same parameters, the layer types of ``pl_module.net``, the compression's ranks and metrics, and how many DDP
    wrappers are still alive."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        (compression,) = [c for c in trainer.callbacks if isinstance(c, lr.RankCompression)]
        result = {
            "equal": bool((gathered == gathered[0]).all()),
            "numel": flat.numel(),
            "epoch": trainer.current_epoch,
            "types": {name: type(module).__name__ for name, module in pl_module.net.named_children()},
            "ranks": compression.result.layers,
            "metrics": compression.metrics,
            # collectable ones too: a wrapper left for exit is still an object
            "ddp_wrappers": sum(type(o).__name__ == "DistributedDataParallel" for o in gc.get_objects()),
        }
        (self.out / f"params_rank{trainer.global_rank}.json").write_text(json.dumps(result))
