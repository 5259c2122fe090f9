"""Shared pieces of the examples: scikit-learn's bundled digits as a DataModule, and a small vision transformer.

The digits (1797 grayscale 8x8 images, 10 classes) ship with scikit-learn, so nothing is downloaded.
``DigitsViT`` cuts an image into 16 patches of 2x2 pixels and runs a few pre-norm transformer blocks
with separate ``q``/``k``/``v`` layers, as ViT does; 30 epochs (about half a minute on one CPU core) reach
96-97% validation accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_rank as lr


class DigitsDataModule(L.LightningDataModule):
    """The digits as ``(images, labels)`` batches of shape ``(B, 1, 8, 8)``, standardized with the training split's
    mean and std. The train/val split is stratified and fixed by ``seed``, so every run validates on the same images."""

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.25, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_digits(return_X_y=True)
        x_train, x_val, y_train, y_val = train_test_split(
            images, labels, test_size=self.val_fraction, stratify=labels, random_state=self.seed
        )
        mean, std = x_train.mean(), x_train.std()

        def as_dataset(x, y) -> TensorDataset:
            x = torch.tensor((x - mean) / std, dtype=torch.float32).view(-1, 1, 8, 8)
            return TensorDataset(x, torch.tensor(y))

        self.train_set, self.val_set = as_dataset(x_train, y_train), as_dataset(x_val, y_val)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=0)


class Block(nn.Module):
    """Pre-norm transformer block: attention with separate q/k/v projections, then a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.norm1(x)  # q, k and v see the very same tensor: lightning_rank counts it once for all three
        q, k, v = (layer(h).view(b, t, self.heads, -1).transpose(1, 2) for layer in (self.q, self.k, self.v))
        attention = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsViT(L.LightningModule):
    """A small ViT for 8x8 digits: 2x2 patches (16 tokens) embedded by a Conv2d, ``depth`` blocks, a mean-pooled head.

    Trained with AdamW, a warm-up and a cosine decay over the first ``dense_epochs`` epochs (all of
    ``max_epochs`` when None; ``RankCompression(compress_at_epoch=dense_epochs)`` swaps right after them). When
    ``RankCompression`` has swapped in low-rank layers, it calls ``configure_optimizers`` again: the model then
    fine-tunes with a cosine decay from ``finetune_lr`` over the remaining steps, gentle enough to keep the
    factors close to the trained weights; with ``RankCompression(distill=w)`` it fine-tunes towards the dense
    model's predictions (``lr.distillation_loss``), a no-op before the swap and without ``distill``.
    """

    def __init__(
        self,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        lr: float = 3e-3,
        finetune_lr: float = 5e-4,
        weight_decay: float = 0.05,
        dense_epochs: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Conv2d(1, dim, kernel_size=2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2) + self.pos  # (B, 16, dim)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        # after a swap by RankCompression(distill=w): mixed with KL(dense teacher || model); otherwise the loss itself
        loss = lr.distillation_loss(self, batch, logits, F.cross_entropy(logits, labels))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val_loss", F.cross_entropy(logits, labels), prog_bar=True)
        self.val_acc(logits, labels)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        hp, trainer = self.hparams, self.trainer
        if is_factorized(self):  # RankCompression swapped layers in: fine-tune over the remaining steps
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.finetune_lr, weight_decay=hp.weight_decay)
            steps = int(trainer.estimated_stepping_batches) - trainer.global_step
            schedule = warmup_cosine(steps, warmup=0)
        else:  # anneal by the end of the dense epochs
            dense_epochs = hp.dense_epochs or trainer.max_epochs
            steps = int(trainer.estimated_stepping_batches) * dense_epochs // trainer.max_epochs
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
            schedule = warmup_cosine(steps, warmup=steps // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(steps - warmup, 1))))

    return factor


def is_factorized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` has been replaced by a low-rank one."""
    return any(isinstance(m, (lr.LowRankLinear, lr.LowRankConv2d)) for m in model.modules())


@torch.inference_mode()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) over ``loader``."""
    metric = MulticlassAccuracy(num_classes=10, average="micro")
    model.eval()
    for images, labels in loader:
        metric.update(model(images), labels)
    return float(metric.compute())
