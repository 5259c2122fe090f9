"""Markdown tables of what compression did, for TensorBoard's text tab."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning_rank.views.tags import ratio


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"

def _number(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"

def compression_markdown(summary: Mapping[str, Any], at: str = "end", step: int | None = None,
                         epoch: int | None = None) -> str:
    """One table of what compression did: model totals, the metric at three points, and every selected layer with
    the rank it keeps (the factors' rank, not the utilized rank a report measures).

    ``at``: ``"swap"`` for the table logged at the swap (the fine-tuned figure is not known yet, and follows at the
    end of fit) or ``"end"``; ``step`` and ``epoch`` say when, in its first line.
    """
    metrics = summary.get("metrics", {})
    monitor = summary.get("monitor") or "metric"

    def row(label: str, before: float | None, after: float | None) -> str:
        kept = ratio(after, before)
        return f"| {label} | {_count(before)} | {_count(after)} | {'n/a' if kept is None else f'{100 * kept:.1f}%'} |"

    method = summary.get("method")
    steps = summary.get("steps")
    which = f" step {len(steps)}" if steps else ""
    if at == "swap":
        when = f"at the swap{f', when epoch {epoch} starts' if epoch is not None else ''}{f' (step {step})' if step is not None else ''}"
        finetuned = "at the end of fit"
    else:
        when = f"after fine-tuning, at the end of fit{f' (step {step})' if step is not None else ''}"
        finetuned = _number(metrics.get("finetuned"))
    lines = [
        f"**Compression{which}**{f' ({method})' if method else ''} {when}: {len(summary.get('layers', {}))} layers "
        "replaced.",
        "",
        "| whole model | before | after | after / before |",
        "|---|---:|---:|---:|",
        row("parameters", summary.get("params_before"), summary.get("params_after")),
        row("multiply-adds per example", summary.get("macs_before"), summary.get("macs_after")),
        "",
        f"| {monitor} | before | right after the swap | after fine-tuning |",
        "|---|---:|---:|---:|",
        f"| value | {_number(metrics.get('before'))} | {_number(metrics.get('compressed'))} | {finetuned} |",
        "",
        "| layer | out x in | kept rank | rel. output error | parameters | replaced |",
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
    lines += ["", "*kept rank*: the rank of the layer's two factors, as planned (by the threshold, a budget or `ranks`). "
              "It is not the *utilized rank* of `rank/report`, which measures how many directions the layer's data use."]
    return "\n".join(lines) + "\n"
