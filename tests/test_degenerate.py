"""Never crash, never lie: degenerate statistics, diverged weights and moments the eigensolver cannot take.

Every public function either gives the result an independent float64 reference gives, or raises a clear error
that names the layer: never an exception from inside torch or LAPACK, never a ``KeyError``, never a rank for a
layer that saw no row.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections import OrderedDict

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_rank as lr
from lightning_rank.spectral.analysis import UnanalyzableError
from lightning_rank.spectral.spectrum import symmetric_eigen
from tests.tiny_models import BasicBlock, Conv1D, CrossEntropySteps, PlainClassifier, low_rank_dataset, make_trainer

DEGENERACIES = ("normal", "zero_features", "constant_features", "rank1", "all_zero", "tiny", "huge", "nan_rows",
                "inf_rows", "no_rows")


def reference_rank(moment: torch.Tensor, threshold: float) -> int:
    """The energy rank of a float64 PSD moment from its singular values, which are its eigenvalues (an SVD, not the
    package's eigensolver; 0 for a zero matrix)."""
    values = torch.linalg.svdvals(moment)
    total = float(values.sum())
    if total == 0:
        return 0
    held = values.cumsum(0) / total
    return int((held < threshold * (1 - 1e-12)).sum()) + 1


def make_rows(kind: str, n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """``n`` rows of ``d`` features with the given degeneracy."""
    x = torch.randn(n, d, generator=g) * torch.logspace(0, -3, d)
    if kind == "zero_features":
        x[:, ::2] = 0
    elif kind == "constant_features":
        x[:, : max(1, d // 2)] = 3.0
    elif kind == "rank1":
        x = torch.randn(n, 1, generator=g) * torch.randn(1, d, generator=g)
    elif kind == "all_zero":
        x = torch.zeros(n, d)
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "huge":
        x = x * 1e30
    elif kind == "nan_rows" and n:
        x[::2, 0] = float("nan")
    elif kind == "inf_rows" and n:
        x[1::2, -1] = float("inf")
    elif kind == "no_rows":
        x = x[:0]
    return x


class Net(nn.Module):
    """One layer with a distinctive name, so errors can be checked for naming it."""

    def __init__(self, d: int, out: int, bias: bool, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.Sequential(OrderedDict(probe_fc=nn.Linear(d, out, bias=bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def assert_clear(error: Exception, *words: str) -> None:
    """Raised by the package with a message naming what it needs to: not torch's or LAPACK's, not a KeyError."""
    assert type(error) in (ValueError, UnanalyzableError), repr(error)  # a LinAlgError is a RuntimeError
    assert all(word in str(error) for word in words), str(error)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(DEGENERACIES),
    d=st.integers(1, 40),
    out=st.integers(1, 24),
    rows=st.integers(0, 48),
    batches=st.integers(1, 3),
    bias=st.booleans(),
    centered=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
)
def test_degenerate_statistics_give_the_reference_ranks_or_a_clear_error(
    kind: str, d: int, out: int, rows: int, batches: int, bias: bool, centered: bool, dtype: torch.dtype, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    data = [make_rows(kind, rows, d, g) for _ in range(batches)]
    model = Net(d, out, bias, seed)
    stats = lr.collect(model, data, max_rows_per_batch=None, dtype=dtype)
    kept = torch.cat([x[torch.isfinite(x).all(dim=1)] for x in data]).double()
    lost = dtype == torch.float32 and kind in ("tiny", "huge")  # beyond what float32 sums of them can hold
    held = "layers.probe_fc" in stats and stats["layers.probe_fc"].holds_rows
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = lr.analyze(model, stats, centered=centered, progress=False)
    except ValueError as error:  # only what float32 sums cannot hold
        assert dtype == torch.float32 and kind in ("tiny", "huge"), repr(error)
        assert_clear(error, "layers.probe_fc", "dtype=torch.float64")
        return
    layer = report.layers["layers.probe_fc"]
    if len(kept) == 0:  # no row: skipped with the reason, never a rank
        assert layer.skipped is not None and layer.rank is None and math.isnan(report.mlu)
        with pytest.raises(ValueError) as raised:
            lr.plan_factorization(model, stats, param_budget=0.5, progress=False)
        assert_clear(raised.value, "layers.probe_fc", "no statistics")
        return
    # float32 rows fewer than fan_in are held: their moments are formed from them in float64, for the report and
    # for factorization alike
    assert not lost or held
    moment = kept.t() @ kept / len(kept)
    mean = kept.mean(0)
    weight = model.layers.probe_fc.weight.detach().double()
    b = model.layers.probe_fc.bias.detach().double() if bias else torch.zeros(out, dtype=torch.float64)
    if centered:
        moment = moment - torch.outer(mean, mean)
        out_moment = weight @ moment @ weight.t()
    else:
        y = kept @ weight.t() + b
        out_moment = y.t() @ y / len(kept)
    slack = 0 if dtype == torch.float64 else 1
    said = any("cannot resolve their spectra" in str(w.message) and "layers.probe_fc" in str(w.message) for w in caught)
    for measured, moment_ in ((layer.in_rank, moment), (layer.out_rank, out_moment)):
        expected = reference_rank(moment_, 0.99)
        if said:  # precision, not the data, decided it, and the user was told: round-off removal only lowers it
            assert measured <= expected + slack
        else:
            assert abs(measured - expected) <= slack
    assert layer.rows == len(kept) and layer.skipped is None
    plan = lr.plan_factorization(model, stats, method="whiten", progress=False)  # ranks of the report: no error
    assert set(plan.result.details) == {"layers.probe_fc"}


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_3x3_convolutions_over_1x1_and_2x2_maps_match_the_reference_and_factorize(size: int, dtype) -> None:
    """A 3x3 kernel over a 1x1 map reads its centre tap only: 8 of 9 patch entries are always zero, so the input
    moment is mostly exact zeros (the moment that made LAPACK fail at ResNet-18's 4608 inputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(48, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 32, 3, padding=1)).eval()
    data = [torch.randn(16, 48, size, size) for _ in range(3)]
    stats = lr.collect(model, data, max_rows_per_batch=None, dtype=dtype)
    report = lr.analyze(model, stats, progress=False)
    x = torch.cat(data).double()
    first = F.relu(F.conv2d(x, model[0].weight.double(), model[0].bias.double(), padding=1))
    for name, inputs in (("0", x), ("2", first)):
        patches = F.unfold(inputs, 3, padding=1).transpose(1, 2).reshape(-1, inputs.shape[1] * 9)
        moment = patches.t() @ patches / len(patches)
        expected = reference_rank(moment, 0.99)
        assert abs(report.layers[name].in_rank - expected) <= (0 if dtype == torch.float64 else 1)
    compressed = copy.deepcopy(model)
    result = lr.factorize_(compressed, stats, param_budget=0.5, progress=False)
    assert result.layer_params_after <= 0.5 * result.layer_params_before + 1
    with torch.no_grad():
        dense, low = model(data[0]), compressed(data[0])
    assert float((low - dense).square().sum() / dense.square().sum()) < 0.5


def test_a_moment_lapack_cannot_solve_is_solved_by_the_next_way(monkeypatch) -> None:
    """``symmetric_eigen`` gives the same spectrum when the first solver (and float64's) fails to converge."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64)
    x[:, [3, 7]] = 0
    moment = x.t() @ x
    expected = torch.linalg.eigvalsh(moment)
    real = torch.linalg.eigh

    def failing(matrix, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    values, vectors = symmetric_eigen(moment)
    monkeypatch.setattr(torch.linalg, "eigh", real)
    assert torch.allclose(values, expected, atol=1e-10)
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.t(), moment, atol=1e-9)
    assert torch.allclose(vectors.t() @ vectors, torch.eye(12, dtype=torch.float64), atol=1e-10)
    values_only = symmetric_eigen(moment.float(), vectors=False)
    assert torch.allclose(values_only.double(), expected, atol=1e-3)


@pytest.mark.parametrize("where", ["weight", "bias"])
def test_a_nan_weight_is_an_error_naming_the_layer_and_its_cause(where: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    stats = lr.collect(model, [torch.randn(32, 64)] * 4)
    getattr(model[2], where).data[0] = float("inf") if where == "bias" else float("nan")
    for call in (lambda: lr.analyze(model, stats, progress=False),
                 lambda: lr.factorize_(copy.deepcopy(model), stats, param_budget=0.5, progress=False)):
        with pytest.raises(UnanalyzableError) as raised:
            call()
        assert raised.value.layers == ["2"] and "layer '2'" in str(raised.value) and "diverged" in str(raised.value)


def test_all_nan_inputs_and_empty_batches_are_skipped_with_the_reason_not_a_rank() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    for batches, reason in (([torch.full((32, 64), float("nan"))] * 4, "NaN or Inf"),
                            ([torch.zeros(0, 64)] * 3, "no row of its input was counted")):
        stats = lr.collect(model, batches)
        report = lr.analyze(model, stats, progress=False)
        assert report.analyzed == {} and math.isnan(report.mlu)
        assert all(reason in text for text in report.skipped.values()) and set(report.skipped) == {"0", "2"}
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match="no selected layer can be factorized") as raised:
            lr.factorize_(model, stats, param_budget=0.5, progress=False)
        assert "0: no statistics" in str(raised.value) and reason in str(raised.value)
        assert type(model[0]) is nn.Linear and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        result = lr.factorize_(model, stats, progress=False)  # no budget: nothing replaced, every reason said
        assert result.layers == {} and all(reason in text for text in result.not_replaced.values())


def test_float32_sums_that_overflow_or_underflow_are_an_error_naming_the_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    for scale in (1e-30, 1e30):
        batches = [torch.randn(32, 16) * scale]
        with pytest.raises(ValueError, match=r"layer '0'.*dtype=torch.float64"):
            lr.analyze(model, lr.collect(model, batches), progress=False)
        report = lr.analyze(model, lr.collect(model, batches, dtype=torch.float64), progress=False)
        assert report.layers["0"].in_rank == reference_rank(torch.cat(batches).double().t() @ torch.cat(batches).double(), 0.99)


# -- inside a Trainer: a failure never loses the run ----------------------------------------------------------
class Diverges(Callback):
    """Puts a NaN into the first layer's weight when epoch ``epoch`` ends (a diverged step)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = float("nan")


def loaders(val: torch.Tensor | None = None) -> tuple[DataLoader, DataLoader]:
    train = low_rank_dataset(128, 1)
    val_set = low_rank_dataset(64, 2) if val is None else TensorDataset(val, torch.zeros(len(val), dtype=torch.long))
    return DataLoader(train, batch_size=32), DataLoader(val_set, batch_size=32)


def test_a_diverged_weight_does_not_stop_a_monitored_fit(tmp_path) -> None:
    monitor = lr.RankMonitor(tensorboard=False)
    trainer = make_trainer(tmp_path, 2, [monitor, Diverges(epoch=0)], logger=False)
    with pytest.warns(UserWarning, match=r"RankMonitor analyzed nothing at epoch 1: layer 'net.0': its weight holds NaN"):
        trainer.fit(PlainClassifier(), *loaders())
    assert trainer.current_epoch == 2  # the fit ran to its end
    assert [entry["epoch"] for entry in monitor.history] == [0]  # no report made of the diverged weights


class ForwardOnly(PlainClassifier):
    """Validates by running the forward only (a metric would not take an empty batch)."""

    def validation_step(self, batch, batch_idx):
        self(batch[0])


def test_empty_validation_inputs_are_said_not_reported_as_rank_0(tmp_path) -> None:
    monitor = lr.RankMonitor(tensorboard=False)
    trainer = make_trainer(tmp_path, 1, [monitor], logger=False)
    empty_rows = DataLoader([(torch.zeros(0, 32), torch.zeros(0, dtype=torch.long))] * 2, batch_size=None)
    with pytest.warns(UserWarning, match=r"could analyze no layer: no row of its input was counted"):
        trainer.fit(ForwardOnly(), loaders()[0], empty_rows)
    assert monitor.report.analyzed == {} and math.isnan(monitor.report.mlu)
    assert all("no row" in reason for reason in monitor.report.skipped.values())

    monitor = lr.RankMonitor(tensorboard=False)
    trainer = make_trainer(tmp_path, 1, [monitor], logger=False)
    with pytest.warns(UserWarning, match=r"RankMonitor needs validation batches.*are empty. Until then it measures nothing"):
        trainer.fit(PlainClassifier(), loaders()[0], DataLoader([], batch_size=None))
    assert monitor.report is None and monitor.history == []


def test_a_compression_that_cannot_be_planned_trains_on_dense_and_says_why(tmp_path) -> None:
    """Validation inputs that are all NaN leave no statistics: the plan fails, the fit goes on with the dense model,
    and compression.json records why."""
    compression = lr.RankCompression(compress_at_epoch=1, param_budget=0.5, monitor="val_loss")
    trainer = make_trainer(tmp_path, 3, [compression], logger=False)
    model = PlainClassifier()
    with pytest.warns(UserWarning, match=r"could not plan the compression, so the model stays dense.*no statistics"):
        trainer.fit(model, *loaders(val=torch.full((64, 32), float("nan"))))
    assert trainer.current_epoch == 3 and type(model.net[0]) is nn.Linear and not compression.compressed
    summary = json.loads((tmp_path / "rank_reports" / "compression.json").read_text())
    assert "no selected layer can be factorized" in summary["failure"] and summary["layers"] == {}
    assert summary["metrics"]["before"] is not None


def test_the_result_of_a_compression_survives_a_resume(tmp_path) -> None:
    L.seed_everything(0)
    first = lr.RankCompression(compress_at_epoch=1, param_budget=0.5, monitor="val_loss")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    make_trainer(tmp_path, 2, [first, checkpoints], logger=False).fit(PlainClassifier(), *loaders())
    resumed = lr.RankCompression(compress_at_epoch=1, param_budget=0.5, monitor="val_loss")
    trainer = make_trainer(tmp_path, 3, [resumed], logger=False)
    trainer.fit(PlainClassifier(), *loaders(), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert resumed.result is not None and resumed.result.to_dict() == first.result.to_dict()
    assert resumed.result.params_after == first.result.params_after < first.result.params_before


def test_two_validations_an_epoch_write_two_reports(tmp_path) -> None:
    monitor = lr.RankMonitor(tensorboard=False)
    trainer = make_trainer(tmp_path, 1, [monitor], logger=False, val_check_interval=0.5)
    trainer.fit(PlainClassifier(), *loaders())
    assert [(h["epoch"], h["step"]) for h in monitor.history] == [(0, 2), (0, 4)]
    files = sorted(p.name for p in (tmp_path / "rank_reports").glob("*.json"))
    assert files == ["epoch_000.json", "epoch_000_step_000004.json"]
    for name, entry in zip(files, monitor.history):
        assert json.loads((tmp_path / "rank_reports" / name).read_text()) == entry["report"]


def test_a_layer_left_dense_by_a_macs_budget_says_so_and_factorized_conv1d_keeps_its_kind() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(wide=Conv1D(48, 48), narrow=nn.Linear(48, 4)))
    batches = [torch.randn(64, 48) * torch.logspace(0, -2, 48) for _ in range(3)]
    stats = lr.collect(model, batches)
    result = lr.factorize_(copy.deepcopy(model), stats, macs_budget=0.9, calibration=batches[:1],
                           allocation="uniform", progress=False)
    reasons = [d.reason for d in result.details.values() if not d.replaced and d.reason]
    assert all("parameter budget" not in reason for reason in reasons)
    assert any("multiply-add budget is met" in reason for reason in reasons)
    compressed = copy.deepcopy(model)
    lr.factorize_(compressed, stats, ranks={"wide": 8}, progress=False)
    assert isinstance(compressed.wide, lr.LowRankLinear)
    report = lr.analyze(compressed, lr.collect(compressed, batches), progress=False)
    assert report.layers["wide"].kind == "hf_conv1d" and report.layers["wide"].factorized


class CifarResNet18(CrossEntropySteps):
    """torchvision's ``resnet18`` layout from torch modules (7x7/2 stem, max-pool, stages 64-128-256-512 with
    BatchNorm): on 32x32 images its last stage sees 1x1 maps, so its 3x3 convolutions' 4608-wide input moments are
    mostly exact zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, width = [], 64
        for i, out in enumerate([64, 128, 256, 512]):
            stages.append(nn.Sequential(BasicBlock(width, out, 1 if i == 0 else 2), BasicBlock(out, out, 1)))
            width = out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_cifar_shaped_resnet18_is_monitored_and_compressed_to_half_its_multiply_adds(tmp_path) -> None:
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 32, 32, generator=g), torch.randint(0, 10, (96,), generator=g)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16)
    monitor = lr.RankMonitor(tensorboard=False)
    compression = lr.RankCompression(compress_at_epoch=1, macs_budget=0.5, monitor="val_loss")
    trainer = make_trainer(tmp_path, 2, [monitor, compression], logger=False)
    trainer.fit(model := CifarResNet18(), train, val)
    summary = compression.summary()
    assert trainer.current_epoch == 2 and "failure" not in summary
    assert summary["macs_after"] <= 0.5 * summary["macs_before"] * 1.001  # the convolutions are nearly all of it
    assert summary["layers"] and all(isinstance(model.get_submodule(name), (lr.LowRankConv2d, lr.LowRankLinear))
                                     for name in summary["layers"])
    assert [entry["epoch"] for entry in monitor.history] == [0, 1] and monitor.history[1]["factorized"]
    last_stage = monitor.report.layers["stages.3.1.conv1"]
    assert last_stage.in_features == 4608 and last_stage.in_rank <= 512  # only the centre tap is ever nonzero
