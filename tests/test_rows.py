"""The row policy, the shared draw, conv patches gathered at kept positions, and full-precision Grams."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_rank as lr
from lightning_rank.stats.collector import StatisticsCollector
from lightning_rank.stats.precision import full_precision_matmul
from lightning_rank.stats.rows import (
    AUTO_BATCH_MIN_ROWS,
    AUTO_BATCH_ROWS_PER_FEATURE,
    AUTO_MIN_ROWS,
    AUTO_ROWS_PER_FEATURE,
    row_limit,
)
from lightning_rank.stats.sums import InputStatistics
from tests.helpers import CONV_GEOMETRIES, assert_stats, patches_reference


class Positions:
    """Records which flat row positions each layer kept, by wrapping the collector's draw."""

    def __init__(self, collector: StatisticsCollector, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kept: list[torch.Tensor] = []
        original = collector._positions

        def recording(*args, **kwargs):
            out = original(*args, **kwargs)
            self.kept.append(out[0])
            return out

        monkeypatch.setattr(collector, "_positions", recording)


@pytest.mark.parametrize("kwargs", [*CONV_GEOMETRIES, dict(kernel_size=2, stride=2)])
@pytest.mark.parametrize("most", [False, True])  # few positions kept: gathered; most: all copied, then selected
def test_conv_patches_gathered_at_kept_positions_equal_every_patch_then_select(kwargs, most, monkeypatch) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, **kwargs)
    x = torch.randn(4, 3, 9, 8)
    positions = conv(x)[:, 0].numel()
    keep = positions - 3 if most else 7
    collector = StatisticsCollector(conv, max_rows_per_batch=keep, seed=1)
    recorder = Positions(collector, monkeypatch)
    with collector.attached(), torch.no_grad(), collector.observe(x):
        conv(x)
    (kept,) = recorder.kept
    assert kept.numel() == keep
    everything = patches_reference(x, conv)  # every position, by explicit slicing
    assert_stats(collector.compute()[""], everything[kept])


def test_conv1d_patches_gathered_at_kept_positions(monkeypatch) -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, kernel_size=3, stride=2, padding=2, dilation=2)
    x = torch.randn(3, 4, 11)
    collector = StatisticsCollector(conv, max_rows_per_batch=5)
    recorder = Positions(collector, monkeypatch)
    with collector.attached(), torch.no_grad(), collector.observe(x):
        conv(x)
    as_2d = nn.Conv2d(4, 6, (1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2))
    assert_stats(collector.compute()[""], patches_reference(x.unsqueeze(2), as_2d)[recorder.kept[0]])


def test_mask_then_subsample_conv_positions(monkeypatch) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(4, 2, 5, 5)
    keep = torch.tensor([True, False, True, True])
    collector = StatisticsCollector(conv, max_rows_per_batch=20, mask_fn=lambda b: b[1])
    recorder = Positions(collector, monkeypatch)
    with collector.attached(), torch.no_grad(), collector.observe((x, keep)):
        conv(x)
    kept = recorder.kept[0]
    allowed = keep.repeat_interleave(25).nonzero().squeeze(1)
    assert kept.numel() == 20 and torch.isin(kept, allowed).all() and kept.unique().numel() == 20
    assert_stats(collector.compute()[""], patches_reference(x, conv)[kept])


def test_one_draw_per_batch_is_shared_by_layers_with_the_same_rows() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(20, 20), nn.Linear(20, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)) * 0 + 2 * x)  # b sees another tensor, same positions as rows

    eye = torch.eye(20)  # row i is e_i: the Gram's diagonal shows which rows were taken
    stats = lr.collect(Two(), [eye] * 30, max_rows_per_batch=4)
    taken_a, taken_b = stats["a"].gram.diagonal(), stats["b"].gram.diagonal() / 4
    assert int(stats["a"].count) == int(stats["b"].count) == 4 * 30
    torch.testing.assert_close(taken_a, taken_b)  # the same rows in every batch
    assert (taken_a > 0).sum() > 4  # and different rows in different batches


def test_a_layer_keeping_more_rows_keeps_a_superset_of_the_shared_draw(monkeypatch) -> None:
    """Layers with the same number of rows but different limits take prefixes of one permutation."""
    model = nn.Sequential(nn.Linear(4, 200), nn.Linear(200, 2))  # fan_in 4 and 200: auto limits differ
    x = torch.randn(3000, 4)
    collector = StatisticsCollector(model)  # "auto", number of batches unknown: the per-batch rule
    recorder = Positions(collector, monkeypatch)
    with collector.attached(), torch.no_grad(), collector.observe(x):
        model(x)
    small, large = recorder.kept
    assert small.numel() == row_limit("auto", 4) == AUTO_BATCH_MIN_ROWS
    assert large.numel() == row_limit("auto", 200) == AUTO_BATCH_ROWS_PER_FEATURE * 200
    assert torch.equal(large[: small.numel()], small)


