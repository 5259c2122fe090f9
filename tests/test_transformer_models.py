"""Factorized PyTorch transformer layers against the dense model of the same weights, in every mode.

``nn.TransformerEncoderLayer`` has a fused inference kernel that reads ``linear1.weight`` /
``linear2.weight``, and ``nn.TransformerEncoder`` packs padded inputs into nested tensors; both
must keep working, with the same outputs, after the feed-forward layers are factorized.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_rank as lr
from tests.tiny_models import make_trainer

D, HEADS, FF, LAYERS = 16, 2, 64, 2
LENGTHS = (6, 4, 3, 5)  # sequence lengths of the padded test batch (T = 6)
MODES = ("train", "eval", "no_grad", "inference_mode")


def encoder(norm_first: bool = False, nested: bool = True, seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True, norm_first=norm_first)
    with warnings.catch_warnings():  # norm_first=True turns nested tensors off, with a warning
        warnings.simplefilter("ignore")
        return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=nested)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(4, 6, D)`` and their padding mask (True at padding, at the end of each sequence)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LENGTHS), max(LENGTHS), D, generator=g)
    mask = torch.arange(max(LENGTHS)) >= torch.tensor(LENGTHS)[:, None]
    return x, mask


def dense_reference(factorized: nn.Module, fresh: nn.Module) -> nn.Module:
    """``fresh`` (a newly built dense model) with the weights of ``factorized``, each low-rank layer as ``A B``."""
    state = dict(factorized.state_dict())
    for name, module in factorized.named_modules():
        if isinstance(module, lr.LowRankLinear):
            for key in [k for k in state if k.startswith(f"{name}.first.") or k.startswith(f"{name}.second.")]:
                del state[key]
            state.update({f"{name}.{k}": v for k, v in module.to_dense().state_dict().items()})
    fresh.load_state_dict(state, strict=True)
    return fresh


@contextlib.contextmanager
def mode(model: nn.Module, name: str) -> Iterator[None]:
    model.train(name == "train")
    grad = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(name, contextlib.nullcontext())
    with grad:
        yield


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the fused encoder-layer kernel (the inference fast path)."""
    calls: list[int] = []
    kernel = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    return calls


@functools.lru_cache
def _statistics(norm_first: bool) -> lr.ActivationStatistics:
    x, _ = batch(seed=2)
    return lr.collect(encoder(norm_first), [x, torch.randn(8, 5, D, generator=torch.Generator().manual_seed(3))])


def factorized_encoder(norm_first: bool, **factorize_kwargs) -> tuple[nn.Module, lr.FactorizationResult]:
    """``encoder(norm_first)`` through ``lr.collect`` (statistics shared across tests) and ``lr.factorize_``."""
    model = encoder(norm_first)
    result = lr.factorize_(model, _statistics(norm_first), **factorize_kwargs)
    return model, result


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padding_mask"])
@pytest.mark.parametrize("name", MODES)
def test_factorized_encoder_matches_dense_in_every_mode(name: str, padded: bool, norm_first: bool, fused_calls) -> None:
    model, result = factorized_encoder(norm_first, ranks=5)
    assert set(result.layers) == {f"layers.{i}.linear{j}" for i in range(LAYERS) for j in (1, 2)}
    reference = dense_reference(model, encoder(norm_first, seed=5))
    x, mask = batch()
    kwargs = {"src_key_padding_mask": mask} if padded else {}

    with mode(reference, name):
        expected = reference(x, **kwargs)
    dense_fused = len(fused_calls)
    with mode(model, name):
        actual = model(x, **kwargs)

    real = ~mask if padded else torch.ones(mask.shape, dtype=torch.bool)
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-4, atol=1e-5)
    assert len(fused_calls) == dense_fused  # the factorized model never took the fused kernel
    if name in ("no_grad", "inference_mode"):
        assert dense_fused == LAYERS  # so the comparison above was against torch's fast path
        if padded and not norm_first:  # the dense model ran on nested tensors: zeros at the padding
            assert expected[mask].abs().max() == 0
    else:
        assert dense_fused == 0


def test_nested_tensors_reach_factorized_layers_after_a_dense_first_layer(fused_calls) -> None:
    """The encoder checks only its first layer before packing nested tensors; later low-rank layers take them."""
    model, result = factorized_encoder(False, ranks={"layers.1.linear1": 4, "layers.1.linear2": 4})
    assert set(result.layers) == {"layers.1.linear1", "layers.1.linear2"}
    assert model.use_nested_tensor and model.layers[0].activation_relu_or_gelu == 1
    reference = dense_reference(model, encoder(seed=5))
    x, mask = batch()
    with torch.inference_mode():
        expected = reference.eval()(x, src_key_padding_mask=mask)
        actual = model.eval()(x, src_key_padding_mask=mask)
    assert len(fused_calls) == LAYERS + 1  # dense: both layers; factorized: the dense first layer only
    assert actual[mask].abs().max() == 0  # nested tensors all the way, as in the dense model
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_disable_dense_fast_paths_touches_only_what_reads_a_factorized_weight() -> None:
    from lightning_rank.compress.layers import disable_dense_fast_paths

    dense = nn.Sequential(encoder(), encoder())
    assert disable_dense_fast_paths(dense) == []
    assert all(m.activation_relu_or_gelu == 1 for m in dense.modules() if isinstance(m, nn.TransformerEncoderLayer))
    lr.factorize_(dense, None, method="svd", ranks={"0.layers.0.linear2": 4, "1.layers.1.linear1": 4})
    flags = {name: m.activation_relu_or_gelu for name, m in dense.named_modules()
             if isinstance(m, nn.TransformerEncoderLayer)}
    assert flags == {"0.layers.0": 0, "0.layers.1": 1, "1.layers.0": 1, "1.layers.1": 0}
    assert [dense[0].use_nested_tensor, dense[1].use_nested_tensor] == [False, True]
    assert disable_dense_fast_paths(dense) == []  # already done by factorize_


