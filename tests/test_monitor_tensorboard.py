"""The pure parts of RankMonitor's output: TensorBoard views, input spectra and logged scalars."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

import lightning_rank as lr
from lightning_rank import tensorboard as views
from lightning_rank.monitor import report_scalars


class Recorder:
    """A stand-in SummaryWriter that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, method: str):
        return lambda *args, **kwargs: self.calls.append((method, args))


@pytest.mark.parametrize(
    ("name", "group", "role"),
    [
        ("blocks.3.attn.q", "blocks.3", "blocks.*.attn.q"),
        ("layer1.0.downsample.0", "layer1.0", "layer1.*.downsample.0"),
        ("encoder.layer.11.output.dense", "encoder.layer.11", "encoder.layer.*.output.dense"),
        ("net.2", "net", "net.2"),
        ("head", "(top level)", "head"),
    ],
)
def test_layer_group_and_role(name, group, role):
    assert views.layer_group(name) == group
    assert views.layer_role(name) == role


def test_layout_charts_use_anchored_tags():
    layers = ["blocks.0.fc1", "blocks.0.fc10", "blocks.1.fc1", "head"]
    layout = views.utilization_layout(layers)
    by_block = layout["rank utilization by block"]
    assert list(by_block) == ["blocks.0", "blocks.1", "(top level)"]
    (kind, tags) = by_block["blocks.0"]
    assert kind == "Multiline"
    assert [t for t in tags if re.search(t, "rank/utilization/blocks.0.fc10")] == [r"^rank/utilization/blocks\.0\.fc10$"]
    assert list(layout["rank utilization by layer role"]) == ["blocks.*.fc1"]  # roles in one block only are left out
    assert re.search(layout["lightning_rank"]["mean layer utilization"][1][0], "rank/weighted_mlu")
    assert "rank utilization by layer role" not in views.utilization_layout(["a", "b"])


def test_utilization_matrix_and_heatmap_image():
    reports = [
        {"layers": {"a": {"utilization": 0.0}, "b": {"utilization": None}}},  # b skipped
        {"layers": {"a": {"utilization": 1.0}, "c": {"utilization": 0.5}}},  # c appears later
    ]
    names, matrix = views.utilization_matrix(reports)
    assert names == ["a", "b", "c"]
    np.testing.assert_array_equal(np.isnan(matrix), [[False, False], [True, True], [True, False]])
    image = views.heatmap_image(matrix, cell=3)
    assert image.shape == (9, 6, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [68, 1, 84]  # 0%: the dark end of the ramp
    assert image[0, 3].tolist() == [253, 231, 37]  # 100%: the bright end
    assert image[6, 3].tolist() == [33, 145, 140]  # 50%: the middle stop
    assert image[3, 0].tolist() == image[6, 0].tolist() == [128, 128, 128]  # missing
    assert (image[:3, :3] == image[0, 0]).all()  # one value fills its cell


def test_spectra_histograms_hold_log_energy_shares():
    writer = Recorder()
    views.write_spectra(writer, {"a": torch.tensor([3.0, 1.0, 0.0]), "zero": torch.zeros(2)}, step=5)
    ((method, (tag, values, step)),) = writer.calls  # the zero matrix has no histogram
    assert (method, tag, step) == ("add_histogram", "rank/spectrum/a", 5)
    np.testing.assert_allclose(10**values, [0.75, 0.25])


def test_cumulative_energy():
    curve = views.cumulative_energy(torch.tensor([1.0, 3.0, 0.0]))
    torch.testing.assert_close(curve, torch.tensor([0.75, 1.0, 1.0], dtype=torch.float64))
    assert views.cumulative_energy(torch.zeros(3)).eq(0).all()


def test_energy_curves_one_figure_per_block_or_none_without_matplotlib(monkeypatch):
    spectra = {"blocks.0.q": torch.tensor([2.0, 1.0]), "blocks.0.k": torch.tensor([1.0, 1.0]), "head": torch.ones(3)}
    writer = Recorder()
    assert views.write_energy_curves(writer, spectra, 0.9, step=1)
    assert [(m, args[0]) for m, args in writer.calls] == [
        ("add_figure", "rank/energy/blocks.0"), ("add_figure", "rank/energy/(top level)")
    ]
    figure = views.energy_figure(spectra, 0.9)
    assert len(figure.axes[0].lines) == 4  # three curves and the threshold
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    writer = Recorder()
    assert not views.write_energy_curves(writer, spectra, 0.9, step=1)
    assert writer.calls == []


def test_histograms_use_the_reports_input_spectra():
    torch.manual_seed(0)

    class QK(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.q(x) * self.k(x))

    model = QK()
    stats = lr.collect(model, [torch.randn(16, 4) * torch.tensor([1.0, 1.0, 0.0, 0.0])])
    spectra = {name: pair[0] for name, pair in lr.analyze(model, stats).spectra.items()}
    assert torch.equal(spectra["q"], spectra["k"])  # one shared input
    expected = torch.linalg.eigvalsh(stats["q"].second_moment()).flip(0)
    torch.testing.assert_close(spectra["q"][:2], expected[:2])
    assert spectra["q"][2:].eq(0).all()  # round-off below dim * eps of the largest is cleaned to 0
    assert spectra["out"].shape == (4,)
    writer = Recorder()
    views.write_spectra(writer, spectra, step=3)
    assert {args[0] for method, args in writer.calls if method == "add_histogram"} == {"rank/spectrum/q", "rank/spectrum/k", "rank/spectrum/out"}


def test_report_scalars():
    report = lr.RankReport(
        threshold=0.99,
        layers={
            "a": lr.LayerRank("a", "linear", 4, 2, in_rank=3, out_rank=2, rank=2, utilization=1.0, parameters=10),
            "b": lr.LayerRank("b", "linear", 4, 4, skipped="never called"),
        },
    )
    assert report_scalars(report) == {
        "rank/mlu": 1.0,
        "rank/weighted_mlu": 1.0,
        "rank/utilization/a": 1.0,
        "rank/in_rank/a": 3.0,
        "rank/out_rank/a": 2.0,
    }