def test_auto_policy_spreads_a_budget_by_fan_in_over_the_batches_and_none_counts_every_row() -> None:
    """With a known number of batches each keeps the same fraction of its rows, so that every row is equally likely
    to count (a short or mostly masked batch is not over-weighted); without one, a cap per batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 100), nn.ReLU(), nn.Linear(100, 300), nn.ReLU(), nn.Linear(300, 3))
    batches = [torch.randn(8000, 8) for _ in range(3)]
    auto = lr.collect(model, batches)  # the default; a list has a length: the budget is spread over 3 batches
    assert AUTO_MIN_ROWS > AUTO_ROWS_PER_FEATURE * 8  # fan_in 8: the floor
    assert int(auto["0"].count) == 3 * math.ceil(AUTO_MIN_ROWS / 3)
    assert int(auto["4"].count) == 3 * math.ceil(AUTO_ROWS_PER_FEATURE * 300 / 3)
    assert int(auto["2"].count) == 3 * math.ceil(AUTO_ROWS_PER_FEATURE * 100 / 3)
    assert int(auto["0"].updates) == 3  # a subsampled batch is one update of the kept rows
    report = lr.analyze(model, auto)
    for name in ("0", "2", "4"):  # the report says how many rows were summed; fewer than they stand for once settled
        layer = report.to_dict()["layers"][name]
        assert layer["rows"] == int(auto[name].summed) <= int(auto[name].count)
        assert (layer["rows"] < int(auto[name].count)) == (layer["rows_reason"] == "settled")
        assert layer["rows_reason"] in ("settled", "budget")

    uneven = lr.collect(model, [batches[0], batches[1][:2000]])  # the same fraction of every batch, set on the first
    rate = AUTO_ROWS_PER_FEATURE * 100 / (2 * 8000)
    assert int(uneven["2"].count) == math.ceil(rate * 8000) + math.ceil(rate * 2000)  # not 2 x 3200

    unsized = lr.collect(model, (x for x in batches))  # a generator has no length: the per-batch rule
    assert int(unsized["0"].count) == 3 * AUTO_BATCH_MIN_ROWS
    assert int(unsized["4"].count) == 3 * AUTO_BATCH_ROWS_PER_FEATURE * 300

    exact = lr.collect(model, batches, max_rows_per_batch=None)
    assert_stats(exact["0"], torch.cat(batches))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "all", "Auto"])
def test_bad_row_policy_is_named(bad) -> None:
    with pytest.raises(ValueError, match=r"`max_rows_per_batch` must be \"auto\".*None.*positive int"):
        lr.collect(nn.Linear(3, 2), [torch.randn(2, 3)], max_rows_per_batch=bad)
    with pytest.raises(ValueError, match="max_rows_per_batch"):
        lr.RankMonitor(max_rows_per_batch=bad)


# -- full precision --------------------------------------------------------------------------
@pytest.fixture
def medium_precision():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(before)


def _bf16_matmul_is_active() -> bool:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=g), torch.randn(256, 64, generator=g)
    return ((a @ b).double() - a.double() @ b.double()).abs().max().item() > 1e-3


def test_gram_updates_run_at_full_precision_under_medium_matmul_precision(medium_precision) -> None:
    if not _bf16_matmul_is_active():
        pytest.skip("float32 matmul precision has no effect on this CPU (no bf16 oneDNN path)")
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2048, 256, generator=g) + 1.0
    stats = InputStatistics.zeros(256, torch.float32, torch.device("cpu"))
    stats.update(rows)
    exact = rows.double().t() @ rows.double()
    error = (stats.gram.double() - exact).abs().max() / exact.abs().max()
    assert error < 1e-5, error  # bf16 products err by about 3e-4
    assert torch.get_float32_matmul_precision() == "medium"  # the user's setting is back
    assert _bf16_matmul_is_active()  # and the user's own matmuls still use it


def test_analysis_under_medium_precision_gives_the_ranks_of_highest(medium_precision) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(96, 64)
    g = torch.Generator().manual_seed(1)
    xs = [(torch.randn(512, 96, generator=g) * torch.logspace(0, -4, 96)) for _ in range(4)]
    torch.set_float32_matmul_precision("highest")
    want = lr.analyze(layer, lr.collect(layer, xs), threshold=0.999).layers[""]
    torch.set_float32_matmul_precision("medium")
    got = lr.analyze(layer, lr.collect(layer, xs), threshold=0.999).layers[""]
    assert (got.in_rank, got.out_rank) == (want.in_rank, want.out_rank)


def test_per_backend_precision_setting_is_restored() -> None:
    matmul = torch.backends.mkldnn.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no per-backend fp32_precision")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "bf16"  # the per-backend API: the legacy getter now refuses to read
        with full_precision_matmul():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "bf16"
    finally:
        matmul.fp32_precision = before
