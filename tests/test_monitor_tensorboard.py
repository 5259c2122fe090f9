"""What TensorBoard shows: the views of lightning_rank.tensorboard, and real Trainer runs read back with
TensorBoard's own reader (the plugin EventAccumulator of its Python data path, which reads every value in the
tensor form the dashboards get), ordered with TensorBoard's own tag comparators."""

from __future__ import annotations

import functools
import io
import re

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

import lightning_rank as lr
from lightning_rank.callbacks import monitor as monitor_module
from lightning_rank.views import drawing, figures, tables, writers
from lightning_rank.views import tags as tag_names
from lightning_rank.views.tags import report_scalars
from tests.helpers import Events, FakeClock
from tests.tiny_models import BLOCKS_LAYERS, Blocks, make_trainer

SUMMARY = ["0_rank_summary/mlu", "0_rank_summary/mlu_weighted"]


# -- TensorBoard's tag order, ported from its frontend -----------------------------------------------
def _compare_tags(a: str, b: str, breaks: str) -> int:
    """TensorBoard's ``compareTagNames``: digit runs compare as numbers; a "break" character (digits, ``/``
    and, in the legacy dashboards, ``_``) sorts before any other character; others compare by code point.
    Time Series: webapp/metrics/utils.ts; Scalars/Images/Text: components/vz_sorting/sorting.ts."""
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            ni = re.match(r"\d+(\.\d*)?([eE][+-]?\d+)?", a[i:]).group(0)
            nj = re.match(r"\d+(\.\d*)?([eE][+-]?\d+)?", b[j:]).group(0)
            if float(ni) != float(nj):
                return -1 if float(ni) < float(nj) else 1
            i, j = i + len(ni), j + len(nj)
            continue
        a_break, b_break = a[i].isdigit() or a[i] in breaks, b[j].isdigit() or b[j] in breaks
        if a_break and not b_break:
            return -1
        if b_break and not a_break:
            return 1
        if not a_break and a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


def tensorboard_order(tags, legacy: bool = False) -> list[str]:
    breaks = "/_" if legacy else "/"
    return sorted(tags, key=functools.cmp_to_key(lambda a, b: _compare_tags(a, b, breaks)))


def groups_in_order(tags, legacy: bool = False) -> list[str]:
    return list(dict.fromkeys(tag.split("/", 1)[0] for tag in tensorboard_order(tags, legacy)))


def test_tag_comparator_port_matches_tensorboards_documented_examples():
    order = functools.cmp_to_key(lambda a, b: _compare_tags(a, b, "/_"))
    assert sorted(["a10b", "a2b"], key=order) == ["a2b", "a10b"]
    assert sorted(["a+/a", "a/a"], key=order) == ["a/a", "a+/a"]  # '/' before '+' although '+' < '/' in ASCII
    assert tensorboard_order(["epoch", "Loss/train", "0_rank_summary/mlu", "compression/x", "_hidden"]) == [
        "0_rank_summary/mlu", "Loss/train", "_hidden", "compression/x", "epoch"
    ]


# -- names, layout, heatmap, spectra (pure) --------------------------------------------------------
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
    assert tag_names.layer_group(name) == group
    assert tag_names.layer_role(name) == role


def test_layout_charts_have_at_most_five_named_lines_with_anchored_tags():
    layers = [f"blocks.{b}.{r}" for b in range(7) for r in ("q", "k", "v", "proj", "fc1", "fc10")] + ["head"]
    layout = tag_names.utilization_layout(layers)
    assert list(layout) == ["lightning-rank summary", "utilization by block", "utilization by layer role"]
    ((title, (kind, tags)),) = layout["lightning-rank summary"].items()
    assert kind == "Multiline" and [t for t in tags if re.search(t, "0_rank_summary/mlu")] == [tags[0]]
    assert re.search(tags[1], "0_rank_summary/mlu_weighted") and "MLU" in title
    # With RankCompression, the parameters and multiply-adds kept share the chart: their drop marks the swap.
    assert [re.search(t, "0_rank_summary/params_ratio") is not None for t in tags] == [False, False, True, False]
    assert re.search(tags[3], "0_rank_summary/multiply_adds_ratio") and "swap" in title

    charts = {title: tags for category in list(layout.values())[1:] for title, (_, tags) in category.items()}
    assert max(len(tags) for tags in charts.values()) <= tag_names.MAX_LINES_PER_CHART == 5
    assert tag_names.utilization_layout([f"b.{i}" for i in range(5)])["utilization by block"] == {
        "b: 0, 1, 2, 3, 4": ["Multiline", [rf"^rank/utilization/b\.{i}$" for i in range(5)]]
    }
    every_tag = [tag for tags in layout["utilization by block"].values() for tag in tags[1]]
    assert len(every_tag) == len(set(every_tag)) == len(layers)  # each layer in exactly one block chart
    assert "blocks.0: q, k, v" in charts and "blocks.0: proj, fc1, fc10" in charts  # 6 layers: 3 + 3
    assert [t for t in every_tag if re.search(t, "rank/utilization/blocks.0.fc10")] == [r"^rank/utilization/blocks\.0\.fc10$"]
    roles = layout["utilization by layer role"]
    assert list(roles)[:2] == ["blocks.*.q in blocks.0, blocks.1, blocks.2, blocks.3", "blocks.*.q in blocks.4, blocks.5, blocks.6"]
    assert "utilization by layer role" not in tag_names.utilization_layout(["a", "b"])  # no role spans blocks


