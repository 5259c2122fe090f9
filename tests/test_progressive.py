"""Progressive compression (several steps inside one fit) and distillation from the dense model, with real Trainer
runs on CPU: ranks and budgets at each step, compression.json, resume between and at the steps, argument checks."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

import lightning_rank as lr
from lightning_rank.callbacks.schedule import Phase
from lightning_rank.views import figures
from tests.tiny_models import Classifier, low_rank_dataset, make_trainer

LAYERS = ("net.0", "net.2", "net.4")
BUDGETS = [0.5, 0.25]


class Steady(Classifier):
    """:class:`Classifier` with unshuffled training data, so a resumed fit sees the batches an uninterrupted one does;
    with ``distill``, ``training_step`` mixes in the distillation loss in its one extra line."""

    def __init__(self, distill: bool = False) -> None:
        super().__init__()
        self.distill = distill

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        return lr.distillation_loss(self, batch, logits, loss) if self.distill else loss

    def train_dataloader(self):
        return DataLoader(low_rank_dataset(512, 1), batch_size=64)


def layer_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for name in LAYERS for p in model.get_submodule(name).parameters())


class Sizes(Callback):
    """The selected layers' parameter count and ranks when each training epoch starts (after any swap)."""

    def __init__(self) -> None:
        self.params: dict[int, int] = {}
        self.ranks: dict[int, dict[str, int | None]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.params[trainer.current_epoch] = layer_params(pl_module)
        self.ranks[trainer.current_epoch] = {n: getattr(pl_module.get_submodule(n), "rank", None) for n in LAYERS}


class BuiltLate(Steady):
    """:class:`Steady` whose layers are built in ``configure_model``, after the callbacks' ``setup``."""

    def __init__(self, distill: bool = False) -> None:
        super().__init__(distill)
        del self.net

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                           torch.nn.ReLU(), torch.nn.Linear(64, 4))


