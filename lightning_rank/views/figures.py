"""The labelled figures of rank reports, as Pillow images: the utilization heatmap and cumulative-energy curves.

Drawn with :mod:`~lightning_rank.views.drawing` in a few milliseconds each, so they need no matplotlib and
cost a fit next to nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lightning_rank.spectral.spectrum import energy_rank
from lightning_rank.views import drawing


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

def compression_columns(history: Sequence[Mapping[str, Any]]) -> list[int]:
    """The index of every history entry measured right after a compression step: its ``factorized`` is set and
    differs from the entry before (a bool marks the first swap; a ``{name: rank}`` mapping marks every step)."""
    return [i for i in range(1, len(history))
            if history[i].get("factorized") and history[i].get("factorized") != history[i - 1].get("factorized")]


def heatmap_image(history: Sequence[Mapping[str, Any]], title: str = "") -> Image.Image:
    """A labelled image of utilization: layers x analyzed epochs, with the MLU as the top row.

    ``history`` holds ``RankMonitor.history`` entries (``{"epoch", "report", "factorized"?}``), oldest
    first. Cells show their value in percent when there is room; grey marks a layer skipped or absent that
    epoch; a dashed red line marks each compression step (:func:`compression_columns`); a colour bar gives the scale.
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
        swap=compression_columns(history),
    )

def cumulative_energy(eigenvalues: Tensor) -> Tensor:
    """The share of the trace held by the top-``k`` eigenvalues, for ``k = 1..dim`` (all zeros for a zero matrix)."""
    values = eigenvalues.detach().double().cpu().clamp(min=0).sort(descending=True).values
    total = values.sum()
    return values.cumsum(0) / total if total > 0 else torch.zeros_like(values)

def energy_image(spectra: Mapping[str, Tensor], threshold: float, title: str = "") -> Image.Image:
    """Cumulative-energy curves of ``spectra`` against ``k`` on a log axis (1 to the largest input size), the
    threshold, a dot where each curve first reaches it (the layer's in rank), and a legend beside the axes giving
    each layer's in rank of its input size.

    Up to 10 curves get tab10's colours, up to 20 tab20's; beyond that dash patterns repeat the colours.
    """
    curves, marks = {}, {}
    for name, values in spectra.items():
        rank = int(energy_rank(values, threshold))
        label = f"{name}: {rank} of {len(values)}"
        curves[label], marks[label] = cumulative_energy(values).numpy(), rank
    return drawing.curves_image(
        curves, threshold, marks=marks, title=title,
        xlabel="k: the top-k eigenvalues of the input's second moment (log scale)",
        ylabel="their share of the input's energy", legend_title="layer: in rank of input size",
        mark_label="in rank: the first k at the threshold",
    )
