"""``LayerRank`` and ``RankReport``: the per-layer numbers, their JSON form and a markdown table."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_rank.targets import LayerKind


@dataclass(frozen=True)
class LayerRank:
    """Utilized rank of one layer; every number but ``name``, ``kind`` and ``skipped`` is ``None`` when skipped.

    ``rows_limited``: fewer rows than ``in_features`` were seen, so ``in_rank`` is bounded by the data, not
    by the layer. ``factorized``: the layer is a low-rank pair ``A B``, analyzed as the one map it replaced.
    ``kind`` is one of :data:`~lightning_rank.targets.LayerKind` (``"linear"``, ``"conv2d"``, ...), for
    analyzed and skipped layers alike; ``None`` for a module that is no supported layer. ``pooled``, when
    several processes counted (DDP, FSDP2): ``True`` when the rows of every process were summed (every row
    counted, or its owner's share of the validation held fewer rows than the row budget), ``False`` when
    the process owning the layer counted its own share alone; ``None`` with one process.
    ``rows`` is how many rows of its input were summed and ``rows_reason`` why that many: ``"all"`` (every row
    the data gave), ``"budget"`` (the ``"auto"`` row budget kept a share of each batch), ``"cap"`` (an int
    ``max_rows_per_batch``), or ``"settled"`` (its spectrum stopped moving after ``settled_at`` rows, and the
    rest of the data was counted from 1 row in 4, each weighing 4; see :mod:`~lightning_rank.stats.settling`).

    >>> from lightning_rank import LayerRank
    >>> LayerRank(name="fc", kind="linear", in_features=16, out_features=32, skipped="no rows reached it").analyzed
    False
    """

    name: str
    kind: LayerKind | None
    in_features: int | None
    out_features: int | None
    in_rank: int | None = None
    out_rank: int | None = None
    rank: int | None = None
    utilization: float | None = None
    in_effective_rank: float | None = None
    out_effective_rank: float | None = None
    rows: int | None = None
    rows_limited: bool | None = None
    rows_reason: str | None = None
    settled_at: int | None = None
    nonfinite_rows: int | None = None
    parameters: int | None = None
    factorized: bool = False
    pooled: bool | None = None
    skipped: str | None = None

    @property
    def analyzed(self) -> bool:
        return self.skipped is None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["name"]
        return out


@dataclass
class RankReport:
    """Per-layer utilized ranks at one energy ``threshold``; ``mlu`` is the unweighted mean utilization.

    ``spectra`` holds, for reports made by :func:`~lightning_rank.analyze`, each analyzed layer's input
    and output eigenvalues (float64, descending, round-off removed); it is not part of the JSON form.

    >>> import pathlib, tempfile
    >>> from lightning_rank import LayerRank, RankReport
    >>> fc = LayerRank(name="fc", kind="linear", in_features=16, out_features=32, in_rank=4, out_rank=5, rank=4,
    ...                utilization=0.25, in_effective_rank=3.6, out_effective_rank=4.2, rows=256, parameters=544)
    >>> report = RankReport(threshold=0.99, layers={"fc": fc})  # as lr.analyze makes them
    >>> report.mlu, report.to_dict()["layers"]["fc"]["rank"]
    (0.25, 4)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = report.save(pathlib.Path(folder) / "rank.json")
    ...     RankReport.load(path) == report
    True
    >>> print(report.to_markdown())  # doctest: +NORMALIZE_WHITESPACE
    **MLU 25.0%** (parameter-weighted 25.0%), energy threshold 0.99, 1 layers analyzed
    <BLANKLINE>
    | layer | kind | out x in | in rank | out rank | utilized rank | utilization | eff. rank in / out | rows |
    |---|---|---|---:|---:|---:|---:|---:|---:|
    | fc | linear | 32 x 16 | 4 | 5 | 4 | 25.0% | 3.6 / 4.2 | 256 |
    <BLANKLINE>
    """

    threshold: float
    layers: dict[str, LayerRank] = field(default_factory=dict)
    centered: bool = False
    spectra: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def analyzed(self) -> dict[str, LayerRank]:
        """The layers that have numbers (not skipped)."""
        return {name: layer for name, layer in self.layers.items() if layer.analyzed}

    @property
    def skipped(self) -> dict[str, str]:
        """Skipped layer name -> reason."""
        return {name: layer.skipped for name, layer in self.layers.items() if layer.skipped is not None}

    @property
    def mlu(self) -> float:
        """Mean Layer Utilization: the unweighted mean of ``utilization`` over analyzed layers (NaN if none)."""
        values = [layer.utilization for layer in self.analyzed.values()]
        return sum(values) / len(values) if values else math.nan

    @property
    def weighted_mlu(self) -> float:
        """Mean utilization weighted by each layer's parameter count (NaN if no layer was analyzed)."""
        layers = self.analyzed.values()
        total = sum(layer.parameters for layer in layers)
        return sum(layer.utilization * layer.parameters for layer in layers) / total if total else math.nan

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of ``docs/design.md``: threshold, mlu, weighted_mlu and one entry per layer."""
        return {
            "threshold": self.threshold,
            "centered": self.centered,
            "mlu": _finite_or_none(self.mlu),
            "weighted_mlu": _finite_or_none(self.weighted_mlu),
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankReport:
        known = {f.name for f in fields(LayerRank)}
        layers = {
            name: LayerRank(name=name, **{k: v for k, v in entry.items() if k in known})
            for name, entry in data["layers"].items()
        }
        return cls(threshold=data["threshold"], layers=layers, centered=data.get("centered", False))

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON atomically (a reader never sees a half-written file)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> RankReport:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_markdown(self) -> str:
        """A table of every layer (analyzed first), headed by the MLU."""
        lines = [
            f"**MLU {_percent(self.mlu)}** (parameter-weighted {_percent(self.weighted_mlu)}), "
            f"energy threshold {self.threshold:g}, {len(self.analyzed)} layers analyzed"
            + (f", {len(self.skipped)} skipped" if self.skipped else ""),
            "",
            "| layer | kind | out x in | in rank | out rank | utilized rank | utilization | eff. rank in / out | rows |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, layer in self.analyzed.items():
            kind = f"{layer.kind} (factorized)" if layer.factorized else layer.kind
            notes = ["limited"] * bool(layer.rows_limited) + [layer.rows_reason] * (layer.rows_reason not in (None, "all"))
            rows = f"{layer.rows} ({', '.join(notes)})" if notes else f"{layer.rows}"
            lines.append(
                f"| {name} | {kind} | {layer.out_features} x {layer.in_features} | {layer.in_rank} | "
                f"{layer.out_rank} | {layer.rank} | {_percent(layer.utilization)} | "
                f"{layer.in_effective_rank:.1f} / {layer.out_effective_rank:.1f} | {rows} |"
            )
        if any(layer.rows_limited for layer in self.analyzed.values()):
            lines += ["", "*(limited)*: fewer rows than inputs were seen, so the input rank is bounded by the data."]
        if any(layer.rows_reason not in (None, "all") for layer in self.analyzed.values()):
            lines += ["", "*(budget)*, *(cap)*: the row policy left some rows out; *(settled)*: counting slowed to 1 row "
                          "in 4 once more rows stopped moving the spectrum."]
        if self.skipped:
            lines += ["", "| skipped layer | reason |", "|---|---|"]
            lines += [f"| {name} | {reason} |" for name, reason in self.skipped.items()]
        return "\n".join(lines) + "\n"


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
