"""Held rows: while fewer rows than a layer's width were counted, the rows themselves stand for their Gram matrix.

Streamed held rows must equal the rows added (in the weight's order, conv patches included), give exactly the Gram
matrix batch-by-batch updates give, and give the ranks of one-shot float64 references through the small Gram.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_rank as lr
from lightning_rank.stats.sums import InputStatistics
from tests.helpers import brute_energy_rank, moments_reference, patches_reference


def _batches(sizes: list[int], dim: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    """Rows in a k-dimensional subspace with a decaying spectrum, plus a small full-width part."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, dim, generator=g) * torch.logspace(0, -3, k)[:, None]
    return [torch.randn(n, k, generator=g) @ basis + 1e-4 * torch.randn(n, dim, generator=g) for n in sizes]


def test_held_rows_are_the_rows_added_and_sum_into_the_gram_updates_give() -> None:
    batches = _batches([7, 11, 5], dim=40, k=6)
    held = InputStatistics.zeros(40, torch.float32, torch.device("cpu"), hold_rows=True)
    summed = InputStatistics.zeros(40, torch.float32, torch.device("cpu"))
    for rows in batches:
        held.update(rows)
        summed.update(rows)
    torch.testing.assert_close(held.rows, torch.cat(batches), rtol=0, atol=0)
    gram, total, count = moments_reference(torch.cat(batches))
    torch.testing.assert_close(held.diagonal(), gram.diagonal(), rtol=1e-12, atol=0)
    assert torch.equal(held.total, summed.total) and int(held.count) == count == int(summed.count)
    assert torch.equal(held.gram, summed.gram)  # summed batch by batch, as the updates were
    assert held.rows is None  # and held no longer
    assert int(held.updates) == int(summed.updates) == 3


def test_rows_stop_being_held_once_they_reach_the_width() -> None:
    batches = _batches([20, 15, 30], dim=48, k=8, seed=1)
    stats = InputStatistics.zeros(48, torch.float32, torch.device("cpu"), hold_rows=True)
    stats.update(batches[0])
    stats.update(batches[1])
    assert stats.rows is not None and stats.rows.shape == (35, 48)
    stats.update(batches[2])  # 65 rows >= 48: summed from here on
    assert stats.rows is None
    gram, total, count = moments_reference(torch.cat(batches))
    assert int(stats.count) == count
    torch.testing.assert_close(stats.gram.double(), gram, rtol=1e-5, atol=1e-5 * gram.abs().max().item())
    torch.testing.assert_close(stats.total.double(), total, rtol=1e-5, atol=1e-5)


def test_held_rows_drop_nonfinite_rows_and_count_them() -> None:
    rows = _batches([9], dim=30, k=4, seed=2)[0]
    rows[3, 5] = float("nan")
    rows[6, 0] = float("inf")
    stats = InputStatistics.zeros(30, torch.float32, torch.device("cpu"), hold_rows=True)
    stats.update(rows)
    finite = rows[torch.isfinite(rows).all(dim=1)]
    assert (int(stats.count), int(stats.nonfinite)) == (7, 2)
    torch.testing.assert_close(stats.rows, finite, rtol=0, atol=0)


