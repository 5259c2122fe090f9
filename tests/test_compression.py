"""RankCompression with real Trainer runs on CPU: swap, fine-tune, checkpoints, DDP, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_rank as lr
from lightning_rank.callbacks.compression import Phase
from tests.helpers import Events
from tests.tiny_models import CLASSES, DIM, HIDDEN, SUBSPACE, Classifier, ParameterCheck, low_rank_dataset, make_trainer


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory: pytest.TempPathFactory):
    """One fit of 5 epochs: 3 dense, the swap when epoch 3 starts, 2 fine-tuning; checkpoints every epoch."""
    tmp_path = tmp_path_factory.mktemp("compress")
    L.seed_everything(0)
    model = Classifier()
    compression = lr.RankCompression(compress_at_epoch=3, method="whiten", monitor="val_acc")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    trainer = make_trainer(tmp_path, 5, [compression, checkpoints], logger=logger)
    trainer.fit(model)
    return tmp_path, trainer, model, compression


def test_swap_then_finetune_within_one_fit(compressed_run) -> None:
    tmp_path, trainer, model, compression = compressed_run
    assert trainer.current_epoch == 5 == trainer.max_epochs  # 3 dense + 2 fine-tuning, max_epochs unchanged
    assert compression.swap_epoch == 3 and compression.phase == Phase.FINISHED and compression.compressed
    replaced = compression.result.layers
    assert set(replaced) == {"net.0", "net.2", "net.4"}
    assert all(rank <= SUBSPACE + 1 for rank in replaced.values())  # inputs span 3 dims (4 with the bias)
    assert isinstance(model.net[0], lr.LowRankLinear) and isinstance(model.net[2], lr.LowRankLinear)
    dense_params = sum(p.numel() for p in Classifier().parameters())
    assert compression.result.params_before == dense_params
    assert compression.result.params_after == sum(p.numel() for p in model.parameters()) < dense_params / 2
    # optimizers and schedulers were rebuilt around the new parameters
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]

    metrics = compression.metrics
    assert metrics["before"] > 0.9  # the task is easy and linear in the subspace
    assert metrics["finetuned"] >= metrics["before"] - 0.03
    assert metrics["finetuned"] == pytest.approx(float(trainer.callback_metrics["val_acc"]))

    summary = json.loads((tmp_path / "version_0" / "rank_reports" / "compression.json").read_text())
    assert not (tmp_path / "version_0" / "lightning_rank").exists()
    assert summary["params_before"] == compression.result.params_before
    assert summary["params_after"] == compression.result.params_after
    assert summary["layers"] == replaced
    assert summary["metrics"] == metrics
    assert set(summary["metrics"]) == {"before", "compressed", "finetuned"}
    assert 0 < summary["macs_after"] < summary["macs_before"] == DIM * HIDDEN + HIDDEN * HIDDEN + HIDDEN * CLASSES


def test_logged_to_tensorboard(compressed_run) -> None:
    tmp_path, _, _, compression = compressed_run
    events = Events(tmp_path / "version_0")
    scalars = events.tags("scalars")
    for tag in ("0_rank_summary/params_ratio", "0_rank_summary/multiply_adds_ratio", "0_rank_summary/val_acc_change"):
        assert tag in scalars
    result = compression.result
    assert events.scalars("0_rank_summary/params_ratio")[-1][1] == pytest.approx(result.params_after / result.params_before)
    assert "parameters" in events.text("0_rank_summary/compression")[-1][1]  # the markdown table


def test_checkpoints_after_the_swap_load_for_inference(compressed_run) -> None:
    tmp_path, _, model, _ = compressed_run
    last = tmp_path / "ckpt" / "epoch=4.ckpt"
    restored = lr.load_factorized(Classifier(), last)
    assert isinstance(restored.net[0], lr.LowRankLinear)
    x = low_rank_dataset(16, 9).tensors[0]
    model.eval()
    restored.eval()
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    before_swap = torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=True)["state_dict"]
    assert "net.0.weight" in before_swap  # the checkpoint of the last dense epoch is still dense


def test_resume_from_a_post_swap_checkpoint(compressed_run, tmp_path: Path) -> None:
    first_dir, _, model, compression = compressed_run
    resumed_model = Classifier()
    resumed = lr.RankCompression(compress_at_epoch=3, method="whiten", monitor="val_acc")
    trainer = make_trainer(tmp_path, 5, [resumed], logger=TensorBoardLogger(tmp_path, name="", version=0))
    trainer.fit(resumed_model, ckpt_path=first_dir / "ckpt" / "epoch=3.ckpt")
    assert trainer.current_epoch == 5
    assert isinstance(resumed_model.net[0], lr.LowRankLinear)
    assert resumed.metrics["before"] == compression.metrics["before"]  # restored with the callback state
    assert resumed.metrics["finetuned"] is not None
    assert resumed.phase == Phase.FINISHED
    summary = json.loads((tmp_path / "version_0" / "rank_reports" / "compression.json").read_text())
    assert summary["layers"] == compression.result.layers


def test_resume_from_the_end_of_a_finished_dense_run_compresses_first(compressed_run, tmp_path: Path) -> None:
    first_dir, _, _, _ = compressed_run
    model = Classifier()
    compression = lr.RankCompression(compress_at_epoch=3, method="whiten", monitor="val_acc")
    trainer = make_trainer(tmp_path, 4, [compression])
    trainer.fit(model, ckpt_path=first_dir / "ckpt" / "epoch=2.ckpt")  # the 3 dense epochs are done
    assert compression.swap_epoch == 3 and trainer.current_epoch == 4
    assert isinstance(model.net[0], lr.LowRankLinear)
    assert None not in compression.metrics.values()


def test_resume_before_and_at_the_swap(compressed_run, tmp_path: Path) -> None:
    first_dir, _, _, first = compressed_run
    for epoch, phase in ((1, Phase.TRAINING), (2, Phase.PLANNED)):  # before the swap's epoch; its last dense epoch
        checkpoint = torch.load(first_dir / "ckpt" / f"epoch={epoch}.ckpt", weights_only=False)
        (state,) = [v for k, v in checkpoint["callbacks"].items() if "RankCompression" in k]
        assert state["phase"] == phase.value and state["factorization"] is None
        model = Classifier()
        compression = lr.RankCompression(compress_at_epoch=3, method="whiten", monitor="val_acc")
        trainer = make_trainer(tmp_path / str(epoch), 5, [compression], logger=False)
        trainer.fit(model, ckpt_path=first_dir / "ckpt" / f"epoch={epoch}.ckpt")
        assert trainer.current_epoch == 5 and compression.phase == Phase.FINISHED
        assert isinstance(model.net[0], lr.LowRankLinear) and None not in compression.metrics.values()
        if epoch == 2:  # the same dense weights and validation data: the same plan as the first run
            assert compression.result.layers == first.result.layers
            assert compression.metrics["before"] == first.metrics["before"]


class LayerTypes(Callback):
    """Records, at the end of each training epoch, whether the first layer is low-rank."""

    def __init__(self) -> None:
        self.low_rank: list[bool] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.low_rank.append(isinstance(pl_module.net[0], lr.LowRankLinear))


@pytest.mark.parametrize("compress_at_epoch", [3, 0.6])
def test_compress_at_epoch_as_index_or_fraction_of_max_epochs(compress_at_epoch: int | float, tmp_path: Path) -> None:
    L.seed_everything(0)
    compression = lr.RankCompression(compress_at_epoch=compress_at_epoch, method="whiten", monitor="val_acc")
    types = LayerTypes()
    trainer = make_trainer(tmp_path, 5, [compression, types], logger=False)
    trainer.fit(Classifier())
    assert compression.swap_epoch == 3  # int(0.6 * 5)
    assert types.low_rank == [False, False, False, True, True]
    assert trainer.max_epochs == 5 and trainer.current_epoch == 5


class OneCycle(Classifier):
    """A schedule sized by ``estimated_stepping_batches``: over the whole run, and after the swap over the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.schedules: list[tuple[int, int, int]] = []  # (global_step, estimated_stepping_batches, total_steps)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        estimated = int(self.trainer.estimated_stepping_batches)
        total = estimated - self.trainer.global_step
        self.schedules.append((self.trainer.global_step, estimated, total))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_a_schedule_sized_by_estimated_stepping_batches_ends_at_max_epochs(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = OneCycle()
    compression = lr.RankCompression(compress_at_epoch=3, method="whiten", monitor="val_acc")
    trainer = make_trainer(tmp_path, 5, [compression], logger=False)
    trainer.fit(model)  # OneCycleLR raises when stepped past total_steps
    steps = 5 * 8  # 512 training examples in batches of 64
    assert model.schedules == [(0, steps, steps), (3 * 8, steps, 2 * 8)]  # estimated_stepping_batches never stretched
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 16 and scheduler.last_epoch == 16 == trainer.global_step - 3 * 8
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.9)
    cycle = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.05, total_steps=16)
    for _ in range(16):
        reference.step()
        cycle.step()
    assert trainer.optimizers[0].param_groups[0]["lr"] == reference.param_groups[0]["lr"]  # the cycle's end


