"""Three small models trained here for ``benchmarks/allocation.py``, each with its calibration and test data.

- the digits ViT of ``examples/digits.py`` (2x2 patches, dim 64, 2 blocks) on scikit-learn's digits;
- a CNN on the same digits: three 3x3 convolutions on 8x8, 8x8 and 4x4 maps, then two linear layers, so
  the early convolutions do most of the multiply-adds with few parameters;
- a character-level transformer language model (pre-norm, separate q/k/v, causal attention) trained on the
  documentation shipped with Python (``pydoc_data.topics``), the last 10% of the text held out.

Everything is seeded; training is short enough for two busy CPU cores.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from digits import Block, DigitsDataModule, DigitsViT, warmup_cosine  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


@dataclass
class Task:
    """A trained model with ``calibration`` batches (statistics and probes) and ``test`` batches (judging)."""

    name: str
    model: nn.Module
    calibration: list[Any]
    test: list[Any]
    kind: str  # "classify" (accuracy) or "lm" (perplexity)


def _trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )


def _digits(seed: int) -> DigitsDataModule:
    data = DigitsDataModule(batch_size=32, seed=seed)
    data.setup()
    return data


def _split_batches(data: DigitsDataModule, size: int = 128) -> tuple[list[Any], list[Any]]:
    """Calibration: the first 512 training images; test: the validation split."""
    x, y = data.train_set.tensors
    calibration = [(x[i : i + size], y[i : i + size]) for i in range(0, 512, size)]
    xv, yv = data.val_set.tensors
    return calibration, [(xv[i : i + size], yv[i : i + size]) for i in range(0, len(xv), size)]


def _trained_on_digits(name: str, make: type[L.LightningModule], seed: int, epochs: int) -> Task:
    L.seed_everything(seed, verbose=False)
    data = _digits(seed)
    model = make()  # after the data, as the seeded runs always did
    _trainer(epochs).fit(model, data)
    calibration, test = _split_batches(data)
    return Task(name, model.eval(), calibration, test, "classify")


def digits_vit(seed: int = 0, epochs: int = 20) -> Task:
    return _trained_on_digits("digits ViT", DigitsViT, seed, epochs)


class DigitsCNN(L.LightningModule):
    """conv 1->32 (8x8), conv 32->64 (8x8), pool, conv 64->64 (4x4), pool, linear 256->128, linear 128->10."""

    def __init__(self, width: int = 32, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.fc1 = nn.Linear(2 * w * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, steps // 10))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def digits_cnn(seed: int = 0, epochs: int = 12) -> Task:
    return _trained_on_digits("digits CNN", DigitsCNN, seed, epochs)


def python_docs() -> str:
    """Python's own documentation topics (about 465k characters), in a fixed order."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n".join(topics[key] for key in sorted(topics))


class CausalBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (layer(h).view(b, t, self.heads, -1).transpose(1, 2) for layer in (self.q, self.k, self.v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CharLM(L.LightningModule):
    """A small GPT over characters: embedding, ``depth`` causal blocks, a final norm and an (untied) head."""

    def __init__(self, vocab: int, dim: int = 96, depth: int = 3, heads: int = 4, context: int = 64,
                 lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.Sequential(*(CausalBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, steps // 10))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _windows(ids: Tensor, context: int, stride: int) -> tuple[Tensor, Tensor]:
    starts = torch.arange(0, len(ids) - context - 1, stride)
    index = starts[:, None] + torch.arange(context + 1)
    chunk = ids[index]
    return chunk[:, :-1], chunk[:, 1:]


def char_windows(context: int) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """Windows of ``context`` characters of Python's docs: training inputs and targets (90% of the text, overlapping
    by half), test inputs and targets (the rest), and the vocabulary."""
    text = python_docs()
    chars = sorted(set(text))
    ids = _encode(text, chars)
    split = int(0.9 * len(ids))
    train_x, train_y = _windows(ids[:split], context, stride=context // 2)
    test_x, test_y = _windows(ids[split:], context, stride=context)
    return train_x, train_y, test_x, test_y, chars


def char_lm(seed: int = 0, steps: int = 600, dim: int = 96, depth: int = 3, context: int = 64) -> Task:
    L.seed_everything(seed, verbose=False)
    train_x, train_y, test_x, test_y, chars = char_windows(context)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train_x), generator=g)
    batch = 32
    held = pick[-256:]  # training text the model does not step on, for statistics and probes
    train = pick[:-256][: steps * batch]
    train_set = TensorDataset(train_x[train], train_y[train])
    model = CharLM(len(chars), dim=dim, depth=depth, context=context)
    trainer = _trainer(1)
    trainer.fit(model, DataLoader(train_set, batch_size=batch, shuffle=False))
    calibration = [(train_x[held[i : i + 64]], train_y[held[i : i + 64]]) for i in range(0, 256, 64)]
    test = [(test_x[i : i + 128], test_y[i : i + 128]) for i in range(0, min(len(test_x), 640), 128)]
    return Task("char LM (pydoc)", model.eval(), calibration, test, "lm")


def _encode(text: str, chars: list[str]) -> Tensor:
    table = {c: i for i, c in enumerate(chars)}
    return torch.tensor([table[c] for c in text], dtype=torch.long)


# -- cost at realistic width ---------------------------------------------------------------------
class WideEncoder(nn.Module):
    """ViT-B/16-shaped blocks with random weights (``dim`` 768, 12 heads, MLP 4x, 197 tokens by default) over
    random token inputs, mean-pooled into a 1000-way head: only for timing the allocation at realistic width."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, classes: int = 1000) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(dim, heads, 4) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def wide_batches(dim: int, batches: int, size: int = 8, tokens: int = 197, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, tokens, dim, generator=g) for _ in range(batches)]


# -- judging --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(task: Task, model: nn.Module, reference: list[Tensor] | None = None) -> dict[str, float]:
    """Relative squared error of the logits vs ``reference`` (the dense logits), and accuracy or perplexity."""
    model.eval()
    error_num = error_den = 0.0
    correct = total = 0
    nll = 0.0
    logits_all = []
    for i, (x, y) in enumerate(task.test):
        logits = model(x).double()
        logits_all.append(logits)
        if reference is not None:
            error_num += float((logits - reference[i]).square().sum())
            error_den += float(reference[i].square().sum())
        if task.kind == "classify":
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
        else:
            nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            total += y.numel()
    out = {"logits": logits_all}
    out["error"] = error_num / error_den if reference is not None else 0.0
    out["score"] = correct / total if task.kind == "classify" else math.exp(nll / total)
    return out