def test_utilization_matrix():
    reports = [
        {"layers": {"a": {"utilization": 0.0}, "b": {"utilization": None}}},  # b skipped
        {"layers": {"a": {"utilization": 1.0}, "c": {"utilization": 0.5}}},  # c appears later
    ]
    names, matrix = figures.utilization_matrix(reports)
    assert names == ["a", "b", "c"]
    np.testing.assert_array_equal(np.isnan(matrix), [[False, False], [True, True], [True, False]])
    assert matrix[0].tolist() == [0.0, 1.0] and matrix[2, 1] == 0.5


def history_of(*columns: tuple[int, bool, dict[str, float]]) -> list[dict]:
    return [
        {"epoch": epoch, "factorized": factorized,
         "report": {"mlu": float(np.mean(list(u.values()))), "layers": {n: {"utilization": v} for n, v in u.items()}}}
        for epoch, factorized, u in columns
    ]


def pixels_of(image: np.ndarray, color) -> np.ndarray:
    """(row, column) of every pixel of exactly ``color``."""
    return np.argwhere((image == np.asarray(color, dtype=np.uint8)).all(axis=-1))


def test_heatmap_cells_in_place_with_the_mlu_on_top_missing_grey_and_the_compression_marked(tmp_path):
    history = history_of(
        (1, False, {"blocks.0.fc1": 0.5, "blocks.0.fc2": 0.1, "head": 1.0}),
        (3, False, {"blocks.0.fc1": 0.25, "head": 0.9}),  # fc2 absent: a grey cell
        (5, True, {"blocks.0.fc1": 0.125, "head": 0.75}),
    )
    assert figures.compression_columns(history) == [2]
    assert figures.compression_columns(history[:2]) == []
    writer = SummaryWriter(tmp_path)
    assert writers.write_heatmap(writer, history, step=7)
    writer.close()
    run = Events(tmp_path)
    ((step, width, height),) = run.images("0_rank_summary/utilization_heatmap")
    image = run.picture("0_rank_summary/utilization_heatmap")
    assert (step, image.shape[:2]) == (7, (height, width))
    assert width >= 700  # room for the layer names, the cells and the colour bar

    grid = image[:, : width - 95]  # left of the colour bar (the last ~90 pixels), whose ramp holds every colour
    expected = {  # (row, column) -> utilization; row 0 is the MLU, the mean of the column's layers
        (0, 0): (0.5 + 0.1 + 1.0) / 3, (0, 1): (0.25 + 0.9) / 2, (0, 2): (0.125 + 0.75) / 2,
        (1, 0): 0.5, (1, 1): 0.25, (1, 2): 0.125, (2, 0): 0.1, (3, 0): 1.0, (3, 1): 0.9, (3, 2): 0.75,
    }
    centres = {}
    for cell, value in expected.items():
        found = pixels_of(grid, drawing.viridis(np.array(value)))
        assert len(found) >= 20 * 40 // 2, cell  # a large cell, its number drawn over part of it
        centres[cell] = found.mean(axis=0)
    for (row, column), (y, x) in centres.items():  # rows top to bottom, columns left to right
        for (other_row, other_column), (y2, x2) in centres.items():
            if other_row > row:
                assert y2 > y + 15
            if other_column > column:
                assert x2 > x + 30
    grey = pixels_of(grid, drawing.MISSING)
    assert abs(grey[:, 0].mean() - centres[(2, 0)][0]) < 2 and centres[(1, 1)][1] - 5 < grey[:, 1].mean() < centres[(1, 2)][1]

    red = pixels_of(image, drawing.RED)  # the dashed line and its label sit between epochs 3 and 5
    assert len(red) and (red[:, 1] > centres[(1, 1)][1]).all() and (red[:, 1] < centres[(1, 2)][1]).all()
    assert abs(np.median(red[:, 1]) - (centres[(1, 1)][1] + centres[(1, 2)][1]) / 2) <= 2
    bar = image[:, width - 95 :]
    assert len(pixels_of(bar, drawing.viridis(np.array(0.0)))) and len(pixels_of(bar, drawing.viridis(np.array(1.0))))
    assert "Rows: layers" in run.description("0_rank_summary/utilization_heatmap")