def fit(root: Path, ckpt_path: Path | None = None, distill: bool = False, model_class: type[Steady] = Steady,
        **options):
    L.seed_everything(0)
    model = model_class(distill)
    compression = lr.RankCompression(compress_at_epoch=[2, 4], param_budget=BUDGETS, monitor="val_acc",
                                     distill=1.0 if distill else None, **options)
    sizes = Sizes()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer = make_trainer(root, 6, [compression, sizes, checkpoints], logger=False)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, compression, sizes


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted fit of 6 epochs: dense epochs 0-1, step 1 (50%) when epoch 2 starts, step 2 (25%) when
    epoch 4 starts; checkpoints every epoch."""
    root = tmp_path_factory.mktemp("progressive")
    return (root, *fit(root))


def test_ranks_fall_and_each_budget_is_met_at_its_step(two_steps) -> None:
    root, model, compression, sizes = two_steps
    dense = layer_params(Steady())
    assert sizes.params[0] == sizes.params[1] == dense
    assert dense * BUDGETS[1] < sizes.params[2] <= dense * BUDGETS[0]  # the first step keeps at most 50%
    assert sizes.params[4] <= dense * BUDGETS[1] < sizes.params[3]  # the second at most 25% of the original
    first, second = sizes.ranks[2], sizes.ranks[4]
    assert all(first[n] is not None for n in LAYERS[:2]) and all(second[n] is not None for n in LAYERS[:2])
    assert all(second[n] <= first[n] for n in LAYERS if first[n] is not None)
    assert sum(r for r in second.values() if r) < sum(r for r in first.values() if r)
    for name in LAYERS[:2]:  # a re-factorized pair is one pair of plain layers, never a pair inside a pair
        pair = model.get_submodule(name)
        assert isinstance(pair, lr.LowRankLinear) and type(pair.first) is torch.nn.Linear
    assert compression.step == 2 and compression.phase == Phase.FINISHED


def test_compression_json_has_one_entry_per_step(two_steps) -> None:
    root, model, compression, sizes = two_steps
    summary = json.loads((root / "rank_reports" / "compression.json").read_text())
    steps = summary["steps"]
    assert [s["epoch"] for s in steps] == [2, 4] and [s["param_budget"] for s in steps] == BUDGETS
    for step in steps:
        assert None not in step["metrics"].values() and step["macs_after"] < step["macs_before"]
    assert steps[0]["params_after"] == steps[1]["params_before"]  # the second step starts from the first's model
    assert steps[0]["metrics"]["finetuned"] == steps[1]["metrics"]["before"]
    assert summary["params_before"] == steps[0]["params_before"] == sum(p.numel() for p in Steady().parameters())
    assert summary["params_after"] == steps[1]["params_after"] == sum(p.numel() for p in model.parameters())
    assert summary["metrics"]["before"] == steps[0]["metrics"]["before"]
    assert summary["metrics"]["finetuned"] == steps[1]["metrics"]["finetuned"]
    final = {n: m.rank for n, m in model.named_modules() if isinstance(m, lr.LowRankLinear)}
    assert summary["layers"] == final


@pytest.mark.parametrize("epoch", [2, 3])  # fine-tuning after step 1; the last epoch before step 2
def test_resume_between_the_steps_gives_the_weights_of_an_uninterrupted_run(two_steps, epoch: int, tmp_path) -> None:
    root, model, compression, sizes = two_steps
    resumed_model, resumed, resumed_sizes = fit(tmp_path, root / "ckpt" / f"epoch={epoch}.ckpt")
    assert resumed.step == 2 and resumed_sizes.ranks[4] == sizes.ranks[4]
    expected, got = model.state_dict(), resumed_model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert len(resumed.summary()["steps"]) == 2


def test_a_compressed_checkpoint_between_the_steps_loads_for_inference(two_steps) -> None:
    root, *_ = two_steps
    restored = lr.load_factorized(Steady(), root / "ckpt" / "epoch=3.ckpt")
    state = torch.load(root / "ckpt" / "epoch=3.ckpt", weights_only=False)["state_dict"]
    assert isinstance(restored.net[0], lr.LowRankLinear)
    assert restored.net[0].first.weight.shape == state["net.0.first.weight"].shape


def test_distillation_uses_a_frozen_dense_copy_that_survives_a_resume(tmp_path: Path) -> None:
    model, compression, sizes = fit(tmp_path / "a", distill=True)
    teacher = compression.teacher
    assert not any(isinstance(m, lr.LowRankLinear) for m in teacher.modules())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    dense = torch.load(tmp_path / "a" / "ckpt" / "epoch=1.ckpt", weights_only=False)["state_dict"]
    for key, value in teacher.state_dict().items():  # the model as the last dense epoch left it
        torch.testing.assert_close(value, dense[key], rtol=0, atol=0, msg=key)
    x, y = low_rank_dataset(64, 1).tensors
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    target = F.softmax(teacher(x), -1)
    kl = (target * (target.log() - F.log_softmax(logits, -1))).sum(-1).mean()
    torch.testing.assert_close(lr.distillation_loss(model, (x, y), logits, loss), kl)  # distill=1.0: KL only
    labels_only, *_ = fit(tmp_path / "b")
    assert not torch.equal(labels_only.net[0].second.weight, model.net[0].second.weight)  # the loss changed training

    resumed_model, resumed, _ = fit(tmp_path / "c", tmp_path / "a" / "ckpt" / "epoch=4.ckpt", distill=True)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(resumed.teacher.state_dict()[key], value, rtol=0, atol=0, msg=key)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("epoch", [1, 3])  # the last dense epoch; between the steps, the teacher in the checkpoint
def test_a_teacher_of_layers_built_in_configure_model_is_restored_on_resume(epoch: int, tmp_path: Path) -> None:
    model, compression, _ = fit(tmp_path / "a", distill=True, model_class=BuiltLate)
    dense = torch.load(tmp_path / "a" / "ckpt" / "epoch=1.ckpt", weights_only=False)["state_dict"]
    assert compression.teacher.state_dict().keys() == dense.keys()
    checkpoint = torch.load(tmp_path / "a" / "ckpt" / f"epoch={epoch}.ckpt", weights_only=False)
    saved = checkpoint["callbacks"][next(k for k in checkpoint["callbacks"] if "RankCompression" in k)]["teacher"]
    assert (saved is None) == (epoch == 1)  # after the first swap the checkpoint carries the dense weights

    resumed_model, resumed, _ = fit(tmp_path / "b", tmp_path / "a" / "ckpt" / f"epoch={epoch}.ckpt", distill=True,
                                    model_class=BuiltLate)
    assert isinstance(resumed.teacher, torch.nn.Module) and not resumed.teacher.training
    assert not any(isinstance(m, lr.LowRankLinear) for m in resumed.teacher.modules())
    for key, value in dense.items():  # the model as the last dense epoch left it, not as the checkpoint holds it
        torch.testing.assert_close(resumed.teacher.state_dict()[key], value, rtol=0, atol=0, msg=key)
    expected, got = model.state_dict(), resumed_model.state_dict()
    assert expected.keys() == got.keys() and any(isinstance(m, lr.LowRankLinear) for m in resumed_model.modules())
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_distillation_loss_is_the_loss_itself_without_a_teacher(tmp_path: Path) -> None:
    model = Steady()
    trainer = make_trainer(tmp_path, 1, [lr.RankCompression(compress_at_epoch=1, distill=0.5)], logger=False)
    model.trainer = trainer
    loss = torch.tensor(1.5)
    assert lr.distillation_loss(model, None, torch.zeros(2, 3), loss) is loss
    assert lr.distillation_loss(Steady(), None, torch.zeros(2, 3), loss) is loss  # no trainer at all


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compress_at_epoch": [2, 4], "param_budget": [0.5]}, "`param_budget` has 1 budgets but"),
        ({"compress_at_epoch": [4, 2], "param_budget": [0.5, 0.25]}, "`compress_at_epoch`=.* must increase"),
        ({"compress_at_epoch": [2, 4], "param_budget": [0.25, 0.5]}, "`param_budget`=.* must decrease"),
        ({"compress_at_epoch": [2, 4], "param_budget": 0.5}, "one budget per step"),
        ({"compress_at_epoch": [2, 4]}, "one budget per step"),
        ({"compress_at_epoch": [2, 4], "param_budget": [0.5, 0.25], "macs_budget": [0.5, 0.25]}, "not both"),
        ({"compress_at_epoch": [], "param_budget": []}, "at least one epoch"),
        ({"compress_at_epoch": [2, 0.5], "param_budget": [0.5, 0.25]}, "all epoch indices or all fractions"),
        ({"distill": 1.5}, "`distill` must be a fraction"),
        ({"distill": 0.5, "temperature": 0}, "`temperature` must be a number > 0"),
    ],
)
def test_bad_schedules(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lr.RankCompression(**kwargs)


def test_steps_that_share_an_epoch_or_leave_none_to_fine_tune_fail_in_setup(tmp_path: Path) -> None:
    for epochs, match in (([0.5, 0.55], "each step needs an epoch of its own"), ([2, 6], "max_epochs=6 allows")):
        compression = lr.RankCompression(compress_at_epoch=epochs, param_budget=BUDGETS)
        trainer = make_trainer(tmp_path, 6, [compression], logger=False)
        with pytest.raises(MisconfigurationException, match=match):
            trainer.fit(Steady())


def test_a_single_step_keeps_its_summary_without_steps(tmp_path: Path) -> None:
    L.seed_everything(0)
    compression = lr.RankCompression(compress_at_epoch=[2], param_budget=[0.5], monitor="val_acc")
    trainer = make_trainer(tmp_path, 3, [compression], logger=False)
    trainer.fit(Steady())
    summary = json.loads((tmp_path / "rank_reports" / "compression.json").read_text())
    assert "steps" not in summary and summary["param_budget"] == 0.5 and compression.param_budget == 0.5
    assert summary["layers"] == compression.result.layers and compression.compress_at_epoch == 2


def test_the_heatmap_marks_every_step_a_history_tells_apart() -> None:
    report = {"mlu": 0.5, "layers": {"a": {"utilization": 0.5}}}
    marks = [False, False, {"a": 4}, {"a": 4}, {"a": 2}, {"a": 2}]
    history = [{"epoch": i, "report": report, "factorized": mark} for i, mark in enumerate(marks)]
    assert figures.compression_columns(history) == [2, 4]
    assert figures.compression_columns([{**h, "factorized": bool(h["factorized"])} for h in history]) == [2]
    one = figures.heatmap_image([{**h, "factorized": bool(h["factorized"])} for h in history])
    two = figures.heatmap_image(history)
    assert one.size == two.size and one.tobytes() != two.tobytes()


def test_refactorize_plans_a_pair_from_its_product_and_replaces_it_at_the_same_name() -> None:
    torch.manual_seed(0)
    model = Steady().net
    batches = [low_rank_dataset(64, 3).tensors[0]]
    dense = sum(p.numel() for name in ("0", "2", "4") for p in model.get_submodule(name).parameters())
    lr.factorize_(model, lr.collect(model, batches), param_budget=0.5, allocation="uniform", progress=False)
    first = {n: m.rank for n, m in model.named_modules() if isinstance(m, lr.LowRankLinear)}
    stats = lr.collect(model, batches)
    with pytest.raises(ValueError, match="already factorized"):
        lr.plan_factorization(model, stats, param_budget=0.25, progress=False)
    before = model(batches[0])
    old_pairs = {n: model.get_submodule(n) for n in first}
    plan = lr.plan_factorization(model, stats, param_budget=0.25, allocation="uniform", refactorize=True,
                                 progress=False)
    assert all(model.get_submodule(n) is old_pairs[n] for n in first)  # planning changed nothing
    result = plan.apply_(model)
    second = {n: m.rank for n, m in model.named_modules() if isinstance(m, lr.LowRankLinear)}
    assert set(first) <= set(second) and all(second[n] <= first[n] for n in first) and second != first
    assert all(type(model.get_submodule(n).first) is torch.nn.Linear for n in second)
    assert result.params_after == sum(p.numel() for p in model.parameters()) < result.params_before
    assert sum(p.numel() for name in ("0", "2", "4") for p in model.get_submodule(name).parameters()) <= 0.25 * dense
    error = (model(batches[0]) - before).norm() / before.norm()
    assert 0 < error < 0.5


def test_the_monitor_marks_both_steps_of_a_fit(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = lr.RankMonitor(tensorboard=False)
    compression = lr.RankCompression(compress_at_epoch=[2, 4], param_budget=BUDGETS, monitor="val_acc")
    make_trainer(tmp_path, 6, [monitor, compression], logger=False).fit(Steady(False))
    assert [entry["epoch"] for entry in monitor.history] == list(range(6))
    assert figures.compression_columns(monitor.history) == [2, 4]  # the first reports after each swap
    assert monitor.history[4]["factorized"] == compression.summary()["layers"]
