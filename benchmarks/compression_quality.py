"""Quality of ``factorize_`` at equal parameter counts, before any fine-tuning: projection vs whiten vs svd.

Two models trained here on scikit-learn's bundled digits (8x8 images, 10 classes; no download): an
MLP 64-256-256-10 and a small ViT (``benchmarks/vit.py``: 2x2 patches, 16 tokens, dim 64, 2 blocks).
Statistics are collected on the training split; each method then keeps the same fraction
(``param_budget``) of the factorizable layers' parameters, shared out by uniform tolerance (``allocation="uniform"``,
so that only the method differs). Reported on the test split: accuracy
(torchmetrics), the relative error of the logits ``||f'(x) - f(x)||^2 / ||f(x)||^2``, and the mean over
layers of the relative output error ``factorize_`` reports from the statistics (each layer on the
dense model's inputs). Expected order: whiten better than projection, both far better than svd.

Run: .venv/bin/python benchmarks/compression_quality.py
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning_rank as lr  # noqa: E402
from benchmarks.vit import ViT  # noqa: E402

BUDGETS = (0.5, 0.25, 0.1)
METHODS = ("whiten", "projection", "svd")


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, stratify=y, random_state=0)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


class Images(nn.Module):
    """Flat 64-pixel digits as 1 x 8 x 8 images."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.view(-1, 1, 8, 8))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr_: float) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    logits = model.eval()(x)
    accuracy = MulticlassAccuracy(num_classes=10, average="micro")(logits, y)
    logit_error = (logits - reference).square().sum() / reference.square().sum()
    return float(accuracy), float(logit_error)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x_train, y_train, x_test, y_test = digits()
    models = {
        "MLP 64-256-256-10": lambda: nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        ),
        "ViT dim 64, 2 blocks": lambda: Images(ViT(dim=64, depth=2, heads=4, image=8, patch=2, channels=1, classes=10)),
    }
    epochs = {"MLP 64-256-256-10": (40, 1e-3), "ViT dim 64, 2 blocks": (60, 2e-3)}
    print("| model | budget | method | layer params kept | test acc. | logits rel. err. | mean layer rel. err. |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for label, build in models.items():
        start = time.perf_counter()
        torch.manual_seed(0)
        model = train(build(), x_train, y_train, *epochs[label])
        with torch.no_grad():
            reference = model(x_test)
        accuracy, _ = evaluate(model, x_test, y_test, reference)
        print(f"| {label} | 1.00 | dense | 100.0% | {accuracy:.4f} | 0 | 0 |")
        stats = lr.collect(model, x_train.split(256))
        for budget in BUDGETS:
            for method in METHODS:
                compressed = copy.deepcopy(model)
                result = lr.factorize_(compressed, stats, method=method, param_budget=budget, allocation="uniform")
                accuracy, logit_error = evaluate(compressed, x_test, y_test, reference)
                errors = [d.relative_error for d in result.details.values() if d.replaced]
                kept = result.layer_params_after / result.layer_params_before
                print(
                    f"| {label} | {budget:.2f} | {method} | {100 * kept:.1f}% | {accuracy:.4f} | {logit_error:.4f} | "
                    f"{sum(errors) / max(len(errors), 1):.4f} |"
                )
        print(f"<!-- {label}: {time.perf_counter() - start:.1f} s including training -->")


if __name__ == "__main__":
    main()