def test_viridis_matches_matplotlib():
    matplotlib = pytest.importorskip("matplotlib")
    values = np.linspace(0, 1, 201)
    reference = np.array([matplotlib.colormaps["viridis"](v)[:3] for v in values]) * 255
    assert np.abs(drawing.viridis(values).astype(float) - reference).max() <= 6
    assert drawing.viridis(np.array([np.nan, -1.0, 2.0])).tolist() == [
        list(drawing.MISSING), drawing.viridis(np.array(0.0)).tolist(), drawing.viridis(np.array(1.0)).tolist()
    ]


def test_png_bytes_decode_to_the_same_pixels():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    decoded = Image.open(io.BytesIO(drawing.png_bytes(image)))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))


def test_spectra_histograms_hold_log_energy_shares_with_a_description(tmp_path):
    writer = SummaryWriter(tmp_path)
    writers.write_spectra(writer, {"a": torch.tensor([3.0, 1.0, 0.0]), "zero": torch.zeros(2)}, step=5)
    writer.close()
    run = Events(tmp_path)
    assert run.tags("histograms") == ["rank_detail/spectrum/a"]  # the zero matrix has no histogram
    ((step, buckets),) = run.histograms("rank_detail/spectrum/a")
    assert step == 5 and buckets[:, 2].sum() == 2
    assert buckets[0, 0] == pytest.approx(np.log10(0.25)) and buckets[-1, 1] == pytest.approx(np.log10(0.75))
    assert "log10" in run.description("rank_detail/spectrum/a")


def test_cumulative_energy():
    curve = figures.cumulative_energy(torch.tensor([1.0, 3.0, 0.0]))
    torch.testing.assert_close(curve, torch.tensor([0.75, 1.0, 1.0], dtype=torch.float64))
    assert figures.cumulative_energy(torch.zeros(3)).eq(0).all()


