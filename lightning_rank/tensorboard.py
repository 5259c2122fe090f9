"""TensorBoard views of rank reports: a custom-scalars layout, a utilization heatmap, spectra and tables.

Pure writers: each takes a ``SummaryWriter`` (e.g. ``TensorBoardLogger.experiment``) and plain data, and
knows nothing of Lightning. Scalars themselves are logged elsewhere as ``<prefix>/utilization/<layer>``
etc.; these functions only add what plain scalars cannot show.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_rank.report import RankReport

# Three stops of the viridis colormap: utilization 0 (dark purple), 0.5 (teal), 1 (yellow).
_RAMP = np.array([[68, 1, 84], [33, 145, 140], [253, 231, 37]], dtype=np.float64)
_MISSING = np.array([128, 128, 128], dtype=np.uint8)  # a layer skipped, or absent that epoch


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


def group_layers(names: Sequence[str], key: Any = layer_group) -> dict[str, list[str]]:
    """``names`` grouped by ``key(name)``, groups and members in first-seen order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(key(name), []).append(name)
    return groups


def utilization_layout(layers: Sequence[str], prefix: str = "rank") -> dict[str, dict[str, list]]:
    """A custom-scalars layout: the MLU, every layer's utilization by block, and by role across blocks.

    Charts are ``Multiline`` over anchored tag regexes, so ``fc1`` never collects ``fc10``. The role
    category is added only when some role spans several blocks.
    """

    def tags(names: Sequence[str]) -> list[str]:
        return [f"^{re.escape(f'{prefix}/utilization/{name}')}$" for name in names]

    layout = {
        "lightning_rank": {
            "mean layer utilization": ["Multiline", [f"^{re.escape(prefix)}/(weighted_)?mlu$"]],
        },
        "rank utilization by block": {
            group: ["Multiline", tags(members)] for group, members in group_layers(layers, layer_group).items()
        },
    }
    roles = {role: members for role, members in group_layers(layers, layer_role).items() if len(members) > 1}
    if roles:
        layout["rank utilization by layer role"] = {role: ["Multiline", tags(members)] for role, members in roles.items()}
    return layout


def write_layout(writer: Any, layers: Sequence[str], prefix: str = "rank") -> None:
    """Write :func:`utilization_layout` (once per writer: TensorBoard keeps one layout per run)."""
    writer.add_custom_scalars(utilization_layout(layers, prefix))


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


def heatmap_image(matrix: np.ndarray, cell: int = 8) -> np.ndarray:
    """``matrix`` (values in [0, 1], NaN for missing) as an RGB uint8 image ``(H, W, 3)``, ``cell`` pixels a value."""
    values = np.clip(np.nan_to_num(matrix, nan=0.0), 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(values.astype(np.int64), len(_RAMP) - 2)
    frac = (values - low)[..., None]
    image = (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).round().astype(np.uint8)
    image[np.isnan(matrix)] = _MISSING
    return image.repeat(cell, axis=0).repeat(cell, axis=1)


def write_heatmap(
    writer: Any, reports: Sequence[Mapping[str, Any]], step: int, tag: str = "rank/utilization_heatmap", cell: int = 8
) -> list[str]:
    """An image of utilization, one row per layer and one column per report (oldest left); returns the row names.

    Colors follow viridis from 0 (dark) to 100% (yellow); gray marks a layer skipped or absent.
    """
    names, matrix = utilization_matrix(reports)
    if names:
        writer.add_image(tag, heatmap_image(matrix, cell), step, dataformats="HWC")
    return names


def write_spectra(writer: Any, spectra: Mapping[str, Tensor], step: int, prefix: str = "rank") -> None:
    """One histogram per layer of ``log10`` of each nonzero eigenvalue's share of the trace of its input moment."""
    for name, eigenvalues in spectra.items():
        values = eigenvalues.detach().double().cpu()
        values = values[values > 0]
        if values.numel():
            writer.add_histogram(f"{prefix}/spectrum/{name}", (values / values.sum()).log10().numpy(), step)


def cumulative_energy(eigenvalues: Tensor) -> Tensor:
    """The share of the trace held by the top-``k`` eigenvalues, for ``k = 1..dim`` (all zeros for a zero matrix)."""
    values = eigenvalues.detach().double().cpu().clamp(min=0).sort(descending=True).values
    total = values.sum()
    return values.cumsum(0) / total if total > 0 else torch.zeros_like(values)


def energy_figure(spectra: Mapping[str, Tensor], threshold: float, title: str = "") -> Any:
    """A matplotlib figure of the cumulative-energy curves of ``spectra`` against ``k / dim``, with the threshold."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=80)
    axes = figure.add_subplot()
    for name, eigenvalues in spectra.items():
        curve = cumulative_energy(eigenvalues).numpy()
        axes.plot(np.arange(1, len(curve) + 1) / max(len(curve), 1), curve, label=name, linewidth=1.2)
    axes.axhline(threshold, color="black", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
    axes.set(xlabel="top-k eigenvalues / dim", ylabel="cumulative energy", xlim=(0, 1), ylim=(0, 1.02), title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small", loc="lower right")
    figure.tight_layout()
    return figure


def write_energy_curves(
    writer: Any, spectra: Mapping[str, Tensor], threshold: float, step: int, prefix: str = "rank"
) -> bool:
    """One cumulative-energy figure per block (:func:`layer_group`); ``False`` when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    for group, names in group_layers(list(spectra), layer_group).items():
        figure = energy_figure({name: spectra[name] for name in names}, threshold, title=group)
        writer.add_figure(f"{prefix}/energy/{group}", figure, step, close=True)
    return True


def write_report_text(writer: Any, report: RankReport, step: int, tag: str = "rank/report") -> None:
    """The report as a markdown table in TensorBoard's text tab."""
    writer.add_text(tag, report.to_markdown(), step)
