"""TensorBoard views of rank reports: headline scalars, a custom-scalars layout, labelled figures and tables.

Pure writers: each takes a ``SummaryWriter`` (e.g. ``TensorBoardLogger.experiment``) and plain data, and
knows nothing of Lightning. Names are chosen for how TensorBoard sorts them: it orders tag groups (the
part before the first ``/``) with a natural sort in which digits come before every letter, so the
headline group ``0_rank_summary`` is listed first in the Time Series, Scalars, Images and Text tabs.
Every scalar, histogram and image carries a description (summary metadata) saying what it and its axes
mean; the legacy Scalars, Images and Histograms tabs show it under the card's info icon.

The figures (heatmap, cumulative energy) are drawn with Pillow (:mod:`lightning_rank.drawing`), a few
milliseconds each, so they need no matplotlib and cost the fit next to nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor

from lightning_rank import drawing
from lightning_rank.report import RankReport

SUMMARY_GROUP = "0_rank_summary"
MLU_TAG = f"{SUMMARY_GROUP}/mlu"
WEIGHTED_MLU_TAG = f"{SUMMARY_GROUP}/mlu_weighted"
PARAMS_RATIO_TAG = f"{SUMMARY_GROUP}/params_ratio"
MACS_RATIO_TAG = f"{SUMMARY_GROUP}/multiply_adds_ratio"
HEATMAP_TAG = f"{SUMMARY_GROUP}/utilization_heatmap"
COMPRESSION_TEXT_TAG = f"{SUMMARY_GROUP}/compression"
UTILIZATION_PREFIX = "rank/utilization"
REPORT_TEXT_TAG = "rank/report"
ENERGY_PREFIX = "rank_energy"
IN_RANK_PREFIX = "rank_detail/in_rank"
OUT_RANK_PREFIX = "rank_detail/out_rank"
SPECTRUM_PREFIX = "rank_detail/spectrum"

#: What ``RankMonitor(views=...)`` may name. The headline scalars and one utilization scalar per layer are
#: always logged; ``ranks`` adds each layer's in/out rank scalars, ``spectra`` eigenvalue histograms.
VIEWS = ("heatmap", "energy", "table", "ranks", "spectra")
DEFAULT_VIEWS = ("heatmap", "energy", "table")

#: TensorBoard's custom-scalars charts colour lines by run and mark a run's tags with these five symbols
#: (square, diamond, triangle, star, cross) in turn, so a chart of at most five tags of one run has
#: lines that can be told apart.
MAX_LINES_PER_CHART = 5

_UTILIZATION = "utilization = utilized rank / min(out, in), where the utilized rank is min(in rank, out rank)"
_AXES = "x: training step of the analyzed validation epoch"


def check_views(views: str | Iterable[str]) -> tuple[str, ...]:
    """``views`` as a tuple of known view names, or a clear ``TypeError``/``ValueError`` naming the argument."""
    if isinstance(views, str):
        views = (views,)
    try:
        names = tuple(views)
    except TypeError:
        raise TypeError(f"`views` must be a collection of view names from {VIEWS}, got {views!r}") from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"`views` must hold view names (str) from {VIEWS}, got {name!r}")
        if name not in VIEWS:
            raise ValueError(f"`views` got an unknown view {name!r}; choose from {VIEWS} (default {DEFAULT_VIEWS})")
    return tuple(dict.fromkeys(names))


# -- names ------------------------------------------------------------------------------------
def layer_group(name: str) -> str:
    """The block a layer belongs to: its name up to the last numeric part above the layer, else its parent.

    ``"blocks.3.attn.q"`` -> ``"blocks.3"``, ``"layer1.0.conv1"`` -> ``"layer1.0"``, ``"net.2"`` -> ``"net"``.
    """
    parts = name.split(".")[:-1]
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    if numeric:
        parts = parts[: numeric[-1] + 1]
    return ".".join(parts) or "(top level)"


def layer_role(name: str) -> str:
    """The layer's place in its block, the same in every block: ``"blocks.3.attn.q"`` -> ``"blocks.*.attn.q"``."""
    parts = name.split(".")
    return ".".join(["*" if part.isdigit() else part for part in parts[:-1]] + parts[-1:])