def axes_frame(image: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the axes' black frame: the rows and columns holding its long unbroken black lines."""
    black = (image == 0).all(axis=-1)

    def longest_run(line: np.ndarray) -> int:
        edges = np.diff(np.concatenate([[0], line.astype(np.int8), [0]]))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        return int((stops - starts).max()) if len(starts) else 0

    rows = [y for y in range(black.shape[0]) if longest_run(black[y]) > 300]
    columns = [x for x in range(black.shape[1]) if longest_run(black[:, x]) > 200]
    return columns[0], rows[0], columns[-1], rows[-1]


def test_log_ticks():
    assert drawing.log_ticks(96) == ([1, 2, 5, 10, 20, 50], [3, 4, 6, 7, 8, 9, 30, 40, 60, 70, 80, 90])
    assert drawing.log_ticks(2)[0] == [1, 2]


def test_energy_images_one_per_block_curves_on_a_log_axis_ranks_dotted_and_the_legend_outside(tmp_path):
    spectra = {f"blocks.0.l{i}": torch.rand(6, generator=torch.Generator().manual_seed(i)) for i in range(12)}
    spectra["head"] = torch.tensor([3.0, 1.0, 0.0, 0.0])  # cumulative energy 0.75, 1, 1, 1: in rank 2 at 0.9
    spectra["wide"] = torch.tensor([1.0] * 4 + [0.0] * 96)  # energy k / 4 up to k = 4, then 1 up to k = 100
    writer = SummaryWriter(tmp_path)
    writers.write_energy_curves(writer, spectra, 0.9, step=1, epoch=0)
    writer.close()
    run = Events(tmp_path)
    assert run.tags("images") == ["rank_energy/(top level)", "rank_energy/blocks.0"]
    assert run.images("rank_energy/blocks.0") == [(1, 900, 420)]
    assert "energy threshold" in run.description("rank_energy/blocks.0")
    assert "log" in run.description("rank_energy/blocks.0") and "in rank" in run.description("rank_energy/blocks.0")

    top = run.picture("rank_energy/(top level)")
    x0, y0, x1, y1 = axes_frame(top)
    assert x1 - x0 > 400 and y1 - y0 > 250

    def at(k: float, energy: float) -> tuple[int, int]:  # the pixel of a point in data coordinates: x = log k, 1..100
        return round(y1 - energy / 1.02 * (y1 - y0)), round(x0 + np.log(k) / np.log(100) * (x1 - x0))

    (head, _), (wide, _) = drawing.curve_styles(2)
    for color, points in ((head, ((1, 0.75), (2, 1.0), (3, 1.0))), (wide, ((1, 0.25), (2, 0.5), (4, 1.0), (50, 1.0)))):
        for k, energy in points:
            y, x = at(k, energy)
            assert len(pixels_of(top[y - 2 : y + 3, x - 2 : x + 3], color)), (k, energy)
    # The wide layer's 4 directions of 100 take the left 30% of the axes (on a linear axis: 4%).
    assert 0.25 < (at(4, 1.0)[1] - x0) / (x1 - x0) < 0.35
    y, x = at(20, 0.5)
    assert not len(pixels_of(top[y - 3 : y + 4, x - 3 : x + 4], wide))  # no curve where the energy is not
    # Each layer's in rank (the first k at the threshold) is a dot: the curve's colour ringed in black, centred there.
    for color, k, energy in ((head, 2, 1.0), (wide, 4, 1.0)):
        y, x = at(k, energy)
        window = top[y - 6 : y + 7, x - 6 : x + 7]
        assert len(pixels_of(window, color)) >= 25 and len(pixels_of(window, drawing.BLACK)) >= 12, k
    threshold_row = at(1, 0.9)[0]
    assert (top[threshold_row - 1 : threshold_row + 2, x0 + 5 : x1 - 5] == 0).all(axis=-1).any(axis=0).mean() > 0.4
    legend = Image.fromarray(top[:, x1 + 10 :])  # "head: 2 of 4", "wide: 4 of 100" beside the axes
    assert legend.getbbox() is not None
    assert figures.energy_image({"wide": spectra["wide"]}, 0.9).size == (900, 420)

    block = run.picture("rank_energy/blocks.0")
    x0, y0, x1, y1 = axes_frame(block)
    styles = drawing.curve_styles(12)
    assert len(set(styles)) == 12 and len({color for color, _ in styles}) == 12  # tab20 beyond ten curves
    for color, _ in styles:
        found = pixels_of(block, color)
        assert (found[:, 1] < x1).any() and (found[:, 1] > x1 + 10).any()  # on the axes and in the legend beside them
    assert len(set(drawing.curve_styles(23))) == 23  # beyond twenty, dashes repeat the colours


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
    assert spectra["q"][2:].eq(0).all()
    assert spectra["out"].shape == (4,)


def test_report_scalars_one_per_layer_by_default():
    report = lr.RankReport(
        threshold=0.99,
        layers={
            "a": lr.LayerRank("a", "linear", 4, 2, in_rank=3, out_rank=2, rank=2, utilization=1.0, parameters=10),
            "b": lr.LayerRank("b", "linear", 4, 4, skipped="never called"),
        },
    )
    assert report_scalars(report) == {"0_rank_summary/mlu": 1.0, "0_rank_summary/mlu_weighted": 1.0,
                                      "rank/utilization/a": 1.0}
    assert report_scalars(report, ranks=True) == {**report_scalars(report), "rank_detail/in_rank/a": 3.0,
                                                  "rank_detail/out_rank/a": 2.0}


def test_views_argument_is_checked_eagerly():
    assert tag_names.check_views(tag_names.DEFAULT_VIEWS) == ("heatmap", "energy", "table")
    assert tag_names.check_views("ranks") == ("ranks",)
    assert tag_names.check_views([]) == ()
    assert lr.RankMonitor(views=["spectra", "ranks"]).views == ("spectra", "ranks")
    with pytest.raises(ValueError, match=r"`views` got an unknown view 'histograms'; choose from \('heatmap'"):
        lr.RankMonitor(views=["heatmap", "histograms"])
    with pytest.raises(TypeError, match="`views` must be a collection"):
        lr.RankMonitor(views=3)
    with pytest.raises(TypeError, match="`views` must hold view names"):
        lr.RankMonitor(views=[None])


SUMMARY_OF_COMPRESSION = {
    "params_before": 1000, "params_after": 400, "macs_before": 2000.0, "macs_after": 500.0,
    "layers": {"net.0": 3}, "metrics": {"before": 0.9, "compressed": 0.7, "finetuned": 0.85}, "monitor": "val_acc",
    "method": "whiten",
    "details": {
        "net.0": {"kind": "linear", "out_features": 16, "in_features": 8, "replaced": True, "rank": 3,
                  "relative_error": 0.0123, "params_before": 144, "params_after": 88, "reason": None},
        "net.2": {"kind": "linear", "out_features": 4, "in_features": 16, "replaced": False, "rank": None,
                  "relative_error": 0.0, "params_before": 68, "params_after": 68, "reason": "no saving"},
    },
}


def test_compression_headline_scalars_and_one_table():
    assert tag_names.compression_scalars(SUMMARY_OF_COMPRESSION) == {
        "0_rank_summary/params_ratio": 0.4,
        "0_rank_summary/multiply_adds_ratio": 0.25,
        "0_rank_summary/val_acc_change": pytest.approx(-0.05),  # at the end: fine-tuned - before
    }
    assert tag_names.compression_scalars(SUMMARY_OF_COMPRESSION, at="swap") == {
        "0_rank_summary/params_ratio": 0.4,
        "0_rank_summary/multiply_adds_ratio": 0.25,
        "0_rank_summary/val_acc_change": pytest.approx(-0.2),  # at the swap: right after it - before
    }
    with pytest.raises(ValueError, match="`at` must be 'swap' or 'end'"):
        tag_names.compression_scalars(SUMMARY_OF_COMPRESSION, at="start")
    unmeasured = {**SUMMARY_OF_COMPRESSION, "macs_after": None, "metrics": {"before": 0.9, "finetuned": None}}
    assert tag_names.compression_scalars(unmeasured) == {"0_rank_summary/params_ratio": 0.4}
    assert tag_names.kept_ratios(None) == {"0_rank_summary/params_ratio": 1.0, "0_rank_summary/multiply_adds_ratio": 1.0}
    table = tables.compression_markdown(SUMMARY_OF_COMPRESSION, step=80)
    assert table.startswith("**Compression** (whiten) after fine-tuning, at the end of fit (step 80): 1 layers")
    assert "| parameters | 1,000 | 400 | 40.0% |" in table
    assert "| multiply-adds per example | 2,000 | 500 | 25.0% |" in table
    assert "| val_acc | before | right after the swap | after fine-tuning |" in table
    assert "| value | 0.9 | 0.7 | 0.85 |" in table
    # The rank a layer keeps is named apart from the utilized rank a report measures.
    assert "| layer | out x in | kept rank | rel. output error | parameters | replaced |" in table
    assert "| net.0 | 16 x 8 | 3 | 0.0123 | 144 -> 88 | yes |" in table
    assert "| net.2 | 4 x 16 |  | 0.0000 | 68 -> 68 | no: no saving |" in table
    assert "*kept rank*" in table and "utilized rank" in table
    at_swap = tables.compression_markdown(SUMMARY_OF_COMPRESSION, at="swap", step=40, epoch=3)
    assert at_swap.startswith("**Compression** (whiten) at the swap, when epoch 3 starts (step 40): 1 layers")
    assert "| value | 0.9 | 0.7 | at the end of fit |" in at_swap


def test_kept_ratios_before_the_last_step_of_a_schedule():
    steps = [{**SUMMARY_OF_COMPRESSION, "epoch": 2},
             {**SUMMARY_OF_COMPRESSION, "epoch": 4, "params_before": 400, "params_after": 200, "macs_before": 500.0,
              "macs_after": 400.0}]
    summary = {**steps[-1], "params_before": 1000, "macs_before": 2000.0, "steps": steps}
    assert tag_names.kept_ratios(summary) == {"0_rank_summary/params_ratio": 0.2, "0_rank_summary/multiply_adds_ratio": 0.2}
    assert tag_names.kept_ratios(tag_names.before_last_step(summary)) == {
        "0_rank_summary/params_ratio": 0.4, "0_rank_summary/multiply_adds_ratio": 0.25}
    assert tag_names.before_last_step(SUMMARY_OF_COMPRESSION) is None  # one step: before it, the dense model
    assert tables.compression_markdown(summary, at="swap").startswith("**Compression step 2** (whiten) at the swap")


# -- real runs, read back with TensorBoard's reader ------------------------------------------------------
def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 8, generator=g) * torch.logspace(0, -3, 8)  # a decaying spectrum: ranks below full
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16), DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16)