def test_held_conv_patches_are_in_the_weights_order() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1)  # fan_in 72; 2 images of 4x4 give 32 patches: held
    x = torch.randn(2, 8, 4, 4)
    stats = lr.collect(conv, [x], max_rows_per_batch=None)
    rows = stats[""].rows
    assert rows is not None
    torch.testing.assert_close(rows, patches_reference(x, conv), rtol=0, atol=0)
    gram, total, _ = moments_reference(patches_reference(x, conv))
    torch.testing.assert_close(stats[""].total.double(), total, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(stats[""].gram.double(), gram, rtol=1e-5, atol=1e-5 * gram.abs().max().item())


def test_all_reduce_sums_held_rows_as_a_gram() -> None:
    rows = _batches([10], dim=32, k=5, seed=3)[0]
    stats = InputStatistics.zeros(32, torch.float32, torch.device("cpu"), hold_rows=True)
    stats.update(rows)
    stats.all_reduce_(lambda t: t.mul_(2))  # two identical processes
    gram, total, count = moments_reference(rows)
    assert int(stats.count) == 2 * count
    torch.testing.assert_close(stats.gram.double(), 2 * gram, rtol=1e-5, atol=1e-5 * gram.abs().max().item())


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.widen = nn.Linear(120, 160)  # rows < fan_in < out: held, widening
        self.narrow = nn.Linear(160, 20)  # out < rows < fan_in: held
        self.head = nn.Linear(20, 30)  # fan_in < rows: summed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.narrow(torch.tanh(self.widen(x)))))


def _brute(layer: nn.Linear, x: torch.Tensor, t: float, centered: bool) -> tuple[int, int]:
    x = x.double()
    y = x @ layer.weight.double().t() + layer.bias.double()
    if centered:
        x, y = x - x.mean(0), y - y.mean(0)
    values_in = torch.linalg.eigvalsh(x.t() @ x / len(x))
    values_out = torch.linalg.eigvalsh(y.t() @ y / len(y))
    return brute_energy_rank(values_in.tolist(), t), brute_energy_rank(values_out.tolist(), t)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("threshold", [0.9, 0.99])
def test_ranks_from_held_rows_are_those_of_float64_references(threshold: float, centered: bool) -> None:
    torch.manual_seed(0)
    model = Wide()
    data = _batches([30, 30, 30], dim=120, k=25, seed=4)  # 90 rows: fewer than 120 and 160
    stats = lr.collect(model, data)
    assert [name for name in stats.layers if stats[name].rows is not None] == ["widen", "narrow"]
    report = lr.analyze(model, stats, threshold=threshold, centered=centered, progress=False)
    x = torch.cat(data)
    with torch.no_grad():
        hidden = torch.tanh(model.widen(x))
        inputs = {"widen": x, "narrow": hidden, "head": torch.tanh(model.narrow(hidden))}
    for name, rows in inputs.items():
        layer = report.layers[name]
        assert (layer.in_rank, layer.out_rank) == _brute(getattr(model, name), rows, threshold, centered), name
        assert layer.rows == 90 and layer.rows_limited == (name != "head")
    summed = lr.collect(model, data)
    for name in summed.layers:
        summed[name].gram  # noqa: B018 - reading the Gram sums the held rows
    again = lr.analyze(model, summed, threshold=threshold, centered=centered, progress=False)
    for name, layer in report.layers.items():
        assert (layer.in_rank, layer.out_rank) == (again.layers[name].in_rank, again.layers[name].out_rank)
        assert layer.in_effective_rank == pytest.approx(again.layers[name].in_effective_rank, rel=1e-4)
        spectrum, reference = report.spectra[name][0], again.spectra[name][0]
        assert spectrum.shape == reference.shape
        torch.testing.assert_close(spectrum[:20], reference[:20], rtol=1e-4, atol=1e-6 * float(reference[0]))


def test_factorization_decomposes_full_moments_of_held_rows() -> None:
    torch.manual_seed(0)
    model = Wide()
    data = _batches([40, 40], dim=120, k=10, seed=5)
    stats = lr.collect(model, data)
    from lightning_rank.spectral.analysis import decompose

    analysis = decompose(model, stats, vectors=True)
    moment = analysis.layers["widen"].moment
    gram, _, count = moments_reference(torch.cat(data))
    torch.testing.assert_close(moment, gram / count, rtol=1e-5, atol=1e-5 * float(gram.abs().max() / count))


def test_held_conv_rows_over_a_one_pixel_map_give_the_ranks_of_their_patches() -> None:
    """A 3x3 convolution over a 1x1 map: 8 of 9 patch entries are always padding (zero), left out of the products."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)  # fan_in 144; 40 images of 1x1 give 40 patches: held
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(40, 6, generator=g) @ torch.randn(6, 16, generator=g)).reshape(40, 16, 1, 1)
    stats = lr.collect(conv, [x[:20], x[20:]])
    assert stats[""].rows is not None
    patches = patches_reference(x, conv)
    for threshold in (0.9, 0.99):
        report = lr.analyze(conv, stats, threshold=threshold, progress=False).layers[""]
        weight = conv.weight.detach().reshape(24, -1).double()
        outputs = patches.double() @ weight.t() + conv.bias.detach().double()
        values_in = torch.linalg.eigvalsh(patches.double().t() @ patches.double() / 40)
        values_out = torch.linalg.eigvalsh(outputs.t() @ outputs / 40)
        assert report.in_rank == brute_energy_rank(values_in.tolist(), threshold)
        assert report.out_rank == brute_energy_rank(values_out.tolist(), threshold)