def test_dense_checkpoints_load_into_the_original_structure(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = Classifier()
    compression = lr.RankCompression(compress_at_epoch=2, monitor="val_acc", dense_checkpoints=True)
    trainer = make_trainer(tmp_path, 3, [compression], logger=False)
    trainer.fit(model)
    path = tmp_path / "dense.ckpt"
    trainer.save_checkpoint(path)
    dense = Classifier()
    dense.load_state_dict(torch.load(path, weights_only=True)["state_dict"])  # strict, plain structure
    x = low_rank_dataset(16, 9).tensors[0]
    model.eval()
    dense.eval()
    torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "rank_reports" / "compression.json").exists()  # no logger: default_root_dir
    assert not (tmp_path / "lightning_rank").exists()  # never a folder that shadows the package


def test_nothing_to_shrink_warns_and_ends_normally(tmp_path: Path) -> None:
    model = Classifier()
    full_ranks = {"net.0": DIM, "net.2": HIDDEN, "net.4": CLASSES}  # no layer saves parameters at full rank
    compression = lr.RankCompression(compress_at_epoch=2, monitor="val_acc", ranks=full_ranks)
    trainer = make_trainer(tmp_path, 5, [compression])
    with pytest.warns(UserWarning, match="replaced no layer"):
        trainer.fit(model)
    assert trainer.current_epoch == 5  # the dense model trains on to max_epochs
    assert compression.phase == Phase.FINISHED and not compression.compressed
    assert not any(isinstance(m, lr.LowRankLinear) for m in model.modules())


