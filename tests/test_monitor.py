"""RankMonitor in real ``Trainer(accelerator="cpu")`` runs: every report is checked against an independent
``lr.analyze(model, lr.collect(model, batches))`` of the same weights."""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.utils.data import DataLoader

import lightning_rank as lr
from lightning_rank.callbacks import epoch as epoch_statistics
from lightning_rank.callbacks import monitor as monitor_module
from lightning_rank.views import figures, tags
from tests.helpers import Events, FakeClock, assert_same_report, pooled, reference
from tests.tiny_models import (
    BLOCKS_LAYERS,
    Blocks,
    BlocksData,
    Branchy,
    DumpReport,
    blocks_dataset,
    make_trainer,
    split_subspaces,
)


class Snapshots(Callback):
    """Keeps the model's weights after each validation (callbacks after RankMonitor see its report)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.weights[trainer.current_epoch] = copy.deepcopy(pl_module.state_dict())


def heatmap_shape(history: list[dict]) -> tuple[int, int]:
    """(height, width) of the labelled heatmap figure of ``history``."""
    width, height = figures.heatmap_image(history).size
    return height, width


def test_fit_publishes_each_analyzed_epoch_everywhere(tmp_path):
    torch.manual_seed(0)
    model = Blocks()
    val = [DataLoader(blocks_dataset(seed=1), batch_size=16), DataLoader(blocks_dataset(n=24, seed=2), batch_size=8)]
    monitor = lr.RankMonitor(every_n_epochs=2, views=tags.VIEWS, figure_budget=None)  # every view, every time
    snapshots = Snapshots()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="rank/mlu", mode="max", every_n_epochs=2)
    csv = CSVLogger(tmp_path, name="csv")
    tb = TensorBoardLogger(tmp_path, name="tb")
    run = make_trainer(tmp_path, 4, [monitor, snapshots, checkpoint], num_sanity_val_steps=2, logger=[tb, csv])
    run.fit(model, DataLoader(blocks_dataset(seed=0), batch_size=16), val)

    # Epochs 1 and 3 only: not the sanity check, not the epochs every_n_epochs=2 leaves out.
    assert [h["epoch"] for h in monitor.history] == [1, 3]
    steps = [h["step"] for h in monitor.history]
    assert steps == [6, 12]  # 3 training batches an epoch
    json_dir = Path(tb.log_dir) / "rank_reports"
    assert sorted(p.name for p in json_dir.iterdir()) == ["epoch_001.json", "epoch_003.json"]

    # Each epoch's JSON is the independent analysis of that epoch's weights over both dataloaders.
    for entry in monitor.history:
        saved = json.loads((json_dir / f"epoch_{entry['epoch']:03d}.json").read_text())
        model.load_state_dict(snapshots.weights[entry["epoch"]])
        expected = reference(model, val)
        assert saved == expected == entry["report"]
        assert saved["layers"]["head"]["rows"] == 48 + 24
    assert monitor.report.to_dict() == monitor.history[-1]["report"]
    assert run.callback_metrics["rank/mlu"].item() == pytest.approx(monitor.report.mlu)
    assert checkpoint.best_model_score.item() == pytest.approx(max(h["report"]["mlu"] for h in monitor.history))

    events = Events(tb.log_dir)
    for name in BLOCKS_LAYERS:
        for tag, key in (("rank/utilization", "utilization"), ("rank_detail/in_rank", "in_rank"),
                         ("rank_detail/out_rank", "out_rank")):
            points = events.scalars(f"{tag}/{name}")
            assert [step for step, _ in points] == steps
            assert [v for _, v in points] == pytest.approx([h["report"]["layers"][name][key] for h in monitor.history])
        assert len(events.histograms(f"rank_detail/spectrum/{name}")) == 2
    assert [v for _, v in events.scalars("0_rank_summary/mlu")] == pytest.approx([h["report"]["mlu"] for h in monitor.history])

    (layout_event,) = events.acc.Tensors("custom_scalars__config__")  # written once: the layers did not change
    layout = events.layout()
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["blocks.0: 0, 2"] == [r"^rank/utilization/blocks\.0\.0$", r"^rank/utilization/blocks\.0\.2$"]
    assert charts["blocks.*.0 in blocks.0, blocks.1"] == [r"^rank/utilization/blocks\.0\.0$", r"^rank/utilization/blocks\.1\.0$"]
    assert charts["(top level): head"] == [r"^rank/utilization/head$"]

    heatmaps = events.images("0_rank_summary/utilization_heatmap")
    assert [step for step, *_ in heatmaps] == steps
    _, width, height = heatmaps[-1]
    assert (height, width) == heatmap_shape(monitor.history)
    assert {tag for tag in events.tags("images") if tag.startswith("rank_energy/")} == {
        "rank_energy/blocks.0", "rank_energy/blocks.1", "rank_energy/(top level)"
    }
    assert events.text("rank/report")[-1] == (12, monitor.report.to_markdown())

    # The CSV logger received the same scalars.
    rows = [line.split(",") for line in Path(csv.log_dir, "metrics.csv").read_text().splitlines()]
    column = rows[0].index("rank/utilization/head")
    values = [float(row[column]) for row in rows[1:] if row[column]]
    assert values == pytest.approx([h["report"]["layers"]["head"]["utilization"] for h in monitor.history])


def test_validate_without_logger_with_mask(tmp_path):
    """trainer.validate is always analyzed; mask_fn gets the batch; no logger: JSON under default_root_dir."""

    class Masked(Blocks):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self(batch["x"]).square().mean())

    torch.manual_seed(0)
    model = Masked()
    x, _ = blocks_dataset(n=32).tensors
    mask = torch.arange(32) % 4 != 0  # a quarter of the rows are padding
    batches = [{"x": x[i : i + 8], "mask": mask[i : i + 8]} for i in range(0, 32, 8)]
    seen = []

    def mask_fn(batch):
        seen.append(batch["x"])
        return batch["mask"]

    monitor = lr.RankMonitor(mask_fn=mask_fn, every_n_epochs=5, exclude_modules="head")
    with pytest.warns(UserWarning, match="no logger") as record:
        run = make_trainer(tmp_path, callbacks=[monitor], logger=False)
        run.validate(model, DataLoader(batches, batch_size=None))
    assert sum("RankMonitor" in str(w.message) for w in record) == 1
    assert len(seen) == 4 and all(torch.equal(s, b["x"]) for s, b in zip(seen, batches))
    assert len(monitor.history) == 1  # trainer.validate is analyzed whatever every_n_epochs says

    stats = lr.collect(model, batches, forward=lambda m, b: m(b["x"]), mask_fn=lambda b: b["mask"], exclude_modules="head")
    expected = lr.analyze(model, stats).to_dict()
    assert monitor.history[0]["report"] == expected
    assert expected["layers"]["blocks.0.0"]["rows"] == 24
    assert "head" not in expected["layers"]
    saved = json.loads((tmp_path / "rank_reports" / "epoch_000.json").read_text())
    assert saved == expected
    assert run.callback_metrics["rank/mlu"].item() == pytest.approx(expected["mlu"])


@pytest.mark.parametrize("limit", [None, 3])
def test_default_rows_spread_each_layers_budget_over_the_epochs_batches(tmp_path, limit, monkeypatch):
    """"auto" counts about max(AUTO_MIN_ROWS, AUTO_ROWS_PER_FEATURE * fan_in) rows of each layer per analyzed
    epoch, the same fraction of each batch the epoch validates (``limit_val_batches`` included). Settling, which
    would thin these random inputs early, is kept out here (tests/test_settling.py)."""
    from lightning_rank.stats import settling
    from lightning_rank.stats.rows import AUTO_MIN_ROWS, AUTO_ROWS_PER_FEATURE

    monkeypatch.setattr(settling, "SETTLE_FIRST_ROWS", 10**9)
    torch.manual_seed(0)
    model = Blocks()  # fan_in 8 and 12: the floor holds for every layer
    assert AUTO_MIN_ROWS > AUTO_ROWS_PER_FEATURE * 12
    loader = DataLoader(blocks_dataset(n=6 * 1024), batch_size=1024)
    monitor = lr.RankMonitor()
    run = make_trainer(tmp_path, callbacks=[monitor], logger=False, limit_val_batches=limit)
    with pytest.warns(UserWarning, match="no logger"):
        run.validate(model, loader)
    batches = limit or 6
    per_batch = min(1024, math.ceil(AUTO_MIN_ROWS / batches))  # 683 of 1024 in 6 batches, all in 3
    assert {layer["rows"] for layer in monitor.report.to_dict()["layers"].values()} == {batches * per_batch}


def test_epoch_batches_count_this_process_and_the_chosen_dataloader():
    from types import SimpleNamespace

    fit = SimpleNamespace(num_val_batches=[5, 3], world_size=2)  # per process: a pooled layer multiplies by 2
    assert epoch_statistics.epoch_batches(fit, None) == 8
    assert epoch_statistics.epoch_batches(fit, 1) == 3
    assert epoch_statistics.epoch_batches(SimpleNamespace(num_val_batches=[float("inf")], world_size=1), None) is None
    assert epoch_statistics.epoch_batches(SimpleNamespace(num_val_batches=[], world_size=1), None) is None


def test_resume_from_checkpoint_keeps_history_and_continues_views(tmp_path):
    def run(max_epochs: int, monitor: lr.RankMonitor, **fit_kwargs) -> L.Trainer:
        logger = TensorBoardLogger(tmp_path, name="run", version=0)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        run = make_trainer(tmp_path, max_epochs, [monitor, checkpoint], logger=logger, num_sanity_val_steps=2)
        torch.manual_seed(0)
        run.fit(Blocks(), datamodule=BlocksData(), **fit_kwargs)
        return run

    first = lr.RankMonitor()
    run(2, first)
    resumed = lr.RankMonitor()
    final = run(4, resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:2] == first.history
    events = Events(final.log_dir)
    assert [step for step, _ in events.scalars("rank/utilization/head")] == [h["step"] for h in resumed.history]
    _, width, height = events.images("0_rank_summary/utilization_heatmap")[-1]
    assert (height, width) == heatmap_shape(resumed.history)  # the heatmap kept the epochs before the resume
    assert len(resumed.history) == 4


def test_lightning_cli_builds_the_monitor_from_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  max_epochs: 2
  accelerator: cpu
  default_root_dir: {tmp_path}
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_rank.RankMonitor
      init_args:
        threshold: 0.9
        every_n_epochs: 2
        exclude_modules: [head]
        dtype: torch.float64
"""
    )
    cli = LightningCLI(Blocks, BlocksData, run=False, args=["--config", str(config)], save_config_callback=None)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, lr.RankMonitor)]
    assert (monitor.threshold, monitor.every_n_epochs, monitor.exclude_modules, monitor.dtype) == (
        0.9, 2, ["head"], torch.float64
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [h["epoch"] for h in monitor.history] == [1]
    assert monitor.report.threshold == 0.9 and "head" not in monitor.report.layers
    assert monitor.report.to_dict() == reference(cli.model, [BlocksData().val_dataloader()], threshold=0.9,
                                                 exclude_modules=["head"], dtype=torch.float64)

    args = ["--trainer.callbacks+=lightning_rank.RankMonitor", "--trainer.callbacks.every_n_epochs=3",
            "--trainer.accelerator=cpu"]
    cli = LightningCLI(Blocks, BlocksData, run=False, args=args, save_config_callback=None)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, lr.RankMonitor)]
    assert monitor.every_n_epochs == 3


