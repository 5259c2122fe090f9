"""Every example runs with small settings and produces what it promises.

The examples are imported and their ``main(argv)`` called in this process (starting a Python with torch and
Lightning costs seconds per example); each runs in its own temporary folder.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

import lightning_rank as lr
from lightning_rank.stats.rows import AUTO_MIN_ROWS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def example(tmp_path, monkeypatch):
    """Import an example by name, run from ``tmp_path``; torch's thread count is restored afterwards."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield importlib.import_module
    torch.set_num_threads(threads)


def test_demo_fast(example, tmp_path) -> None:
    out = example("demo").main(["--fast", "--root", str(tmp_path)])
    summary = out["summary"]
    assert summary["params_after"] < summary["params_before"]
    assert summary["layer_params_after"] <= 0.5 * summary["layer_params_before"]
    assert 0 < summary["macs_after"] < summary["macs_before"]
    assert set(summary["metrics"]) == {"before", "compressed", "finetuned"}
    assert all(0 <= value <= 1 for value in summary["metrics"].values())
    assert summary["layers"] and not any(name in summary["layers"] for name in ("embed", "head"))
    # the dense copy is the model that gave "before"; the compressed one ends fine-tuned
    assert out["accuracy"]["dense"] == pytest.approx(summary["metrics"]["before"], abs=1e-6)
    assert out["accuracy"]["compressed"] == pytest.approx(summary["metrics"]["finetuned"], abs=1e-6)
    assert all(seconds > 0 for seconds in out["latency"].values())
    # fine-tuning distills from the dense model (the setting of benchmarks/digits_compression.py)
    assert out["compression"].distill == 1.0 and out["compression"].teacher is not None

    assert [h["epoch"] for h in out["history"]] == [0, 1, 2]  # 2 dense epochs, 1 of fine-tuning
    reports = out["log_dir"] / "rank_reports"
    assert sorted(p.name for p in reports.glob("epoch_*.json")) == ["epoch_000.json", "epoch_001.json", "epoch_002.json"]
    assert json.loads((out["log_dir"] / "rank_reports" / "compression.json").read_text()) == summary
    assert list(out["log_dir"].glob("events.out.tfevents.*"))
    heatmap = tmp_path / "runs" / "utilization_heatmap.png"
    assert out["figures"] == [heatmap] and heatmap.read_bytes().startswith(PNG)
    assert not (tmp_path / "docs").exists()  # a smoke run leaves the committed figure alone


def test_monitor_only(example, tmp_path) -> None:
    monitor = example("monitor_only").main(
        ["--epochs", "2", "--every-n-epochs", "1", "--limit-train-batches", "3", "--root", str(tmp_path)]
    )
    assert [h["epoch"] for h in monitor.history] == [0, 1]
    assert 0 < monitor.report.mlu <= 1
    (log_dir,) = (tmp_path / "monitor_only").iterdir()
    saved = lr.RankReport.load(log_dir / "rank_reports" / "epoch_001.json")
    assert saved.to_dict() == monitor.report.to_dict()
    # q, k and v read the same normalized tokens: one input subspace for the three
    layers = monitor.report.layers
    assert layers["blocks.0.q"].in_rank == layers["blocks.0.k"].in_rank == layers["blocks.0.v"].in_rank
    # "auto" rows: the 4096-row floor of these 64-wide layers over 15 batches of 32 images x 16 tokens, the same
    # fraction of each batch (the last holds 2 images)
    rate = AUTO_MIN_ROWS / (15 * 32 * 16)
    rows = sum(math.ceil(rate * images * 16) for images in [32] * 14 + [2])
    assert rows < 450 * 16
    for name in ("blocks.0.q", "embed"):  # fewer summed once settled: later batches from 1 row in 4
        layer = layers[name]
        assert layer.rows == rows if layer.rows_reason == "budget" else layer.settled_at < layer.rows < rows, name
        assert layer.rows_reason in ("budget", "settled"), name
    assert layers["embed"].in_features == 4  # one 2x2 patch per token


def test_compress_after_fit(example, tmp_path) -> None:
    out = example("compress_after_fit").main(
        ["--epochs", "2", "--finetune-epochs", "1", "--limit-train-batches", "3", "--root", str(tmp_path)]
    )
    summary = out["summary"]
    assert summary["params_after"] < summary["params_before"]
    assert summary["layer_params_after"] <= 0.5 * summary["layer_params_before"]
    # the last checkpoint, loaded into a fresh model, is the fine-tuned compressed model
    restored = out["restored"]
    ranks = {name: m.rank for name, m in restored.named_modules() if isinstance(m, (lr.LowRankLinear, lr.LowRankConv2d))}
    assert ranks == summary["layers"]
    assert sum(p.numel() for p in restored.parameters()) == summary["params_after"]
    assert out["restored_accuracy"] == pytest.approx(summary["metrics"]["finetuned"], abs=1e-6)


def test_cli_with_both_callbacks_from_yaml(example, tmp_path) -> None:
    cli = example("cli").main([
        "fit",
        "--config", str(EXAMPLES / "cli_config.yaml"),
        "--trainer.max_epochs=8",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=4",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ])
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, lr.RankMonitor)]
    (compression,) = [c for c in cli.trainer.callbacks if isinstance(c, lr.RankCompression)]
    assert (monitor.every_n_epochs, compression.param_budget, compression.monitor) == (5, 0.5, "val_acc")
    assert compression.exclude_modules == ["embed", "head"]

    reports = Path(cli.trainer.log_dir) / "rank_reports"
    assert reports.parent.parent == tmp_path / "cli"
    assert sorted(p.name for p in reports.iterdir()) == ["compression.json", "epoch_004.json"]
    assert lr.RankReport.load(reports / "epoch_004.json").layers.keys() >= {"embed", "blocks.0.q", "head"}
    summary = json.loads((reports / "compression.json").read_text())
    assert summary["params_after"] < summary["params_before"]
    assert cli.trainer.current_epoch == 8 == cli.trainer.max_epochs  # max_epochs is never stretched
    assert compression.swap_epoch == 6  # compress_at_epoch: 0.87 of the 8 epochs, from the YAML


def test_plain_pytorch(example) -> None:
    out = example("plain_pytorch").main(["--epochs", "5"])
    result, report = out["result"], out["report"]
    assert set(report.analyzed) == {"0", "2", "4"}
    assert all(layer.rows == 1347 for layer in report.analyzed.values())  # one row per training image
    assert result.layers == {name: layer.rank for name, layer in report.analyzed.items()}  # threshold ranks
    assert result.params_after < result.params_before
    assert out["logit_error"] < 0.05
    assert out["dense_accuracy"] > 0.85 and out["compressed_accuracy"] > out["dense_accuracy"] - 0.05
    assert out["restored_identical"]


def test_masked_transformer_counts_only_real_tokens(example, tmp_path) -> None:
    out = example("masked_transformer").main(["--epochs", "1", "--train-size", "256", "--root", str(tmp_path)])
    assert out["real_tokens"] < out["padded_positions"]
    assert out["rows"] and set(out["rows"].values()) == {out["real_tokens"]}
    assert {layer.rows for layer in out["unmasked"].analyzed.values()} == {out["padded_positions"]}
    assert "head" not in out["report"].layers
    assert (tmp_path / "rank_reports" / "epoch_000.json").exists()