def test_monitored_metric_missing_lists_logged_metrics(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 2, [lr.RankCompression(compress_at_epoch=1, monitor="val_accuracy")])
    with pytest.raises(MisconfigurationException, match=r"val_accuracy.*Logged metrics: \['val_acc', 'val_loss'\]"):
        trainer.fit(Classifier())


class Counting(Classifier):
    """Counts its training steps, so a test can assert that a check came before any training."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


def test_no_validation_data(tmp_path: Path) -> None:
    model = Counting()
    trainer = make_trainer(tmp_path, 2, [lr.RankCompression()], limit_val_batches=0)
    with pytest.raises(MisconfigurationException, match="needs validation data"):
        trainer.fit(model)

    class NoValidation(Counting):
        validation_step = L.LightningModule.validation_step

    trainer = make_trainer(tmp_path, 2, [lr.RankCompression()])
    with pytest.raises(MisconfigurationException, match="needs validation data"):
        trainer.fit(NoValidation())

    class EmptyValidation(Counting):
        def val_dataloader(self):
            return DataLoader(TensorDataset(torch.zeros(0, DIM), torch.zeros(0, dtype=torch.long)), batch_size=8)

    empty = EmptyValidation()
    trainer = make_trainer(tmp_path, 2, [lr.RankCompression()])
    with pytest.raises(MisconfigurationException, match="validation dataloaders are empty") as error:
        trainer.fit(empty)
    assert "metric" not in str(error.value)
    assert model.steps == empty.steps == 0 and trainer.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "epochs", "match"),
    [
        ({"ranks": {"nonexistent": 3}}, 4, r"`ranks` key 'nonexistent' matches no selected layer"),
        ({"target_modules": "nomatch"}, 4, r"`target_modules`='nomatch' matches no module"),
        ({"param_budget": 0.01}, 4, r"`param_budget`=0.01 keeps .* even rank 1 .* at least 0\.\d+"),
        ({"compress_at_epoch": 4}, 4, r"`compress_at_epoch`=4 swaps .* epoch 4 .*max_epochs=4 allows epochs 1 to 3"),
        ({"compress_at_epoch": 0.2}, 4, r"`compress_at_epoch`=0.2 swaps .* epoch 0 .* allows epochs 1 to 3"),
        ({"compress_at_epoch": 0.5}, -1, r"`compress_at_epoch`=0.5 is a fraction of max_epochs, but max_epochs is -1"),
        ({"dataloader_idx": 1}, 4, r"dataloader_idx=1\): the fit has 1 validation dataloader"),
    ],
)
def test_what_can_be_checked_fails_before_training(kwargs: dict, epochs: int, match: str, tmp_path: Path) -> None:
    model = Counting()
    trainer = make_trainer(tmp_path, epochs, [lr.RankCompression(**kwargs)], logger=False, max_steps=100)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(model)
    assert model.steps == 0 and trainer.global_step == 0
    assert all(type(m) is nn.Linear for m in model.net if not isinstance(m, nn.ReLU))


def test_strategies_other_than_single_device_and_ddp_are_rejected() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    class Fake:  # Lightning refuses FSDP without a GPU, so the trainer is a stand-in
        strategy = FSDPStrategy()
        fast_dev_run = False

    with pytest.raises(MisconfigurationException, match=r"not support FSDPStrategy .* use `ModelParallelStrategy"):
        lr.RankCompression(compress_at_epoch=1).setup(Fake(), Classifier(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 0}, "threshold"),
        ({"param_budget": 1.5}, "param_budget"),
        ({"param_budget": 0.5, "ranks": 3}, "either `ranks` or a budget"),
        ({"method": "qr"}, "method"),
        ({"compress_at_epoch": 0}, "compress_at_epoch"),
        ({"compress_at_epoch": 1.0}, "compress_at_epoch"),
        ({"compress_at_epoch": -0.5}, "compress_at_epoch"),
        ({"dataloader_idx": -1}, "dataloader_idx"),
        ({"monitor": ""}, "monitor"),
        ({"max_rows_per_batch": 0}, "max_rows_per_batch"),
        ({"dtype": torch.float16}, "dtype"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lr.RankCompression(**kwargs)


class TwoSubspaces(Classifier):
    """Two validation dataloaders whose inputs lie in different subspaces (3 and 5 dimensions)."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))  # "val_loss/dataloader_idx_{i}"

    def val_dataloader(self):
        other = torch.randn(96, 5, generator=torch.Generator().manual_seed(3)) @ torch.randn(
            5, DIM, generator=torch.Generator().manual_seed(4)
        )
        wide = TensorDataset(other, torch.zeros(96, dtype=torch.long))
        return [DataLoader(low_rank_dataset(96, 2), batch_size=32), DataLoader(wide, batch_size=32)]


