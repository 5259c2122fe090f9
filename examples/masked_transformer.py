"""Padded token batches: count only the real tokens with ``mask_fn``.

A small transformer classifies synthetic sequences of 4 to 24 tokens (label: whether most tokens come
from the lower half of the vocabulary). Batches are padded to their longest sequence and come as dicts
with an ``attention_mask``. Without a mask the padding positions would be counted as inputs of every
token-level layer and distort its subspace; ``mask_fn=lambda batch: batch["attention_mask"].bool()`` keeps
only the real tokens, so each layer's counted ``rows`` equal the number of real tokens in the validation set.

Run::

    .venv/bin/python examples/masked_transformer.py
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy

import lightning_rank as lr

warnings.filterwarnings("ignore", ".*does not have many workers.*")

VOCAB, PAD, MAX_LEN = 32, 0, 24


def sequences(n: int, seed: int) -> list[dict[str, Tensor]]:
    """``n`` sequences of random length over tokens ``1..VOCAB-1``; label 1 when most are below ``VOCAB / 2``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in torch.randint(4, MAX_LEN + 1, (n,), generator=g).tolist():
        tokens = torch.randint(1, VOCAB, (length,), generator=g)
        out.append({"input_ids": tokens, "label": (tokens < VOCAB // 2).float().mean().gt(0.5).long()})
    return out


def pad_batch(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Pad to the longest sequence of the batch: ``input_ids`` and ``attention_mask`` of shape ``(B, T)``."""
    lengths = torch.tensor([len(item["input_ids"]) for item in items])
    input_ids = torch.full((len(items), int(lengths.max())), PAD)
    for row, item in enumerate(items):
        input_ids[row, : len(item["input_ids"])] = item["input_ids"]
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.stack([i["label"] for i in items])}


class Block(nn.Module):
    """Pre-norm block; padded keys get no attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (layer(h).view(b, t, self.heads, -1).transpose(1, 2) for layer in (self.q, self.k, self.v))
        attention = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SequenceClassifier(L.LightningModule):
    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 1, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokens = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.positions = nn.Parameter(torch.randn(MAX_LEN, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, 2)
        self.val_acc = BinaryAccuracy()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        keep = attention_mask.bool()
        x = self.tokens(input_ids) + self.positions[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x, keep)
        pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)  # mean over the real tokens
        return self.head(pooled)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.log("val_loss", F.cross_entropy(logits, batch["labels"]), prog_bar=True)
        self.val_acc(logits.argmax(-1), batch["labels"])
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--root", type=Path, default=Path("runs/masked_transformer"),
                        help="where the reports are written (<root>/rank_reports/epoch_*.json)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    L.seed_everything(0)
    train = DataLoader(sequences(args.train_size, seed=1), batch_size=32, shuffle=True, collate_fn=pad_batch)
    val = DataLoader(sequences(500, seed=2), batch_size=64, collate_fn=pad_batch)
    monitor = lr.RankMonitor(
        mask_fn=lambda batch: batch["attention_mask"].bool(),
        exclude_modules=["head"],  # its input is pooled, one row per sequence: a (B, T) mask does not apply
        max_rows_per_batch=None,  # count every real token, to show the mask at work (the default samples rows)
    )
    model = SequenceClassifier()
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", default_root_dir=args.root, logger=False,
                        callbacks=[monitor], enable_checkpointing=False)
    trainer.fit(model, train, val)

    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in val)
    padded_positions = sum(batch["attention_mask"].numel() for batch in val)
    rows = {name: layer.rows for name, layer in monitor.report.analyzed.items()}
    print(monitor.report.to_markdown())
    print(f"val_acc {float(trainer.callback_metrics['val_acc']):.2%}")
    print(f"validation set: {real_tokens:,} real tokens in {padded_positions:,} padded positions; rows counted per "
          f"layer: {sorted(set(rows.values()))}")

    # The same statistics without the mask count the padding too, and see a different subspace.
    unmasked = lr.analyze(model, lr.collect(model, val, forward=lambda m, b: m(b["input_ids"], b["attention_mask"]),
                                            exclude_modules=["head"], max_rows_per_batch=None))
    print(f"MLU with the mask {monitor.report.mlu:.1%}, counting padding too {unmasked.mlu:.1%}")
    return {
        "report": monitor.report,
        "unmasked": unmasked,
        "rows": rows,
        "real_tokens": real_tokens,
        "padded_positions": padded_positions,
        "val_acc": float(trainer.callback_metrics["val_acc"]),
    }


if __name__ == "__main__":
    main()
