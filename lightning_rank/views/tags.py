"""What the package logs, under which names: tags, their descriptions, the scalars of a report, the layout.

Names are chosen for how TensorBoard sorts them: it orders tag groups (the part before the first ``/``)
with a natural sort in which digits come before every letter, so the headline group ``0_rank_summary``
is listed first in the Time Series, Scalars, Images and Text tabs. Every tag has a description saying
what it and its axes mean (:func:`describe`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lightning_rank.spectral.report import RankReport

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
    if tag in (PARAMS_RATIO_TAG, MACS_RATIO_TAG):
        what = "Parameters" if tag == PARAMS_RATIO_TAG else "Multiply-adds per example"
        return (f"{what} of the whole model / those of the dense model (RankCompression): 1 while dense, logged when "
                "each training epoch starts; it drops at the global step of each swap (the point one step before "
                "holds the value before it) and ends with a point at the end of fit.")
    if tag.startswith(f"{SUMMARY_GROUP}/") and tag.endswith("_change"):
        return ("The monitored metric minus its value before compression: at the step of a swap, right after the swap "
                "(before fine-tuning); at the end of fit, after fine-tuning.")
    if tag.startswith(f"{UTILIZATION_PREFIX}/"):
        return f"Utilization of layer {layer}: {_UTILIZATION}. y: 0 to 1. {_AXES}."
    if tag.startswith(f"{IN_RANK_PREFIX}/"):
        return (f"In rank of layer {layer} (its utilized rank is the smaller of the in and out ranks): how many "
                "eigenvalues of its input second moment hold the energy threshold's share of the trace. "
                f"y: a count, at most the input size. {_AXES}.")
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
        return ("Cumulative energy of each layer's input: x: k, the top-k eigenvalues of its second moment, on a log "
                "scale; y: their share of the trace. The dashed line is the energy threshold; a dot marks where each "
                "curve first reaches it, the layer's in rank (the legend gives it of the input size). A curve that "
                "reaches it early uses few input directions.")
    return None


def report_scalars(report: RankReport, ranks: bool = False) -> dict[str, float]:
    """The scalars logged for ``report``: MLU, weighted MLU and each analyzed layer's utilization; with ``ranks``
    also each layer's in and out rank."""
    metrics = {MLU_TAG: report.mlu, WEIGHTED_MLU_TAG: report.weighted_mlu}
    for name, layer in report.analyzed.items():
        metrics[f"{UTILIZATION_PREFIX}/{name}"] = layer.utilization
    if ranks:
        for name, layer in report.analyzed.items():
            metrics[f"{IN_RANK_PREFIX}/{name}"] = float(layer.in_rank)
            metrics[f"{OUT_RANK_PREFIX}/{name}"] = float(layer.out_rank)
    return metrics


def ratio(after: float | None, before: float | None) -> float | None:
    return None if after is None or not before else after / before

def kept_ratios(summary: Mapping[str, Any] | None) -> dict[str, float]:
    """Parameters and multiply-adds of the whole model / those of the dense model, for the model a
    ``RankCompression.summary()`` describes (after its last step); 1.0 each for the dense model (``None``). Figures
    that were not measured are left out."""
    if summary is None:
        return {PARAMS_RATIO_TAG: 1.0, MACS_RATIO_TAG: 1.0}
    scalars = {
        PARAMS_RATIO_TAG: ratio(summary.get("params_after"), summary.get("params_before")),
        MACS_RATIO_TAG: ratio(summary.get("macs_after"), summary.get("macs_before")),
    }
    return {tag: float(v) for tag, v in scalars.items() if v is not None and math.isfinite(v)}

def before_last_step(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """The summary of the model before the last step of a schedule (None: the dense model), for :func:`kept_ratios`:
    the step before's counts against the first step's."""
    steps = summary.get("steps") or []
    if len(steps) < 2:
        return None
    return {**steps[-2], "params_before": summary.get("params_before"), "macs_before": summary.get("macs_before")}

def compression_scalars(summary: Mapping[str, Any], at: str = "end") -> dict[str, float]:
    """The headline scalars of a ``RankCompression.summary()``: :func:`kept_ratios` and the monitored metric's change
    from before compression, ``at`` the swap (to right after it) or the ``"end"`` of fit (to after fine-tuning).
    Figures that were not measured are left out."""
    if at not in ("swap", "end"):
        raise ValueError(f"`at` must be 'swap' or 'end', got {at!r}")
    metrics = summary.get("metrics", {})
    before, now = metrics.get("before"), metrics.get("compressed" if at == "swap" else "finetuned")
    change = None if before is None or now is None else now - before
    scalars = kept_ratios(summary)
    if change is not None and math.isfinite(change):
        scalars[f"{SUMMARY_GROUP}/{summary.get('monitor') or 'metric'}_change"] = float(change)
    return scalars

def _chunks(items: Sequence[str], most: int = MAX_LINES_PER_CHART) -> list[Sequence[str]]:
    """``items`` in order, cut into the fewest runs of at most ``most``, as even as possible (6 -> 3 + 3)."""
    size = math.ceil(len(items) / math.ceil(len(items) / most)) if items else most
    return [items[i : i + size] for i in range(0, len(items), size)]

def utilization_layout(layers: Sequence[str]) -> dict[str, dict[str, list]]:
    """A custom-scalars layout: the MLU (with the parameters and multiply-adds kept, which a ``RankCompression``
    logs from the start of fit: their drop marks each swap), every layer's utilization by block, and by role across
    blocks.

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
    summary = [MLU_TAG, WEIGHTED_MLU_TAG, PARAMS_RATIO_TAG, MACS_RATIO_TAG]
    layout = {
        "lightning-rank summary": {
            "MLU and parameter-weighted MLU; with RankCompression, parameters and multiply-adds kept / dense "
            "(their drop marks the swap)": ["Multiline", [f"^{re.escape(tag)}$" for tag in summary]],
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