def fit(tmp_path, callbacks, max_epochs: int = 2, loggers=None) -> tuple[L.Trainer, TensorBoardLogger]:
    torch.manual_seed(0)
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, max_epochs, callbacks, logger=[tb, *(loggers or [])], enable_checkpointing=False,
                           num_sanity_val_steps=2)
    trainer.fit(Blocks(log_train_loss=True), *loaders())
    return trainer, tb


def rank_tags(run: Events) -> list[str]:
    return [t for t in run.tags("scalars") if t.startswith(("0_rank_summary/", "rank"))]


def test_default_run_summary_first_one_scalar_per_layer_labelled_heatmap(tmp_path, monkeypatch):
    monkeypatch.setattr(monitor_module, "_clock", lambda: 0.0)  # a fit far shorter than its figures' budget needs
    csv = CSVLogger(tmp_path, name="csv")
    monitor = lr.RankMonitor()
    _, tb = fit(tmp_path, [monitor], loggers=[csv])
    run = Events(tb.log_dir)

    # Default scalars: two headline tags, then exactly one per layer (no in/out ranks, no histograms).
    assert sorted(rank_tags(run)) == sorted(SUMMARY + [f"rank/utilization/{n}" for n in BLOCKS_LAYERS])
    assert run.tags("histograms") == []
    steps = [h["step"] for h in monitor.history]
    for name in BLOCKS_LAYERS:
        points = run.scalars(f"rank/utilization/{name}")
        assert [step for step, _ in points] == steps
        assert [v for _, v in points] == pytest.approx([h["report"]["layers"][name]["utilization"] for h in monitor.history])
    assert [v for _, v in run.scalars("0_rank_summary/mlu")] == pytest.approx([h["report"]["mlu"] for h in monitor.history])
    assert "Mean Layer Utilization" in run.description("0_rank_summary/mlu")
    assert "min(out, in)" in run.description("rank/utilization/head")

    # The headline group sorts first among every tag the run wrote, the user's own included, in the Time
    # Series (and Images) order and in the legacy Scalars/Text order; within it the MLU comes first.
    every_tag = run.tags("scalars") + run.tags("images") + run.tags("text")
    assert {"epoch", "train_loss", "val_loss", "val_acc"} <= set(every_tag)
    for legacy in (False, True):
        assert groups_in_order(every_tag, legacy)[0] == "0_rank_summary"
        assert tensorboard_order(run.tags("scalars"), legacy)[:2] == SUMMARY

    # The heatmap is a labelled figure, as wide as layer names and a colour bar need. The figures would not fit
    # in 1% of this fit's time, so they are drawn once, for the last epoch, at the end.
    heatmaps = run.images("0_rank_summary/utilization_heatmap")
    assert [step for step, *_ in heatmaps] == steps[-1:]
    width, height = figures.heatmap_image(monitor.history).size
    assert heatmaps[-1][1:] == (width, height) and width >= 700
    assert "Rows: layers" in run.description("0_rank_summary/utilization_heatmap")
    assert run.tags("images") == ["0_rank_summary/utilization_heatmap", "rank_energy/(top level)",
                                  "rank_energy/blocks.0", "rank_energy/blocks.1"]
    assert run.text("rank/report")[-1] == (steps[-1], monitor.report.to_markdown())

    layout = run.layout()
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["blocks.0: 0, 2"] == [r"^rank/utilization/blocks\.0\.0$", r"^rank/utilization/blocks\.0\.2$"]
    assert charts["blocks.*.0 in blocks.0, blocks.1"] == [r"^rank/utilization/blocks\.0\.0$", r"^rank/utilization/blocks\.1\.0$"]

    # Other loggers get the same scalars by the same names.
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert set(SUMMARY + [f"rank/utilization/{n}" for n in BLOCKS_LAYERS]) <= set(header)
    assert not [c for c in header if "in_rank" in c or "out_rank" in c]


