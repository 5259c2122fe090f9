"""Checkpoints of compressed models: what ``ModelCheckpoint`` keeps after the swap, and loading them back."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn

import lightning_rank as lr
from tests.helpers import assert_unchanged, snapshot
from tests.tiny_models import Classifier, low_rank_dataset, make_trainer


def low_rank_keys(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` holds the factorized structure (and not dense weights)."""
    state = torch.load(path, weights_only=True)["state_dict"]
    if "net.0.first.weight" in state:
        assert "net.0.weight" not in state
        return True
    assert "net.0.weight" in state
    return False


class FrozenAfterSwap(Classifier):
    """Fine-tunes with learning rate 0, and logs ``size``: its parameter count, or minus it for ``mode="min"``.

    The compressed model has fewer parameters and never changes after the swap, so it never beats the dense
    model's best ``size`` in either mode, and every checkpoint of it equals the final model.
    """

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.sign = sign

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("size", self.sign * float(sum(p.numel() for p in self.parameters())))

    def configure_optimizers(self):
        compressed = any(isinstance(m, lr.LowRankLinear) for m in self.modules())
        return torch.optim.SGD(self.parameters(), lr=0.0 if compressed else 0.05)


def assert_loads_as(path: str | Path, model: nn.Module) -> None:
    """``lr.load_factorized(Classifier(), path)`` is low-rank and computes exactly what ``model`` computes."""
    restored = lr.load_factorized(Classifier(), path)
    assert isinstance(restored.net[0], lr.LowRankLinear)
    x = low_rank_dataset(32, 9).tensors[0]
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("save_last", [True, False])
@pytest.mark.parametrize("mode", ["max", "min"])
def test_best_and_last_checkpoints_hold_the_compressed_model(mode: str, save_last: bool, tmp_path: Path) -> None:
    L.seed_everything(0)
    model = FrozenAfterSwap(sign=1.0 if mode == "max" else -1.0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="size", mode=mode, save_top_k=1,
                                 save_last=save_last, filename="{epoch}")
    compression = lr.RankCompression(compress_at_epoch=2, monitor="val_loss")
    trainer = make_trainer(tmp_path, 4, [compression, checkpoint], logger=False)
    trainer.fit(model)
    assert compression.compressed
    dense_best = tmp_path / "ckpt" / "epoch=0.ckpt"  # the dense model's best size: kept, no longer tracked
    assert dense_best.exists() and not low_rank_keys(dense_best)
    assert Path(checkpoint.best_model_path).name == "epoch=2.ckpt"  # the first compressed epoch: best among them
    assert low_rank_keys(checkpoint.best_model_path)
    assert checkpoint.best_model_score == float(model.sign * sum(p.numel() for p in model.parameters()))
    assert_loads_as(checkpoint.best_model_path, model)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0.ckpt", "epoch=2.ckpt"] + (
        ["last.ckpt"] if save_last else []
    )
    if save_last:
        assert low_rank_keys(tmp_path / "ckpt" / "last.ckpt")
        assert_loads_as(tmp_path / "ckpt" / "last.ckpt", model)


def test_a_checkpoint_that_did_not_save_after_the_swap_saves_the_compressed_model_at_the_end(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = FrozenAfterSwap()
    every_other = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="size", mode="max", every_n_epochs=2,
                                  save_last=True, filename="{epoch}")  # saves after epochs 1, 3, ...: never after 2
    trainer = make_trainer(tmp_path, 3, [lr.RankCompression(compress_at_epoch=2), every_other], logger=False)
    trainer.fit(model)
    assert Path(every_other.best_model_path).name == "epoch=3.ckpt"  # its template, with trainer.current_epoch at the end
    assert low_rank_keys(every_other.best_model_path) and low_rank_keys(tmp_path / "ckpt" / "last.ckpt")
    assert_loads_as(every_other.best_model_path, model)
    assert not low_rank_keys(tmp_path / "ckpt" / "epoch=1.ckpt")


class Stops(Callback):
    def __init__(self) -> None:
        self.stopped_at: int | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.stopped_at = trainer.current_epoch