def test_dataloader_idx_picks_the_validation_dataloader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitors = {idx: lr.RankMonitor(threshold=0.999, dataloader_idx=idx) for idx in (0, 1, None)}
    trainer = make_trainer(tmp_path, 1, list(monitors.values()), logger=False)
    trainer.validate(TwoSubspaces(), verbose=False)
    in_ranks = {idx: monitor.report.layers["net.0"].in_rank for idx, monitor in monitors.items()}
    rows = {idx: monitor.report.layers["net.0"].rows for idx, monitor in monitors.items()}
    assert in_ranks == {0: SUBSPACE, 1: 5, None: SUBSPACE + 5}  # two generic subspaces pooled: the sum
    assert rows == {0: 96, 1: 96, None: 192}

    ranks = {}
    for idx in (0, 1):
        compression = lr.RankCompression(
            compress_at_epoch=1, threshold=0.999, dataloader_idx=idx, monitor=f"val_loss/dataloader_idx_{idx}"
        )
        trainer = make_trainer(tmp_path / str(idx), 2, [compression], logger=False)
        trainer.fit(TwoSubspaces())
        ranks[idx] = compression.result.layers["net.0"]
    assert ranks[0] in (SUBSPACE, SUBSPACE + 1) and ranks[1] in (5, 6)  # (+1: the bias direction of the output)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_ddp_parameters_identical_after_finetuning(tmp_path: Path) -> None:
    L.seed_everything(0)
    trainer = make_trainer(
        tmp_path, 3, [lr.RankCompression(compress_at_epoch=2, monitor="val_acc"), ParameterCheck(tmp_path)],
        strategy="ddp_spawn", devices=2, logger=False,
    )
    trainer.fit(Classifier(lr_=0.2))
    results = [json.loads((tmp_path / f"params_rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["equal"], "ranks disagree: the new layers' gradients were not synchronized"
        assert result["epoch"] == 3
        assert list(result["types"].values()).count("LowRankLinear") == 3
        assert result["ddp_wrappers"] == 1  # the wrapper from before the swap is gone, not left for exit
    assert results[0]["numel"] == results[1]["numel"]
    summary = json.loads((tmp_path / "rank_reports" / "compression.json").read_text())
    assert summary["params_after"] == results[0]["numel"]


class BuiltInConfigureModel(Counting):
    """Builds its layers in ``configure_model``, after the callbacks' ``setup``."""

    def __init__(self) -> None:
        super().__init__()
        del self.net

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            self.net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


@pytest.mark.parametrize("model_class", [Counting, BuiltInConfigureModel])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_modules": "nomatch"}, r"RankMonitor: `target_modules`='nomatch' matches no module"),
        ({"target_modules": ["net.9"]}, r"RankMonitor: `target_modules` names 'net.9', which matches no module"),
        ({"exclude_modules": "net.*"}, r"RankMonitor: \w+ has no layer to analyze"),
    ],
)
def test_rank_monitor_checks_its_selectors_before_training(model_class, kwargs: dict, match: str, tmp_path: Path) -> None:
    model = model_class()
    trainer = make_trainer(tmp_path, 2, [lr.RankMonitor(**kwargs)], logger=False)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(model)
    assert model.steps == 0 and trainer.global_step == 0
    trainer = make_trainer(tmp_path, 2, [lr.RankMonitor(**kwargs)], logger=False)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.validate(model_class(), verbose=False)


def test_rank_monitor_selectors_of_layers_built_in_configure_model_are_checked_once_they_exist(tmp_path: Path) -> None:
    monitor = lr.RankMonitor(target_modules=["net.2"])  # no `net` before configure_model
    trainer = make_trainer(tmp_path, 1, [monitor], logger=False, limit_train_batches=2, limit_val_batches=2)
    trainer.fit(BuiltInConfigureModel())
    assert list(monitor.report.analyzed) == ["net.2"]


@pytest.mark.parametrize("budget", ["param_budget", "macs_budget"])
def test_budgets_are_allocated_by_the_models_own_output_on_validation_batches(tmp_path: Path, budget: str) -> None:
    """One process: the first validation batches calibrate the allocation (the probe rule), in either unit."""
    L.seed_everything(0)
    model = Classifier()
    compression = lr.RankCompression(compress_at_epoch=2, method="whiten", monitor="val_acc", **{budget: 0.3})
    make_trainer(tmp_path, 3, [compression], logger=False).fit(model)
    result = compression.result
    assert result.allocation in ("probe", "uniform") and result.layers  # the better of the two on calibration
    kept = {name: d for name, d in result.details.items() if d.energy_kept is not None}
    assert kept and all(0 <= d.energy_kept <= 1 and d.sensitivity is not None for d in kept.values())
    summary = json.loads((tmp_path / "rank_reports" / "compression.json").read_text())
    if budget == "macs_budget":  # every selected layer is replaceable here, so the whole forward shrinks
        assert summary["macs_after"] <= 0.3 * summary["macs_before"] * 1.05
    else:
        assert result.layer_params_after <= 0.3 * result.layer_params_before