def test_opt_in_views_and_none(tmp_path):
    _, tb = fit(tmp_path / "all", [lr.RankMonitor(views=tag_names.VIEWS)], max_epochs=1)
    run = Events(tb.log_dir)
    tags = rank_tags(run)
    for name in BLOCKS_LAYERS:
        assert {f"rank_detail/in_rank/{name}", f"rank_detail/out_rank/{name}"} <= set(tags)
        assert len(run.histograms(f"rank_detail/spectrum/{name}")) == 1
    assert "out rank" in run.description("rank_detail/out_rank/head").lower()
    assert len(tags) == 2 + 3 * len(BLOCKS_LAYERS)

    _, tb = fit(tmp_path / "none", [lr.RankMonitor(views=())], max_epochs=1)
    run = Events(tb.log_dir)
    assert run.tags("images") == [] and run.tags("histograms") == [] and run.tags("text") == []
    assert len(rank_tags(run)) == 2 + len(BLOCKS_LAYERS)


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compressed")
    monitor = lr.RankMonitor()
    compression = lr.RankCompression(compress_at_epoch=1, ranks=2, monitor="val_acc", exclude_modules=["head"])
    trainer, tb = fit(tmp_path, [monitor, compression], max_epochs=2)
    return monitor, compression, Events(tb.log_dir)