def test_early_stopping_counts_patience_from_the_swap(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = FrozenAfterSwap()
    stopping = EarlyStopping(monitor="size", mode="max", patience=3)  # the compressed size never beats the dense one
    stops = Stops()
    trainer = make_trainer(tmp_path, 8, [lr.RankCompression(compress_at_epoch=2), stopping, stops], logger=False,
                           enable_checkpointing=False)
    trainer.fit(model)
    # epochs 0-1 dense (0 is best: the size never grows), the swap at 2, its best; then 3 epochs of patience: 3, 4, 5
    # (without the restart, patience would have run out after epoch 3)
    assert stopping.stopped_epoch == 5 and stops.stopped_at == 6


def test_a_warning_when_the_compressed_model_cannot_be_saved(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="never_logged", every_n_epochs=10)  # never due
    trainer = make_trainer(tmp_path, 3, [lr.RankCompression(compress_at_epoch=2), checkpoint], logger=False)
    with pytest.warns(UserWarning, match=r"ModelCheckpoint\(monitor='never_logged'\) could not save the final model"):
        trainer.fit(FrozenAfterSwap())
    assert checkpoint.best_model_path == "" and not (tmp_path / "ckpt").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_under_ddp_spawn_the_checkpoints_hold_the_compressed_model(tmp_path: Path) -> None:
    L.seed_everything(0)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "a", monitor="size", mode="max", save_last=True, filename="{epoch}")
    never_due = ModelCheckpoint(dirpath=tmp_path / "b", monitor="size", mode="max", every_n_epochs=5, filename="{epoch}")
    trainer = make_trainer(tmp_path, 2, [lr.RankCompression(compress_at_epoch=1), every_epoch, never_due],
                           strategy="ddp_spawn", devices=2, logger=False)
    trainer.fit(FrozenAfterSwap())  # the launching process's model is not the trained one: Lightning loads it non-strictly
    best = Path(trainer.checkpoint_callback.best_model_path)  # sent back from the first process
    assert best == tmp_path / "a" / "epoch=1.ckpt" and low_rank_keys(best)
    assert not low_rank_keys(tmp_path / "a" / "epoch=0.ckpt")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["epoch=2.ckpt"]  # saved at the end, on every process
    trained = lr.load_factorized(Classifier(), tmp_path / "a" / "last.ckpt")
    for path in (best, tmp_path / "b" / "epoch=2.ckpt"):
        assert_loads_as(path, trained)  # fine-tuning at learning rate 0: every compressed checkpoint is the final model


# -- loading a checkpoint written after the swap ---------------------------------------------------
class Reloadable(lr.FactorizedCheckpointMixin, FrozenAfterSwap):
    pass


@pytest.fixture(scope="module")
def post_swap(tmp_path_factory: pytest.TempPathFactory):
    """A fit of 3 epochs, the swap at 2; returns the trained model and its last checkpoint (after the swap)."""
    tmp_path = tmp_path_factory.mktemp("post_swap")
    L.seed_everything(0)
    model = Reloadable()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(tmp_path, 3, [lr.RankCompression(compress_at_epoch=2), checkpoint], logger=False)
    trainer.fit(model)
    return model, tmp_path / "last.ckpt"


def test_a_plain_load_from_checkpoint_fails_and_the_checkpoint_says_how_to_load_it(post_swap) -> None:
    model, path = post_swap
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"net.0.first.weight\""):
        FrozenAfterSwap.load_from_checkpoint(path)  # Lightning's own error: a LightningModule we cannot change
    metadata = torch.load(path, weights_only=True)["lightning_rank"]
    assert metadata["factorized_layers"] == {name: m.rank for name, m in model.named_modules()
                                             if isinstance(m, lr.LowRankLinear)}
    assert "lr.load_factorized(Model(...), path)" in metadata["how_to_load"]
    assert "lr.FactorizedCheckpointMixin" in metadata["how_to_load"]


def test_load_from_checkpoint_with_the_mixin_and_load_factorized_give_the_trained_model(post_swap) -> None:
    model, path = post_swap
    x = low_rank_dataset(32, 9).tensors[0]
    model.eval()
    for restored in (Reloadable.load_from_checkpoint(path), lr.load_factorized(FrozenAfterSwap(), path)):
        restored.eval()
        assert isinstance(restored.net[0], lr.LowRankLinear)
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)


