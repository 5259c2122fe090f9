"""One ``strategy="ddp"`` run of a lightning_rank callback on CPU, for tests/test_ddp.py.

Lightning's DDP launcher re-executes this script (same arguments, ``LOCAL_RANK`` set) for every
process but the first, so it must be a file run as ``python run_ddp.py MODE OUT_DIR``. Each process
writes what it saw to ``OUT_DIR`` as JSON; the test compares them with a one-process reference.

- ``monitor``: fit one epoch with ``RankMonitor``; each rank gets a different subspace of the data.
- ``compression``: fit with ``RankCompression`` (compress after epoch 0, fine-tune one epoch).

Also, in every process, whether the process group was still alive when the interpreter began to exit
(``exit_rank{R}.json``), and on rank 0 the exit codes of the other processes (``exit_codes.json``).
"""

from __future__ import annotations

import atexit
import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_rank as lr

# -- RankMonitor: each rank sees its own subspace ----------------------------------------------
MONITOR_SAMPLES = 32


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


def split_subspaces(n: int = MONITOR_SAMPLES) -> TensorDataset:
    """Even samples span features 0-2, odd ones features 3-5 plus the marker 7: the interleaving
    DistributedSampler gives each rank one subspace, so one rank alone never sees rank 7."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 8)
    x[0::2, 0:3] = torch.randn(n // 2, 3, generator=g)
    x[1::2, 3:6] = torch.randn(n // 2, 3, generator=g)
    x[1::2, 7] = 1.0
    return TensorDataset(x)


class DumpReport(Callback):
    """After each validation: this rank's report, and on rank 0 the weights it was computed with."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_validation_end(self, trainer, pl_module) -> None:
        (monitor,) = [c for c in trainer.callbacks if isinstance(c, lr.RankMonitor)]
        (self.out / f"report_rank{trainer.global_rank}.json").write_text(json.dumps(monitor.report.to_dict()))
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), self.out / "weights.pt")


# -- RankCompression ---------------------------------------------------------------------------
DIM, HIDDEN, CLASSES, SUBSPACE = 32, 64, 4, 3


def compression() -> lr.RankCompression:
    """The one place these DDP runs build RankCompression: one dense epoch, the swap, one fine-tuning epoch."""
    return lr.RankCompression(compress_at_epoch=1, monitor="val_acc")


def low_rank_dataset(n: int, seed: int) -> TensorDataset:
    """Inputs in a 3-dim subspace of R^32; the class is a linear function of the subspace coordinates."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(SUBSPACE, DIM, generator=torch.Generator().manual_seed(0))
    z = torch.randn(n, SUBSPACE, generator=g)
    labels = (z @ torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.5, 1.0, -1.0, 0.2], [0.0, 0.3, 1.0, -1.0]])).argmax(1)
    return TensorDataset(z @ basis, labels)


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
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
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class ParameterCheck(Callback):
    """On every process at the end of training: whether all ranks hold the same parameters, and the structure."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        (callback,) = [c for c in trainer.callbacks if isinstance(c, lr.RankCompression)]
        result = {
            "equal": bool((gathered == gathered[0]).all()),
            "numel": flat.numel(),
            "epoch": trainer.current_epoch,
            "types": {name: type(module).__name__ for name, module in pl_module.net.named_children()},
            "ranks": callback.result.layers,
            "metrics": callback.metrics,
        }
        (self.out / f"params_rank{trainer.global_rank}.json").write_text(json.dumps(result))


# -- every process -----------------------------------------------------------------------------
class ExitProbe(Callback):
    """Records, when this process starts to exit, whether the process group is still alive.

    Registered in the first ``setup`` of the run, so its ``atexit`` handler runs after any the
    callbacks registered later (``atexit`` runs handlers last-in, first-out).
    """

    def __init__(self, out: Path) -> None:
        self.out = out

    def setup(self, trainer, pl_module, stage) -> None:
        path = self.out / f"exit_rank{trainer.global_rank}.json"
        atexit.register(lambda: path.write_text(json.dumps({"initialized": torch.distributed.is_initialized()})))


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    # A short collective timeout turns a disagreement between the processes into an error, not a hang.
    strategy = DDPStrategy(timeout=timedelta(seconds=60), find_unused_parameters=mode == "monitor")
    options = dict(accelerator="cpu", devices=2, strategy=strategy, default_root_dir=out, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   num_sanity_val_steps=0)
    if mode == "monitor":
        model = Branchy()
        trainer = L.Trainer(max_epochs=1, callbacks=[ExitProbe(out), lr.RankMonitor(dtype=torch.float64),
                                                     DumpReport(out)], **options)
        loader = DataLoader(split_subspaces(), batch_size=4)
        trainer.fit(model, loader, loader)
    elif mode == "compression":
        model = Classifier()
        trainer = L.Trainer(max_epochs=2, callbacks=[ExitProbe(out), compression(), ParameterCheck(out)], **options)
        trainer.fit(model, DataLoader(low_rank_dataset(256, 1), batch_size=32, shuffle=True),
                    DataLoader(low_rank_dataset(128, 2), batch_size=32))
    else:
        raise SystemExit(f"unknown mode {mode!r}: use 'monitor' or 'compression'")
    if trainer.global_rank == 0:  # the launcher does not wait for the processes it started
        codes = [proc.wait(timeout=120) for proc in getattr(trainer.strategy.launcher, "procs", [])]
        (out / "exit_codes.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