def test_compression_results_at_the_swap_step_and_at_the_end(compressed_run):
    monitor, compression, run = compressed_run
    summary = compression.summary()
    assert [bool(h["factorized"]) for h in monitor.history] == [False, True]  # {name: rank} of the low-rank layers
    assert not [t for t in run.tags("scalars") if t.startswith("compression")]
    # 4 training steps an epoch: the swap happens when epoch 1 starts, at global step 4; fit ends at step 8.
    swap, end = 4, 8
    assert [step for step, _ in run.scalars("epoch")][-1] == end - 1
    metrics, monitor_tag = summary["metrics"], "0_rank_summary/val_acc_change"
    kept = summary["params_after"] / summary["params_before"]
    assert 0 < kept < 1
    # The swap-marking lines: 1 while dense from the first step, at the step before the swap too, then the kept share.
    assert run.scalars("0_rank_summary/params_ratio") == [(0, 1.0), (swap - 1, 1.0), (swap, pytest.approx(kept)),
                                                          (end, pytest.approx(kept))]
    macs = summary["macs_after"] / summary["macs_before"]
    assert run.scalars("0_rank_summary/multiply_adds_ratio") == [(0, 1.0), (swap - 1, 1.0), (swap, pytest.approx(macs)),
                                                                 (end, pytest.approx(macs))]
    # The metric's change: right after the swap at its step, after fine-tuning at the end.
    assert run.scalars(monitor_tag) == [
        (swap, pytest.approx(metrics["compressed"] - metrics["before"], abs=1e-6)),
        (end, pytest.approx(metrics["finetuned"] - metrics["before"], abs=1e-6)),
    ]
    assert "right after the swap" in run.description(monitor_tag)
    assert "drops at the global step of each swap" in run.description("0_rank_summary/params_ratio")
    # The table: as known at the swap (fine-tuned to follow), then complete at the end.
    (at_swap, swap_table), (at_end, end_table) = run.text("0_rank_summary/compression")
    assert (at_swap, at_end) == (swap, end)
    assert swap_table == tables.compression_markdown(summary, at="swap", step=swap, epoch=1)
    assert "at the swap, when epoch 1 starts (step 4)" in swap_table and "| at the end of fit |" in swap_table
    assert end_table == tables.compression_markdown(summary, step=end)
    assert f"| parameters | {summary['params_before']:,} | {summary['params_after']:,} |" in end_table
    for name, rank in summary["layers"].items():
        assert f"| {name} | " in end_table and f"| {rank} | " in end_table
    assert groups_in_order(run.tags("scalars") + run.tags("text"))[0] == "0_rank_summary"
    # The monitor's layout charts the swap-marking lines beside the MLU.
    (mlu_chart,) = [chart for category in run.layout().category for chart in category.chart if "MLU" in chart.title]
    assert r"^0_rank_summary/params_ratio$" in mlu_chart.multiline.tag


def test_other_loggers_get_the_swap_marking_lines_too(tmp_path):
    csv = CSVLogger(tmp_path, name="csv")
    compression = lr.RankCompression(compress_at_epoch=1, ranks=2, monitor="val_acc", exclude_modules=["head"])
    fit(tmp_path, [compression], max_epochs=2, loggers=[csv])
    rows = list(csv_rows(tmp_path / "csv" / "version_0" / "metrics.csv", "0_rank_summary/params_ratio"))
    kept = compression.result.params_after / compression.result.params_before
    assert rows == [(0, 1.0), (3, 1.0), (4, pytest.approx(kept)), (8, pytest.approx(kept))]


def csv_rows(path, column: str):
    import csv

    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get(column):
                yield int(row["step"]), float(row[column])