def group_layers(names: Sequence[str], key: Callable[[str], str] = layer_group) -> dict[str, list[str]]:
    """``names`` grouped by ``key(name)``, groups and members in first-seen order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(key(name), []).append(name)
    return groups


def describe(tag: str) -> str | None:
    """The TensorBoard description of one of this module's tags (None for tags it does not write)."""
    layer = tag.rpartition("/")[2]
    if tag == MLU_TAG:
        return (f"Mean Layer Utilization (MLU): the mean over analyzed layers of {_UTILIZATION}. "
                f"y: 0 to 1 (1: every layer uses all of its space). {_AXES}.")
    if tag == WEIGHTED_MLU_TAG:
        return f"MLU weighted by each layer's parameter count. y: 0 to 1. {_AXES}."
    if tag == PARAMS_RATIO_TAG:
        return "Parameters of the whole model after compression / before (one point, at the end of fit)."
    if tag == MACS_RATIO_TAG:
        return "Multiply-adds per example of the whole model after compression / before (one point, at the end of fit)."
    if tag.startswith(f"{SUMMARY_GROUP}/") and tag.endswith("_change"):
        return "The monitored metric after fine-tuning minus before compression (one point, at the end of fit)."
    if tag.startswith(f"{UTILIZATION_PREFIX}/"):
        return f"Utilization of layer {layer}: {_UTILIZATION}. y: 0 to 1. {_AXES}."
    if tag.startswith(f"{IN_RANK_PREFIX}/"):
        return (f"In rank of layer {layer}: how many eigenvalues of its input second moment hold the energy "
                f"threshold's share of the trace. y: a count, at most the input size. {_AXES}.")
    if tag.startswith(f"{OUT_RANK_PREFIX}/"):
        return (f"Out rank of layer {layer}: the same count for its output second moment. "
                f"y: a count, at most the output size. {_AXES}.")
    if tag.startswith(f"{SPECTRUM_PREFIX}/"):
        return (f"Eigenvalues of layer {layer}'s input second moment, each as log10 of its share of the trace. "
                "x: log10 share (0 = all the energy, -3 = a thousandth); y: how many eigenvalues.")
    if tag == HEATMAP_TAG:
        return (f"Rows: layers (top row: the MLU); columns: analyzed validation epochs; colour: {_UTILIZATION}. "
                "A dashed line marks where the model was compressed.")
    if tag.startswith(f"{ENERGY_PREFIX}/"):
        return ("Cumulative energy of each layer's input: x: the top-k eigenvalues as a fraction of the input size; "
                "y: their share of the trace. The dashed line is the energy threshold: a curve that reaches it "
                "early uses few input directions.")
    return None


# -- writing with descriptions ----------------------------------------------------------------
def _write(writer: Any, value: Summary.Value, step: int) -> None:
    writer._get_file_writer().add_summary(Summary(value=[value]), step)


def write_scalars(writer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Write ``metrics`` as scalars with their descriptions.

    In TensorBoard's tensor form: its data server drops the description of the older ``simple_value`` form
    that ``SummaryWriter.add_scalar`` writes.
    """
    from tensorboard.plugins.scalar.summary_v2 import scalar_pb

    for tag, value in metrics.items():
        (proto,) = scalar_pb(tag, float(value), description=describe(tag)).value
        _write(writer, proto, step)


def write_image(writer: Any, tag: str, image: np.ndarray | Image.Image, step: int) -> None:
    """Write an image (Pillow, or an RGB ``(H, W, 3)`` uint8 array) with its description, as the tensor
    ``[width, height, png]`` TensorBoard's image plugin reads."""
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.image.metadata import create_summary_metadata

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    tensor = TensorProto(dtype="DT_STRING", tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=3)]),
                         string_val=[str(image.width).encode(), str(image.height).encode(), drawing.png_bytes(image)])
    metadata = create_summary_metadata(display_name=tag, description=describe(tag) or "")
    _write(writer, Summary.Value(tag=tag, metadata=metadata, tensor=tensor), step)


# -- the custom-scalars layout ----------------------------------------------------------------
def _chunks(items: Sequence[str], most: int = MAX_LINES_PER_CHART) -> list[Sequence[str]]:
    """``items`` in order, cut into the fewest runs of at most ``most``, as even as possible (6 -> 3 + 3)."""
    size = math.ceil(len(items) / math.ceil(len(items) / most)) if items else most
    return [items[i : i + size] for i in range(0, len(items), size)]


def utilization_layout(layers: Sequence[str]) -> dict[str, dict[str, list]]:
    """A custom-scalars layout: the MLU, every layer's utilization by block, and by role across blocks.

    Charts are ``Multiline`` over anchored tag regexes (so ``fc1`` never collects ``fc10``), with at most
    :data:`MAX_LINES_PER_CHART` lines each, so every line of a chart has its own marker symbol; titles
    name the lines. The role category is added only when some role spans several blocks.
    """

    def tags(names: Sequence[str]) -> list[str]:
        return [f"^{re.escape(f'{UTILIZATION_PREFIX}/{name}')}$" for name in names]

    def short(name: str, group: str) -> str:
        return name[len(group) + 1 :] if name.startswith(f"{group}.") else name

    by_block: dict[str, list] = {}
    for group, members in group_layers(layers, layer_group).items():
        for chunk in _chunks(members):
            by_block[f"{group}: {', '.join(short(m, group) for m in chunk)}"] = ["Multiline", tags(chunk)]
    layout = {
        "lightning-rank summary": {
            "mean layer utilization (MLU) and parameter-weighted MLU": [
                "Multiline", [f"^{re.escape(MLU_TAG)}$", f"^{re.escape(WEIGHTED_MLU_TAG)}$"]
            ],
        },
        "utilization by block": by_block,
    }
    roles = {role: members for role, members in group_layers(layers, layer_role).items() if len(members) > 1}
    if roles:
        layout["utilization by layer role"] = {
            f"{role} in {', '.join(layer_group(m) for m in chunk)}": ["Multiline", tags(chunk)]
            for role, members in roles.items()
            for chunk in _chunks(members)
        }
    return layout