def test_bf16_mixed_matches_an_autocast_reference(tmp_path):
    torch.manual_seed(0)
    model = Blocks()
    monitor = lr.RankMonitor()
    val = DataLoader(blocks_dataset(seed=1), batch_size=16)
    make_trainer(tmp_path, 1, [monitor], precision="bf16-mixed", logger=False, num_sanity_val_steps=2).fit(
        model, DataLoader(blocks_dataset(seed=0), batch_size=16), val
    )

    def autocast_forward(m, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(batch[0])

    expected = lr.analyze(model, lr.collect(model, list(val), forward=autocast_forward)).to_dict()
    assert monitor.report.to_dict() == expected
    assert len(monitor.report.analyzed) == 5


def test_figures_need_no_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any import of it fails
    logger = TensorBoardLogger(tmp_path)
    run = make_trainer(tmp_path, 2, [lr.RankMonitor()], logger=logger, num_sanity_val_steps=2)
    run.fit(Blocks(), datamodule=BlocksData())
    events = Events(logger.log_dir)
    assert events.tags("images") == ["0_rank_summary/utilization_heatmap", "rank_energy/(top level)",
                                     "rank_energy/blocks.0", "rank_energy/blocks.1"]
    assert "0_rank_summary/mlu" in events.tags("scalars")


def test_fast_dev_run_skips_the_analysis_with_one_info_line(tmp_path, caplog):
    monitor = lr.RankMonitor()
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, callbacks=[monitor], fast_dev_run=True).fit(Blocks(), datamodule=BlocksData())
    assert monitor.history == [] and monitor.report is None
    assert sum("fast_dev_run" in r.getMessage() and "RankMonitor" in r.getMessage() for r in caplog.records) == 1
    assert not (tmp_path / "rank_reports").exists()


