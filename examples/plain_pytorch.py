"""The functional API with no Trainer: ``collect`` -> ``analyze`` -> ``factorize_`` -> ``load_factorized``.

A plain PyTorch loop trains an MLP on the digits; then the inputs of its layers are counted over the
training data, the utilized ranks are reported, the layers are factorized in place to those ranks
(``method="whiten"``: the least output error on the counted data), and the outputs and accuracy of the
dense and compressed models are compared. Finally the compressed weights are saved and loaded into a
fresh dense MLP with ``load_factorized``.

Run::

    .venv/bin/python examples/plain_pytorch.py
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import lightning_rank as lr


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat 64-pixel digits scaled to [0, 1]: train and validation splits."""
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x / 16.0, y, test_size=0.25, stratify=y, random_state=0)
    as_float = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_float(x_train), torch.tensor(y_train), as_float(x_val), torch.tensor(y_val)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(MulticlassAccuracy(num_classes=10, average="micro")(model.eval()(x), y))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threshold", type=float, default=0.99, help="energy threshold of the utilized ranks")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    torch.manual_seed(0)
    x_train, y_train, x_val, y_val = digits()
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x_train)).split(64):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    # Count every layer's inputs over the training data (batches as (x, y): the model gets x).
    batches = list(zip(x_train.split(256), y_train.split(256)))
    stats = lr.collect(model, batches)
    report = lr.analyze(model, stats, threshold=args.threshold)
    print(report.to_markdown())

    compressed = copy.deepcopy(model)
    result = lr.factorize_(compressed, stats, threshold=args.threshold, method="whiten")
    print(result.to_markdown())

    with torch.no_grad():
        dense_logits, compressed_logits = model.eval()(x_val), compressed.eval()(x_val)
    logit_error = float((compressed_logits - dense_logits).square().sum() / dense_logits.square().sum())
    dense_accuracy, compressed_accuracy = accuracy(model, x_val, y_val), accuracy(compressed, x_val, y_val)
    print(f"parameters {result.params_before:,} -> {result.params_after:,}; val accuracy {dense_accuracy:.2%} -> "
          f"{compressed_accuracy:.2%}; relative logit error {logit_error:.2e}")

    # A saved factorized state dict does not fit a dense MLP; load_factorized rebuilds the low-rank layers first.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "compressed.pt"
        torch.save(compressed.state_dict(), path)
        restored = lr.load_factorized(mlp(), path)
    with torch.no_grad():
        same = torch.equal(restored.eval()(x_val), compressed_logits)
    print(f"reloaded with load_factorized: {type(restored[0]).__name__} of rank {restored[0].rank}, "
          f"identical outputs: {same}")
    return {
        "report": report,
        "result": result,
        "dense_accuracy": dense_accuracy,
        "compressed_accuracy": compressed_accuracy,
        "logit_error": logit_error,
        "restored_identical": same,
    }


if __name__ == "__main__":
    main()
