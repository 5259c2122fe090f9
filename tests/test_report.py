"""RankReport: the JSON layout of docs/design.md, an exact save/load round trip, and the markdown table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

import lightning_rank as lr


def make_report() -> lr.RankReport:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3), nn.Linear(3, 3))
    model.forward = lambda x: model[2](model[1](model[0](x)))  # the last layer is never reached
    return lr.analyze(model, lr.collect(model, [torch.randn(20, 6)]), threshold=0.95)


def test_to_dict_layout() -> None:
    report = make_report()
    data = report.to_dict()
    assert data["threshold"] == 0.95
    assert data["mlu"] == report.mlu and data["weighted_mlu"] == report.weighted_mlu
    entry = data["layers"]["0"]
    for key in ("in_rank", "out_rank", "rank", "utilization", "rows", "in_features", "out_features",
                "in_effective_rank", "out_effective_rank", "skipped", "kind"):
        assert key in entry
    assert entry["utilization"] == entry["rank"] / 6
    assert data["layers"]["3"]["skipped"].startswith("never called")
    assert data["layers"]["3"]["rank"] is None
    json.dumps(data, allow_nan=False)  # strict JSON


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    report = make_report()
    path = report.save(tmp_path / "sub" / "rank.json")
    loaded = lr.RankReport.load(path)
    assert loaded == report
    assert loaded.to_dict() == report.to_dict()
    assert loaded.mlu == report.mlu  # floats survive JSON bit for bit
    assert [p.name for p in path.parent.iterdir()] == ["rank.json"]  # no temporary file left behind


def test_no_analyzed_layer_gives_nan_mlu_and_null_json() -> None:
    report = lr.RankReport(threshold=0.99)
    assert math.isnan(report.mlu)
    assert report.to_dict()["mlu"] is None


def test_markdown_lists_every_layer() -> None:
    report = make_report()
    text = report.to_markdown()
    assert f"MLU {100 * report.mlu:.1f}%" in text
    for name, layer in report.analyzed.items():
        assert f"| {name} | linear | {layer.out_features} x {layer.in_features} | {layer.in_rank} |" in text
    assert "| 3 | never called" in text