def test_trainer_validate_with_ckpt_path_rebuilds_when_rank_compression_is_a_callback(post_swap, tmp_path: Path) -> None:
    model, path = post_swap
    trainer = make_trainer(tmp_path, 1, [], logger=False)
    (expected,) = trainer.validate(model, verbose=False)
    fresh = FrozenAfterSwap()
    trainer = make_trainer(tmp_path, 1, [lr.RankCompression()], logger=False)
    (metrics,) = trainer.validate(fresh, ckpt_path=path, verbose=False)
    assert isinstance(fresh.net[0], lr.LowRankLinear) and metrics == expected
    assert "on_load_checkpoint" not in vars(fresh)  # the hook is unwrapped after the run


# -- load_factorized with tied weights, strict and not ----------------------------------------------
class TiedLM(nn.Module):
    """An embedding tied to the output layer, as in GPT-2: ``head.weight is embed.weight``."""

    def __init__(self, vocab: int = 40, d: int = 16, hidden: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(h + self.mlp(h))


@pytest.fixture()
def tied():
    """A factorized TiedLM and its state dict without the tied ``head.weight`` (as ``save_pretrained`` writes it)."""
    torch.manual_seed(0)
    model = TiedLM()
    tokens = torch.randint(0, 40, (8, 12))
    result = lr.factorize_(model, lr.collect(model, [tokens]), method="whiten", ranks=4)
    assert set(result.layers) == {"mlp.0", "mlp.2"}  # the tied head is never factorized
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    return model, state, tokens


def test_load_factorized_fills_a_tied_weight_the_state_dict_omits(tied) -> None:
    model, state, tokens = tied
    fresh = lr.load_factorized(TiedLM(), state)
    assert fresh.head.weight is fresh.embed.weight  # still tied
    assert isinstance(fresh.mlp[0], lr.LowRankLinear) and fresh.mlp[0].rank == 4
    torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.pop("mlp.2.second.bias"), r"Missing keys: \['mlp.2.second.bias'\]; unexpected keys: \[\]"),
        (lambda s: s.update(extra=torch.zeros(1)), r"Missing keys: \[\]; unexpected keys: \['extra'\]"),
        (lambda s: s.update({"embed.weight": torch.zeros(41, 16)}), r"Size mismatch: \['embed.weight: \(41, 16\)"),
    ],
)
def test_load_factorized_changes_nothing_when_the_state_dict_does_not_fit(tied, change, match: str) -> None:
    _, state, _ = tied
    change(state)
    fresh = TiedLM()
    before = snapshot(fresh)
    with pytest.raises(RuntimeError, match=r"nothing was changed\..*" + match):
        lr.load_factorized(fresh, state)
    assert_unchanged(fresh, before)  # the same modules, so of the same types, and the same state
    assert type(fresh.mlp[0]) is nn.Linear
    if "Size" in match:  # shapes must fit even with strict=False
        with pytest.raises(RuntimeError, match=match):
            lr.load_factorized(fresh, state, strict=False)
        assert type(fresh.mlp[0]) is nn.Linear


def test_load_factorized_strict_false_loads_what_fits_and_warns_about_the_rest(tied) -> None:
    model, state, _ = tied
    del state["mlp.2.second.bias"]
    state["extra"] = torch.zeros(1)
    fresh = TiedLM()
    dense_bias = fresh.mlp[2].bias.detach().clone()
    with pytest.warns(UserWarning, match=r"missing keys \['mlp.2.second.bias'\].*unexpected keys \['extra'\]"):
        returned = lr.load_factorized(fresh, state, strict=False)
    assert returned is fresh and isinstance(fresh.mlp[2], lr.LowRankLinear)
    assert torch.equal(fresh.mlp[2].second.bias, dense_bias)  # left as it was
    for key, value in model.state_dict().items():
        if key != "mlp.2.second.bias":
            assert torch.equal(fresh.state_dict()[key], value), key