def test_single_layer_and_full_transformer(fused_calls) -> None:
    """A bare ``TransformerEncoderLayer`` and an ``nn.Transformer`` (whose encoder has the fast path)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True, activation="gelu")
    x, mask = batch()
    lr.factorize_(layer, lr.collect(layer, [x]), ranks=4)
    reference = dense_reference(layer, nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True,
                                                                  activation="gelu"))
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x, src_key_padding_mask=mask)[~mask],
                                   reference.eval()(x, src_key_padding_mask=mask)[~mask], rtol=1e-4, atol=1e-5)

    def transformer() -> nn.Transformer:
        torch.manual_seed(0)
        return nn.Transformer(D, HEADS, 1, 1, FF, dropout=0.0, batch_first=True)

    model, tgt = transformer(), torch.randn(4, 3, D)
    result = lr.factorize_(model, lr.collect(model, [(x, tgt)], forward=lambda m, b: m(*b)), ranks=4)
    assert "encoder.layers.0.linear1" in result.layers and "decoder.layers.0.linear1" in result.layers
    reference = dense_reference(model, transformer())
    fused_calls.clear()
    with torch.inference_mode():
        expected = reference.eval()(x, tgt, src_key_padding_mask=mask, memory_key_padding_mask=mask)
        assert len(fused_calls) == 1
        torch.testing.assert_close(model.eval()(x, tgt, src_key_padding_mask=mask, memory_key_padding_mask=mask),
                                   expected, rtol=1e-4, atol=1e-5)
    assert len(fused_calls) == 1


def test_attention_out_proj_is_never_swapped() -> None:
    model, result = factorized_encoder(False, ranks=4)
    for i in range(LAYERS):
        out_proj = model.layers[i].self_attn.out_proj
        assert type(out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert "never calls this module" in result.not_replaced[f"layers.{i}.self_attn.out_proj"]
    with pytest.raises(ValueError, match="out_proj.*matches no selected layer"):
        lr.factorize_(encoder(), lr.collect(encoder(), [batch()[0]]), ranks={"layers.0.self_attn.out_proj": 2})


def test_load_factorized_rebuilds_a_working_encoder(tmp_path: Path) -> None:
    model, _ = factorized_encoder(False, ranks=5)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    restored = lr.load_factorized(encoder(seed=3), tmp_path / "model.pt")
    x, mask = batch()
    with torch.inference_mode():
        torch.testing.assert_close(restored.eval()(x, src_key_padding_mask=mask),
                                   model.eval()(x, src_key_padding_mask=mask), rtol=0, atol=0)


# -- RankCompression on a transformer classifier -----------------------------------------------
def compression(**kwargs) -> lr.RankCompression:
    """The one place these tests build RankCompression: 2 dense epochs, the swap, one fine-tuning epoch."""
    return lr.RankCompression(compress_at_epoch=2, **kwargs)


def sequences(n: int, seed: int) -> TensorDataset:
    """Padded sequences whose tokens lie in a 4-dim subspace; the class is the sign of one direction's mean."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    z = torch.randn(n, 6, 4, generator=g)
    lengths = torch.randint(2, 7, (n,), generator=g)
    mask = torch.arange(6) >= lengths[:, None]
    z = z.masked_fill(mask[..., None], 0.0)
    labels = (z[..., 0].sum(1) / lengths > 0).long()
    return TensorDataset(z @ basis, mask, labels)


class SequenceClassifier(L.LightningModule):
    def __init__(self, nested: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=nested)
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x, src_key_padding_mask=mask).masked_fill(mask[..., None], 0.0)
        return self.head(h.sum(1) / (~mask).sum(1, keepdim=True))

    def training_step(self, batch, batch_idx):
        x, mask, y = batch
        return nn.functional.cross_entropy(self(x, mask), y)

    def validation_step(self, batch, batch_idx):
        x, mask, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x, mask), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)

    def train_dataloader(self):
        return DataLoader(sequences(128, 1), batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(sequences(64, 2), batch_size=32)


@pytest.mark.parametrize("nested", [False, True], ids=["padded", "nested"])
def test_rank_compression_fits_a_transformer_classifier(tmp_path: Path, nested: bool) -> None:
    """The validation right after the swap runs in inference mode, where the fast path used to crash."""
    L.seed_everything(0)
    model = SequenceClassifier(nested)
    callback = compression(ranks=4, target_modules=r"encoder\.layers\.\d\.linear\d", forward=lambda m, b: m(*b[:2]))
    trainer = make_trainer(tmp_path, 3, [callback], logger=False)
    trainer.fit(model)
    assert trainer.current_epoch == 3 and callback.compressed
    assert set(callback.result.layers) == {f"encoder.layers.{i}.linear{j}" for i in range(LAYERS) for j in (1, 2)}

    (validated,) = trainer.validate(model, verbose=False)
    reference = dense_reference(model, SequenceClassifier(nested))
    x, mask, y = sequences(64, 2).tensors
    with torch.inference_mode():
        loss = nn.functional.cross_entropy(reference.eval()(x, mask), y)
    assert validated["val_loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert callback.metrics["finetuned"] == pytest.approx(validated["val_loss"], rel=1e-5)