class Inner(Blocks):
    """The blocks compiled as a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(torch.compile(block, backend="eager") for block in self.blocks)


@pytest.mark.parametrize("how", ["trainer", "submodule"])
def test_compiled_models_are_observed(tmp_path, how):
    torch.manual_seed(0)
    if how == "trainer":
        model = Blocks()
        given = torch.compile(model, backend="eager")
    else:
        model = given = Inner()
    monitor = lr.RankMonitor()
    val = DataLoader(blocks_dataset(seed=1), batch_size=16)
    run = make_trainer(tmp_path, 1, [monitor], logger=False, num_sanity_val_steps=2)
    run.fit(given, DataLoader(blocks_dataset(), batch_size=16), val)
    assert len(monitor.report.analyzed) == 5
    with torch.compiler.set_stance("force_eager"):  # the hooks of the reference must fire too
        assert monitor.report.to_dict() == reference(model, [val])


def test_compiled_model_without_eager_fallback_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(epoch_statistics, "_set_stance", None)
    torch._dynamo.reset()
    monitor = lr.RankMonitor()
    with pytest.warns(UserWarning) as record:
        make_trainer(tmp_path, 1, [monitor], logger=False, num_sanity_val_steps=2).fit(
            torch.compile(Blocks(), backend="eager"), datamodule=BlocksData()
        )
    messages = [str(w.message) for w in record]
    assert any("is compiled" in m for m in messages)
    # Never a silent report of zero layers: either every layer was seen, or the user was told.
    if len(monitor.report.analyzed) != 5:
        assert any("none of the 5 target layers was called" in m for m in messages)
        assert monitor.report.analyzed == {}


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"threshold": 0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_epochs": 1.5}, "every_n_epochs"),
        ({"every_n_epochs": True}, "every_n_epochs"),
        ({"target_modules": 3}, "target_modules"),
        ({"target_modules": "blocks.(["}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["head", 1]}, "target_modules"),
        ({"exclude_modules": 1.0}, "exclude_modules"),
        ({"exclude_modules": "(["}, "exclude_modules"),
        ({"mask_fn": "attention_mask"}, "mask_fn"),
        ({"max_rows_per_batch": 0}, "max_rows_per_batch"),
        ({"max_rows_per_batch": 2.5}, "max_rows_per_batch"),
        ({"max_rows_per_batch": True}, "max_rows_per_batch"),
        ({"dtype": torch.float16}, "dtype"),
        ({"dtype": "float64"}, "dtype"),
        ({"centered": "yes"}, "centered"),
        ({"tensorboard": 1}, "tensorboard"),
        ({"seed": "0"}, "seed"),
        ({"eig_dtype": torch.float16}, "eig_dtype"),
        ({"views": ["nope"]}, "views"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=f"`{argument}`"):
        lr.RankMonitor(**kwargs)


def test_eig_dtype_reaches_the_analysis(tmp_path, monkeypatch):
    seen = []
    original = monitor_module.analyze_shared
    monkeypatch.setattr(monitor_module, "analyze_shared",
                        lambda *a, **k: seen.append(k["eig_dtype"]) or original(*a, **k))
    monitor = lr.RankMonitor(eig_dtype=torch.float32)
    make_trainer(tmp_path, 1, [monitor], logger=False, num_sanity_val_steps=2).fit(Blocks(), datamodule=BlocksData())
    assert seen == [torch.float32] and monitor.report.analyzed


def test_early_stopping_can_monitor_mlu(tmp_path):
    monitor = lr.RankMonitor()
    stopper = EarlyStopping(monitor="rank/mlu", mode="max", patience=0, min_delta=1.0)  # stops after one epoch
    run = make_trainer(tmp_path, 5, [monitor, stopper], logger=False, num_sanity_val_steps=2)
    run.fit(Blocks(), datamodule=BlocksData())
    assert run.current_epoch == 2 and len(monitor.history) == 2
    assert stopper.best_score.item() == pytest.approx(monitor.history[0]["report"]["mlu"])


# -- DDP ---------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_ddp_spawn_two_processes_equal_one(tmp_path):
    torch.manual_seed(0)
    model = Branchy()
    loader = DataLoader(split_subspaces(), batch_size=4)
    expected = reference(model, [loader], dtype=torch.float64)
    assert expected["layers"]["inp"]["in_rank"] == 7  # each rank alone would see 3 or 4
    assert expected["layers"]["extra"]["rows"] == 16

    monitor = lr.RankMonitor(dtype=torch.float64)
    # A short collective timeout turns a disagreement between the processes into an error, not a hang.
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))
    run = make_trainer(tmp_path, callbacks=[monitor, DumpReport(tmp_path)], strategy=strategy, devices=2, logger=False)
    run.validate(model, loader)

    reports = [json.loads((tmp_path / f"report_rank{r}.json").read_text()) for r in (0, 1)]
    saved = tmp_path / "rank_reports" / "epoch_000.json"
    for report in (*reports, json.loads(saved.read_text())):
        assert_same_report(report, pooled(expected))
    assert run.callback_metrics["rank/mlu"].item() == pytest.approx(expected["mlu"])


def cost_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "RankMonitor took" in str(w.message)]


def test_monitor_records_its_cost_and_warns_once_when_it_dominates_a_fit(tmp_path, monkeypatch):
    """On the monitor's clock a training batch takes 1 s and each analysis 10 s: the monitor takes most of every
    epoch, says so once a fit (with the knobs that lower it), and records each analyzed epoch's cost."""
    clock = FakeClock(monkeypatch, batch_seconds=1.0)
    clock.slow(monitor_module, "analyze_shared", 10.0)
    torch.manual_seed(0)
    monitor = lr.RankMonitor(max_rows_per_batch=None, tensorboard=False)
    run = make_trainer(tmp_path, 2, [monitor, clock.callback], logger=False)
    with pytest.warns(PossibleUserWarning) as record:
        run.fit(Blocks(), datamodule=BlocksData())  # 3 training batches an epoch
    assert clock.now == 2 * (3 * 1.0 + 10.0)
    messages = cost_warnings(record)
    assert len(messages) == 1  # once a fit, not once an epoch, though both epochs went over the share
    assert all(knob in messages[0] for knob in ("every_n_epochs", "max_rows_per_batch", "statistics"))
    assert "of the last 13.00 s of this fit" in messages[0]  # the first epoch: 3 batches and the analysis
    assert len(monitor.history) == 2
    costs = [entry["seconds"] for entry in monitor.history]
    assert all(set(cost) == {"statistics", "analysis", "publish"} for cost in costs)
    assert all(cost["statistics"] > 0 and cost["analysis"] == 10.0 and cost["publish"] == 0.0 for cost in costs)
    assert sum(sum(cost.values()) for cost in costs) < clock.now

    again = make_trainer(tmp_path, 1, [monitor, clock.callback], logger=False)
    with pytest.warns(PossibleUserWarning) as record:  # the same monitor in a new fit tells that fit too
        again.fit(Blocks(), datamodule=BlocksData())
    assert len(cost_warnings(record)) == 1


def test_monitor_does_not_warn_about_its_cost_when_training_dominates(tmp_path, monkeypatch):
    """On the monitor's clock a training batch takes 10 s and the analysis 1 s: far below the share, no warning."""
    from lightning_rank.callbacks.budgets import COST_WARNING_SHARE

    clock = FakeClock(monkeypatch, batch_seconds=10.0)
    clock.slow(monitor_module, "analyze_shared", 1.0)
    torch.manual_seed(0)
    monitor = lr.RankMonitor(tensorboard=False)
    run = make_trainer(tmp_path, 1, [monitor, clock.callback], logger=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run.fit(Blocks(), datamodule=BlocksData())
    assert clock.now == 3 * 10.0 + 1.0
    cost = monitor.history[0]["seconds"]
    assert cost["analysis"] == 1.0 and cost["publish"] == 0.0
    assert 0 < sum(cost.values()) < COST_WARNING_SHARE * clock.now / 4  # the premise: far below the share
    assert cost_warnings(record) == []
