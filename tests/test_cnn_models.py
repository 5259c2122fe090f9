"""A ResNet-style CNN with BatchNorm, as users have them: each residual block's first 3x3 conv and its 1x1
strided shortcut read the very same feature map. Monitored in a real fit and compared with an independent
reference, then factorized, checkpointed and reloaded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_rank as lr
from tests.helpers import assert_same_report, reference
from tests.tiny_models import CrossEntropySteps, make_trainer


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet(CrossEntropySteps):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(ResidualBlock(8, 16, 2), ResidualBlock(16, 32, 2))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def digits(start: int, stop: int) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits (no download), scaled to [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images[start:stop], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    return TensorDataset(x, torch.tensor(labels[start:stop]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs of fit with an exact float64 RankMonitor and a ModelCheckpoint (its last.ckpt is reloaded)."""
    torch.manual_seed(0)
    model = ResNet()
    val = DataLoader(digits(300, 400), batch_size=25)
    monitor = lr.RankMonitor(max_rows_per_batch=None, dtype=torch.float64)
    root = tmp_path_factory.mktemp("resnet")
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = make_trainer(root, 2, [monitor, checkpoint], logger=False, num_sanity_val_steps=2)
    trainer.fit(model, DataLoader(digits(0, 300), batch_size=25, shuffle=True), val)
    return model.eval(), monitor, val, root


def test_monitor_on_a_resnet_matches_an_independent_reference(trained):
    model, monitor, val, root = trained
    expected = reference(model, [val], max_rows_per_batch=None, dtype=torch.float64)
    assert_same_report(monitor.report.to_dict(), expected)
    layers = monitor.report.layers
    assert not monitor.report.skipped
    for i, cin in enumerate((8, 16)):  # the shortcut and conv1 read one tensor: each has its own patches
        assert layers[f"blocks.{i}.conv1"].in_features == cin * 9
        assert layers[f"blocks.{i}.shortcut.0"].in_features == cin
        assert layers[f"blocks.{i}.shortcut.0"].rows == layers[f"blocks.{i}.conv1"].rows  # same stride: positions

    checkpoint = torch.load(root / "ckpt" / "last.ckpt", weights_only=False)
    (state,) = [state for key, state in checkpoint["callbacks"].items() if key.startswith("RankMonitor")]
    assert [entry["epoch"] for entry in state["history"]] == [0, 1]
    assert state["history"][-1]["report"] == monitor.report.to_dict()
    restored = ResNet.load_from_checkpoint(root / "ckpt" / "last.ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([restored(x) for x, _ in val]), torch.cat([model(x) for x, _ in val]))


def compressed_copy(model: ResNet, stats: lr.ActivationStatistics, **kwargs) -> ResNet:
    copy = ResNet()
    copy.load_state_dict(model.state_dict())
    lr.factorize_(copy.eval(), stats, param_budget=0.6, **kwargs)
    return copy


def outputs(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x) for x in batches])


def test_factorized_resnet_orders_the_methods_keeps_its_layers_and_reloads(trained, tmp_path):
    """At 60% of the parameters (BatchNorm after every conv rescales each layer's error): whiten errs less than
    projection, projection less than svd, and the calibrated default far less than whiten alone."""
    model, _, val, _ = trained
    batches = [x for x, _ in val]
    stats = lr.collect(model, batches, max_rows_per_batch=None)
    dense = outputs(model, batches)

    def error(compressed: nn.Module) -> float:
        return float((outputs(compressed, batches) - dense).square().sum() / dense.square().sum())

    methods = ("whiten", "projection", "svd")  # under one allocation rule, so only the method differs
    errors = {method: error(compressed_copy(model, stats, method=method, allocation="uniform")) for method in methods}
    compressed = compressed_copy(model, stats, method="whiten", calibration=batches[:2])
    assert error(compressed) < errors["whiten"] / 3 < errors["projection"] / 3 < errors["svd"] / 3
    assert any(isinstance(m, lr.LowRankConv2d) for m in compressed.modules())

    before = lr.analyze(model, stats)
    after = lr.analyze(compressed, lr.collect(compressed, batches, max_rows_per_batch=None))
    assert after.layers.keys() == before.layers.keys()  # factorized layers stay one layer, under their names
    assert all(after.layers[n].in_features == before.layers[n].in_features for n in before.layers)

    path = tmp_path / "compressed.pt"
    torch.save(compressed.state_dict(), path)
    restored = lr.load_factorized(ResNet(), path).eval()
    torch.testing.assert_close(outputs(restored, batches), outputs(compressed, batches))
