"""A ResNet-18-shaped CNN built from torch modules, and seeded image data of the sizes users train it on.

Stem 4x4 convolution of stride 4, four stages of two basic blocks (two 3x3 convolutions with BatchNorm, a 1x1
strided shortcut where the shape changes) at widths 64-128-256-512, global average pooling and a linear head.
The images are synthetic but learnable: each class is a fixed random pattern plus noise, so the layers' spectra
are shaped by training as on real data. Validation is 1/5 of the training set.
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.tiny_models import BasicBlock


class ImageClassifier(L.LightningModule):
    """Cross-entropy training (``train_loss``) and validation (``val_loss``) of an image classifier, AdamW at ``lr``."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self(images), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ResNet18Shaped(ImageClassifier):
    """ResNet-18's stages and widths behind a 4x4/4 stem, for 10 classes."""

    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.lr = lr
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 4, 4, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        widths, blocks, inputs = (64, 128, 256, 512), [], 64
        for i, width in enumerate(widths):
            blocks += [BasicBlock(inputs, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
            inputs = width
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(images)).mean(dim=(2, 3)))



def image_data(size: int, train: int, batch: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders of ``train`` and ``train // 5`` seeded ``3 x size x size`` images, 10 classes."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 3, size, size, generator=g)
    count = train + train // 5
    labels = torch.randint(0, 10, (count,), generator=g)
    images = patterns[labels] + 2.0 * torch.randn(count, 3, size, size, generator=g)
    fit = TensorDataset(images[:train], labels[:train])
    val = TensorDataset(images[train:], labels[train:])
    return DataLoader(fit, batch_size=batch, shuffle=True, generator=g), DataLoader(val, batch_size=batch)


def fit_seconds(monitor: L.Callback | None, size: int, train: int, epochs: int, root: str
                ) -> tuple[tuple[float, float], ResNet18Shaped, DataLoader]:
    """Wall and CPU seconds of one seeded ``fit`` (a validation every epoch, no logger), the model and its validation
    loader."""
    torch.manual_seed(0)
    model = ResNet18Shaped()
    fit, val = image_data(size, train)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=root, logger=False,
                        enable_checkpointing=False, callbacks=[monitor] if monitor else [],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, fit, val)
    return (time.perf_counter() - start, time.process_time() - cpu), model, val