def write_layout(writer: Any, layers: Sequence[str]) -> None:
    """Write :func:`utilization_layout`; TensorBoard shows the latest layout a run wrote."""
    writer.add_custom_scalars(utilization_layout(layers))


# -- the utilization heatmap ------------------------------------------------------------------
def utilization_matrix(reports: Sequence[Mapping[str, Any]]) -> tuple[list[str], np.ndarray]:
    """Layer names (first-seen order) and their utilization per report, ``(layers, reports)``; NaN where missing.

    ``reports`` are :meth:`RankReport.to_dict` outputs, oldest first.
    """
    names: dict[str, None] = {}
    for report in reports:
        names.update(dict.fromkeys(report["layers"]))
    rows = {name: i for i, name in enumerate(names)}
    matrix = np.full((len(rows), len(reports)), np.nan)
    for column, report in enumerate(reports):
        for name, layer in report["layers"].items():
            if layer.get("utilization") is not None:
                matrix[rows[name], column] = layer["utilization"]
    return list(names), matrix


def compression_column(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The index of the first history entry measured on a factorized model after one measured dense, else None."""
    for i in range(1, len(history)):
        if history[i].get("factorized") and not history[i - 1].get("factorized"):
            return i
    return None


def heatmap_image(history: Sequence[Mapping[str, Any]], title: str = "") -> Image.Image:
    """A labelled image of utilization: layers x analyzed epochs, with the MLU as the top row.

    ``history`` holds ``RankMonitor.history`` entries (``{"epoch", "report", "factorized"?}``), oldest
    first. Cells show their value in percent when there is room; grey marks a layer skipped or absent that
    epoch; a dashed red line marks the compression (:func:`compression_column`); a colour bar gives the scale.
    """
    reports = [entry["report"] for entry in history]
    names, matrix = utilization_matrix(reports)
    mlu = np.array([np.nan if r.get("mlu") is None else r["mlu"] for r in reports], dtype=np.float64)
    return drawing.heatmap_image(
        np.vstack([mlu[None, :], matrix]),
        ["MLU (mean)", *names],
        [str(entry.get("epoch", i)) for i, entry in enumerate(history)],
        title=title or "utilization per layer (utilized rank / min(out, in)), %",
        xlabel="epoch (analyzed validation)",
        swap=compression_column(history),
    )


def write_heatmap(writer: Any, history: Sequence[Mapping[str, Any]], step: int, tag: str = HEATMAP_TAG) -> bool:
    """Write :func:`heatmap_image`; ``False`` (nothing written) without history."""
    if not history:
        return False
    write_image(writer, tag, heatmap_image(history), step)
    return True


# -- spectra ----------------------------------------------------------------------------------
def write_spectra(writer: Any, spectra: Mapping[str, Tensor], step: int, buckets: int = 30) -> None:
    """One histogram per layer of ``log10`` of each nonzero eigenvalue's share of the trace of its input moment."""
    from tensorboard.plugins.histogram.summary_v2 import histogram_pb

    for name, eigenvalues in spectra.items():
        values = eigenvalues.detach().double().cpu()
        values = values[values > 0]
        if values.numel():
            tag = f"{SPECTRUM_PREFIX}/{name}"
            shares = (values / values.sum()).log10().numpy()
            (proto,) = histogram_pb(tag, shares, buckets=buckets, description=describe(tag)).value
            _write(writer, proto, step)


def cumulative_energy(eigenvalues: Tensor) -> Tensor:
    """The share of the trace held by the top-``k`` eigenvalues, for ``k = 1..dim`` (all zeros for a zero matrix)."""
    values = eigenvalues.detach().double().cpu().clamp(min=0).sort(descending=True).values
    total = values.sum()
    return values.cumsum(0) / total if total > 0 else torch.zeros_like(values)


def energy_image(spectra: Mapping[str, Tensor], threshold: float, title: str = "") -> Image.Image:
    """Cumulative-energy curves of ``spectra`` against ``k / dim``, the threshold, and a legend beside the axes.

    Up to 10 curves get tab10's colours, up to 20 tab20's; beyond that dash patterns repeat the colours.
    """
    curves = {f"{name} ({len(values)})": cumulative_energy(values).numpy() for name, values in spectra.items()}
    return drawing.curves_image(
        curves, threshold, title=title, xlabel="top-k eigenvalues / input size",
        ylabel="share of the input's energy", legend_title="layer (input size)",
    )


def write_energy_curves(
    writer: Any, spectra: Mapping[str, Tensor], threshold: float, step: int, epoch: int | None = None
) -> None:
    """One cumulative-energy image per block (:func:`layer_group`)."""
    when = f"epoch {epoch}" if epoch is not None else f"step {step}"
    for group, names in group_layers(list(spectra), layer_group).items():
        title = f"{group}: cumulative energy of each layer's input ({when})"
        image = energy_image({name: spectra[name] for name in names}, threshold, title=title)
        write_image(writer, f"{ENERGY_PREFIX}/{group}", image, step)


def write_report_text(writer: Any, report: RankReport, step: int, tag: str = REPORT_TEXT_TAG) -> None:
    """The report as a markdown table in TensorBoard's text tab."""
    writer.add_text(tag, report.to_markdown(), step)


# -- compression results ----------------------------------------------------------------------
def _ratio(after: float | None, before: float | None) -> float | None:
    return None if after is None or not before else after / before


def compression_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """The headline scalars of a ``RankCompression.summary()``: parameter and multiply-add ratios (after /
    before, whole model) and the monitored metric's change from before compression to after fine-tuning.
    Figures that were not measured are left out."""
    metrics = summary.get("metrics", {})
    before, finetuned = metrics.get("before"), metrics.get("finetuned")
    change = None if before is None or finetuned is None else finetuned - before
    monitor = summary.get("monitor") or "metric"
    scalars = {
        PARAMS_RATIO_TAG: _ratio(summary.get("params_after"), summary.get("params_before")),
        MACS_RATIO_TAG: _ratio(summary.get("macs_after"), summary.get("macs_before")),
        f"{SUMMARY_GROUP}/{monitor}_change": change,
    }
    return {tag: float(v) for tag, v in scalars.items() if v is not None and math.isfinite(v)}


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _number(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def compression_markdown(summary: Mapping[str, Any]) -> str:
    """One table of what compression did: model totals, the metric at three points, and every selected layer."""
    metrics = summary.get("metrics", {})
    monitor = summary.get("monitor") or "metric"

    def row(label: str, before: float | None, after: float | None) -> str:
        ratio = _ratio(after, before)
        return f"| {label} | {_count(before)} | {_count(after)} | {'n/a' if ratio is None else f'{100 * ratio:.1f}%'} |"

    method = summary.get("method")
    lines = [
        f"**Compression**{f' ({method})' if method else ''}: {len(summary.get('layers', {}))} layers replaced.",
        "",
        "| whole model | before | after | after / before |",
        "|---|---:|---:|---:|",
        row("parameters", summary.get("params_before"), summary.get("params_after")),
        row("multiply-adds per example", summary.get("macs_before"), summary.get("macs_after")),
        "",
        f"| {monitor} | before | compressed | fine-tuned |",
        "|---|---:|---:|---:|",
        f"| value | {_number(metrics.get('before'))} | {_number(metrics.get('compressed'))} | "
        f"{_number(metrics.get('finetuned'))} |",
        "",
        "| layer | out x in | rank | rel. output error | parameters | replaced |",
        "|---|---|---:|---:|---:|---|",
    ]
    details = summary.get("details") or {name: {"rank": rank, "replaced": True} for name, rank in summary.get("layers", {}).items()}
    for name, d in details.items():
        shape = "" if d.get("out_features") is None else f"{d['out_features']} x {d['in_features']}"
        error = d.get("relative_error")
        params = "" if d.get("params_before") is None else f"{d['params_before']:,} -> {d['params_after']:,}"
        replaced = "yes" if d.get("replaced") else f"no: {d.get('reason')}"
        rank = "" if d.get("rank") is None else d["rank"]
        lines.append(f"| {name} | {shape} | {rank} | {'n/a' if error is None else f'{error:.4f}'} | {params} | {replaced} |")
    return "\n".join(lines) + "\n"


def write_compression(writer: Any, summary: Mapping[str, Any], step: int) -> None:
    """Write :func:`compression_scalars` (with descriptions) and :func:`compression_markdown` as text."""
    write_scalars(writer, compression_scalars(summary), step)
    writer.add_text(COMPRESSION_TEXT_TAG, compression_markdown(summary), step)
    writer.flush()