def test_a_factorized_layer_keeps_one_curve_across_the_swap(compressed_run):
    monitor, compression, run = compressed_run
    steps = [h["step"] for h in monitor.history]
    assert not [t for t in run.tags("scalars") if t.endswith((".first", ".second"))]
    for name in compression.summary()["layers"]:
        assert [step for step, _ in run.scalars(f"rank/utilization/{name}")] == steps  # before and after the swap


# -- when the figures are drawn ------------------------------------------------------------------------
FIGURES = ["0_rank_summary/utilization_heatmap", "rank_energy/(top level)", "rank_energy/blocks.0", "rank_energy/blocks.1"]


def image_steps(run: Events) -> dict[str, list[int]]:
    return {tag: [step for step, *_ in run.images(tag)] for tag in FIGURES}


def test_figures_within_their_budget_of_the_run_and_always_at_the_end(tmp_path, monkeypatch):
    # Drawing takes 1 s, an epoch 10 s, the budget 5%: a drawing is due once 20 s passed since the last one.
    # Before the first drawing its cost is taken as FIGURE_SECONDS a figure: 0.04 s, within 5% of one epoch.
    clock = FakeClock(monkeypatch, epoch_seconds=10.0)
    clock.slow(writers, "write_heatmap", 1.0)
    monitor = lr.RankMonitor(figure_budget=0.05)
    _, tb = fit(tmp_path, [monitor, clock.callback], max_epochs=6)
    run = Events(tb.log_dir)
    steps = [h["step"] for h in monitor.history]
    assert [h["epoch"] for h in monitor.history] == list(range(6))
    drawn = [steps[0], steps[2], steps[4], steps[5]]  # the first, every other one, and the last at the end of fit
    assert image_steps(run) == {tag: drawn for tag in FIGURES}
    assert [step for step, _ in run.scalars("0_rank_summary/mlu")] == steps  # scalars and table every epoch
    assert [step for step, _ in run.text("rank/report")] == steps
    assert run.images(FIGURES[0])[-1][1:] == figures.heatmap_image(monitor.history).size  # every epoch's column

    clock = FakeClock(monkeypatch, epoch_seconds=10.0)
    clock.slow(writers, "write_heatmap", 0.4)  # now 0.4 s <= 5% of 10 s: every epoch
    monitor = lr.RankMonitor(figure_budget=0.05)
    _, tb = fit(tmp_path / "cheap", [monitor, clock.callback], max_epochs=3)
    assert image_steps(Events(tb.log_dir)) == {tag: [h["step"] for h in monitor.history] for tag in FIGURES}


def test_figure_budget_none_draws_every_analyzed_epoch_and_validate_always_draws(tmp_path, monkeypatch):
    FakeClock(monkeypatch).slow(writers, "write_heatmap", 100.0)  # figures far over any budget
    monitor = lr.RankMonitor(figure_budget=None)
    trainer, tb = fit(tmp_path, [monitor], max_epochs=3)
    assert image_steps(Events(tb.log_dir)) == {tag: [h["step"] for h in monitor.history] for tag in FIGURES}

    budgeted = lr.RankMonitor()  # no time passes on the clock: only the end of fit can draw
    trainer, tb = fit(tmp_path / "budgeted", [budgeted], max_epochs=3)
    steps = [h["step"] for h in budgeted.history]
    assert image_steps(Events(tb.log_dir)) == {tag: [steps[2]] for tag in FIGURES}
    trainer.validate(trainer.lightning_module, loaders()[1], verbose=False)  # a validate run is its own end
    assert image_steps(Events(tb.log_dir))[FIGURES[0]] == [steps[2], steps[2]]
    assert len(budgeted.history) == 4


def test_an_interrupted_fit_still_draws_its_last_analyzed_epoch(tmp_path, monkeypatch):
    FakeClock(monkeypatch).slow(writers, "write_heatmap", 100.0)

    class Stop(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                raise RuntimeError("stop here")

    monitor = lr.RankMonitor()
    with pytest.raises(RuntimeError, match="stop here"):
        fit(tmp_path, [monitor, Stop()], max_epochs=4)
    steps = [h["step"] for h in monitor.history]
    assert len(steps) == 2
    assert image_steps(Events(tmp_path / "tb" / "version_0")) == {tag: steps[1:] for tag in FIGURES}


@pytest.mark.parametrize("budget", [0, 1.5, -0.1, True, "0.1"])
def test_figure_budget_is_checked(budget):
    with pytest.raises(ValueError, match=r"`figure_budget` must be a fraction in \(0, 1\]"):
        lr.RankMonitor(figure_budget=budget)
