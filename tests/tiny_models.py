"""Small models, data, callbacks and the one Trainer factory shared by the tests and by the DDP script they launch
(tests/ddp_scripts/run_ddp.py)."""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_rank as lr

DIM, HIDDEN, CLASSES, SUBSPACE = 32, 64, 4, 3


def make_trainer(root: str | Path, max_epochs: int = 1, callbacks: Sequence[Callback] = (), **options) -> L.Trainer:
    """A CPU Trainer writing under ``root``, with no progress bar, model summary or sanity validation, that logs
    every step; ``options`` are further Trainer arguments, or override these (``num_sanity_val_steps=2`` brings
    Lightning's sanity check back)."""
    defaults = dict(accelerator="cpu", default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, log_every_n_steps=1)
    return L.Trainer(max_epochs=max_epochs, callbacks=list(callbacks), **{**defaults, **options})


# -- a classifier on inputs in a 3-dim subspace ---------------------------------------------------------------
class CrossEntropySteps(L.LightningModule):
    """``training_step`` (cross-entropy) and ``validation_step`` (logs ``val_loss``) of an ``(x, y)`` classifier."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def low_rank_dataset(n: int, seed: int) -> TensorDataset:
    """Inputs in a 3-dim subspace of R^32; the class is a linear function of the subspace coordinates."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(SUBSPACE, DIM, generator=torch.Generator().manual_seed(0))
    z = torch.randn(n, SUBSPACE, generator=g)
    labels = (z @ torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.5, 1.0, -1.0, 0.2], [0.0, 0.3, 1.0, -1.0]])).argmax(1)
    return TensorDataset(z @ basis, labels)


class PlainClassifier(L.LightningModule):
    """A 3-layer MLP on :func:`low_rank_dataset`, logging ``val_loss`` and ``val_acc``; SGD at ``lr_``. The caller
    gives the data."""

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


class Classifier(PlainClassifier):
    """:class:`PlainClassifier` with a step schedule and its own dataloaders: 512 training examples (shuffled) and
    256 validation examples, in batches of 64."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 10)}

    def train_dataloader(self):
        return DataLoader(low_rank_dataset(512, 1), batch_size=64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(low_rank_dataset(256, 2), batch_size=64)


# -- two residual blocks on inputs with a decaying spectrum ---------------------------------------------------
class Blocks(L.LightningModule):
    """Two residual MLP blocks and a head: layers blocks.{0,1}.{0,2} and head. Logs ``val_loss`` and ``val_acc``, and
    ``train_loss`` if ``log_train_loss`` (not under ``torch.compile``: Lightning's ``log`` in a compiled training step
    fails); SGD at ``lr``."""

    def __init__(
        self, dim: int = 8, hidden: int = 12, classes: int = 3, lr: float = 0.05, log_train_loss: bool = False
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)) for _ in range(2)
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.hparams.log_train_loss:
            self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


BLOCKS_LAYERS = ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2", "head"]


def blocks_dataset(n: int = 48, dim: int = 8, seed: int = 0) -> TensorDataset:
    """Inputs for :class:`Blocks` with a decaying spectrum, so ranks are below full and move during training."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * torch.logspace(0, -3, dim)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


class BlocksData(L.LightningDataModule):
    """:func:`blocks_dataset` of seed 0 for training, of seed 1 for validation (3 batches of 16 each)."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(blocks_dataset(seed=0), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(blocks_dataset(seed=1), batch_size=self.batch_size)


# -- a layer only one DDP process calls -----------------------------------------------------------------------
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


# -- layers ---------------------------------------------------------------------------------------------------
class Conv1D(nn.Module):
    """Mimics Hugging Face's GPT-2 ``Conv1D``: ``weight (nx, nf)``, ``y = x @ weight + bias``. The weight is drawn
    from N(0, scale^2), the bias too unless ``zero_bias``."""

    def __init__(self, nf: int, nx: int, scale: float = 0.1, zero_bias: bool = False) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * scale)
        self.bias = nn.Parameter(torch.zeros(nf) if zero_bias else torch.randn(nf) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm, and a 1x1 projection on the shortcut when the
    stride or the width changes (torchvision's layout, built from torch modules)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


# -- callbacks that write what each process saw ---------------------------------------------------------------
class DumpReport(Callback):
    """After each validation, on every process: its ``RankMonitor`` report as ``<out>/report_rank{R}.json``, and on
    rank 0 the weights it was computed with, as ``<out>/weights.pt``."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_validation_end(self, trainer, pl_module) -> None:
        (monitor,) = [c for c in trainer.callbacks if isinstance(c, lr.RankMonitor)]
        (self.out / f"report_rank{trainer.global_rank}.json").write_text(json.dumps(monitor.report.to_dict()))
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), self.out / "weights.pt")


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
