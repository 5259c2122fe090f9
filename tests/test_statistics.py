"""Streamed statistics against one-shot float64 references computed from the stored activations (tests/helpers.py)."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_rank as lr
from lightning_rank.stats.collector import StatisticsCollector
from lightning_rank.stats.precision import symmetric_gram_update_
from tests.helpers import CONV_GEOMETRIES, assert_stats, moments_reference, patches_reference
from tests.tiny_models import Conv1D


class Recorder(nn.Module):
    """Wraps a layer and keeps every input it saw, for the references."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.layer(x)


@pytest.mark.parametrize("splits", [[24], [5, 7, 12], [1] * 6])
def test_linear_streaming_equals_one_shot(splits: list[int]) -> None:
    torch.manual_seed(0)
    data = torch.randn(sum(splits), 3, 16)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    stats = lr.collect(model, list(data.split(splits)))
    assert_stats(stats["0"], data)
    hidden = torch.relu(model[0](data)).detach()
    assert_stats(stats["2"], hidden)


@pytest.mark.parametrize("kwargs", CONV_GEOMETRIES)
def test_conv2d_rows_are_receptive_field_patches(kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, **kwargs)
    batches = [torch.randn(2, 3, 9, 8), torch.randn(1, 3, 9, 8)]
    stats = lr.collect(conv, batches)
    rows = torch.cat([patches_reference(b, conv) for b in batches])
    assert rows.shape[1] == conv.weight[0].numel()
    assert_stats(stats[""], rows)
    # the rows really are what the layer multiplies: W rows^T + b reproduces the convolution
    out = conv(batches[1]).permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(patches_reference(batches[1], conv) @ conv.weight.reshape(5, -1).t() + conv.bias, out)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "one_channel_one_image"])
def test_conv_rows_whatever_the_input_layout(layout: str) -> None:
    """The patches are read through strides of a channels-last copy: inputs already channels-last, views
    with an offset, and size-1 dims (whose strides torch leaves free) must give the same rows."""
    torch.manual_seed(0)
    channels = 1 if layout == "one_channel_one_image" else 3
    conv = nn.Conv2d(channels, 4, 3, padding=1, stride=(2, 1))
    x = torch.randn(1 if layout == "one_channel_one_image" else 2, channels, 9, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(2, 5, 11, 8)[:, 1:4, 2:]
    stats = lr.collect(conv, [x], max_rows_per_batch=None)
    assert_stats(stats[""], patches_reference(x.contiguous(), conv))


def test_conv1d_rows() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, kernel_size=3, stride=2, padding=2, dilation=2)
    x = torch.randn(3, 4, 11)
    stats = lr.collect(conv, [x])
    as_2d = nn.Conv2d(4, 6, (1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2))
    rows = patches_reference(x.unsqueeze(2), as_2d)
    assert_stats(stats[""], rows)


def test_mask_selects_rows_and_broadcasts_over_conv_positions() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.proj(tokens)
            return self.head(h.mean(1))

    net = Net()
    batches = []
    for length in (5, 7):
        mask = torch.rand(3, length) > 0.4
        batches.append({"tokens": torch.randn(3, length, 8), "attention_mask": mask})
    with pytest.warns(UserWarning, match="head"):
        stats = lr.collect(net, batches, mask_fn=lambda b: b["attention_mask"])
    kept = torch.cat([b["tokens"][b["attention_mask"]] for b in batches])
    assert_stats(stats["proj"], kept)
    assert stats.unmasked == ["head"]  # (B, d) input: the (B, T) mask does not apply, and we say so
    pooled = torch.cat([net.proj(b["tokens"]).mean(1) for b in batches]).detach()
    assert_stats(stats["head"], pooled)


def test_per_sample_mask_on_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(4, 2, 6, 6)
    keep = torch.tensor([True, False, True, False])
    stats = lr.collect(conv, [(x, keep)], mask_fn=lambda b: b[1])
    assert_stats(stats[""], patches_reference(x[keep], conv))


def test_subsampling_takes_distinct_rows_uniformly_and_counts_them() -> None:
    n, keep, batches = 20, 5, 400
    layer = nn.Linear(n, 2)
    eye = torch.eye(n)  # row i is e_i: the Gram's diagonal shows which rows were taken
    stats = lr.collect(layer, [eye] * batches, max_rows_per_batch=keep, seed=3)
    gram = stats[""].gram
    assert int(stats[""].count) == keep * batches
    assert torch.equal(gram, torch.diag(torch.diagonal(gram)))  # a row is never mixed with another
    torch.testing.assert_close(stats[""].total, torch.diagonal(gram))
    frequency = torch.diagonal(gram) / batches
    assert frequency.sum().item() == pytest.approx(keep)
    assert (frequency - keep / n).abs().max() < 0.1  # uniform: each row about 1/4 of the batches
    again = lr.collect(layer, [eye] * batches, max_rows_per_batch=keep, seed=3)
    assert torch.equal(again[""].gram, gram)  # seeded
    other = lr.collect(layer, [eye] * batches, max_rows_per_batch=keep, seed=4)
    assert not torch.equal(other[""].gram, gram)


def test_small_batches_are_not_subsampled() -> None:
    x = torch.randn(6, 4)
    stats = lr.collect(nn.Linear(4, 2), [x], max_rows_per_batch=10)
    assert_stats(stats[""], x)


class QKV(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.ids: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.q(x) + self.k(x) + self.v(x)
        first = x * 2
        first_id = id(first)
        ya = self.a(first)
        del first  # freed here: the next temporary may get the same id()
        second = x * 3
        self.ids.append((first_id, id(second)))
        return y + ya + self.b(second)


def test_shared_inputs_share_one_accumulator_and_reused_ids_do_not_fool_it() -> None:
    torch.manual_seed(0)
    model = QKV()
    data = [torch.randn(5, 8) for _ in range(3)]
    stats = lr.collect(model, data)
    assert stats.sources["k"] == stats.sources["v"] == stats.sources["q"] == "q"
    assert stats["k"] is stats["q"]
    x = torch.cat(data)
    assert_stats(stats["q"], x)
    assert stats.sources["a"] == "a" and stats.sources["b"] == "b"
    assert_stats(stats["a"], 2 * x)
    assert_stats(stats["b"], 3 * x)
    assert any(a == b for a, b in model.ids), "the test needs Python to reuse the freed tensor's id"


@pytest.mark.parametrize("shortcut", [dict(kernel_size=1), dict(kernel_size=3, padding=2, dilation=2)],
                         ids=["1x1", "dilated"])
def test_convs_reading_one_tensor_share_only_when_their_patches_are_the_same(shortcut: dict) -> None:
    """A ResNet block's 3x3 conv and its shortcut read the same feature map but make different rows: each
    keeps its own statistics; two identical convs on it (like q, k, v) share one accumulator."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.twin = nn.Conv2d(3, 5, 3, padding=1)
            self.shortcut = nn.Conv2d(3, 4, **shortcut)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.shortcut(x) + self.twin(x)[:, :4]

    torch.manual_seed(0)
    block = Block()
    batches = [torch.randn(2, 3, 6, 6) for _ in range(2)]
    stats = lr.collect(block, batches, max_rows_per_batch=None)
    assert stats.sources == {"conv": "conv", "twin": "conv", "shortcut": "shortcut"}
    for name in ("conv", "shortcut"):
        assert_stats(stats[name], torch.cat([patches_reference(x, getattr(block, name)) for x in batches]))
    report = lr.analyze(block, stats)
    assert not report.skipped and report.layers["shortcut"].in_features == block.shortcut.weight[0].numel()


def test_statistics_read_under_inference_mode_stay_updatable_outside_it() -> None:
    layer = nn.Linear(4, 3)
    collector = StatisticsCollector(layer, max_rows_per_batch=None)
    a, b = torch.randn(5, 4), torch.randn(6, 4)
    with collector.attached():
        with torch.inference_mode():
            with collector.observe(a):
                layer(a)
            collector.compute()[""].gram  # a mid-collection read, as a report during validation would make
        with collector.observe(b):
            layer(b)
    assert_stats(collector.compute()[""], torch.cat([a, b]))


def test_layer_whose_sharing_changes_between_batches_is_skipped() -> None:
    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p, self.r = nn.Linear(4, 4), nn.Linear(4, 4)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.p(x) + self.r(x if self.calls == 1 else x + 1)

    model = Flaky()
    data = [torch.randn(3, 4), torch.randn(3, 4)]
    stats = lr.collect(model, data)
    assert "r" in stats.skipped and "differed" in stats.skipped["r"]
    assert_stats(stats["p"], torch.cat(data))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_are_upcast(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 4).to(dtype)
    data = [torch.randn(64, 16).to(dtype) for _ in range(2)]
    stats = lr.collect(layer, data)
    assert stats[""].gram.dtype == torch.float32
    assert_stats(stats[""], torch.cat(data).float(), rtol=1e-5)


def test_float64_statistics() -> None:
    x = torch.randn(10, 5, dtype=torch.float64) * 1e3
    stats = lr.collect(nn.Linear(5, 2).double(), [x], dtype=torch.float64)
    assert stats[""].gram.dtype == torch.float64
    assert_stats(stats[""], x, rtol=1e-12)


def test_hf_conv1d_and_multihead_attention() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(24, 8, scale=1.0, zero_bias=True)  # Hugging Face's GPT-2 layer: weight (in, out)
            self.self_attn = nn.MultiheadAttention(8, 2)  # (T, B, E) inputs
            self.cross = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.c_attn(x)[..., :8]
            t = h.transpose(0, 1)
            s = self.self_attn(t, t, t, need_weights=False)[0].transpose(0, 1)
            return self.cross(s, x, x)[0]

    net = Net()
    x = torch.randn(2, 5, 8)
    stats = lr.collect(net, [x])
    assert_stats(stats["c_attn"], x)
    h = net.c_attn(x)[..., :8].detach()
    assert_stats(stats["self_attn.in_proj"], h)  # (T, B, E) rows, read batch-first
    assert "cross-attention" in stats.skipped["cross.in_proj"]
    assert "out_proj" in stats.skipped["self_attn.out_proj"]
    assert "self_attn.in_proj" in stats.sources


def test_nonfinite_rows_are_dropped_counted_and_reported() -> None:
    x = torch.randn(8, 4)
    bad = x.clone()
    bad[1, 2] = float("nan")
    bad[5, 0] = float("inf")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        stats = lr.collect(nn.Linear(4, 2), [bad])
    assert int(stats[""].nonfinite) == 2
    good = x[[0, 2, 3, 4, 6, 7]]
    assert_stats(stats[""], good)


def test_masked_nonfinite_rows_on_accelerators_give_the_sums_of_dropped_ones() -> None:
    """The accelerator path zeroes bad rows instead of dropping them (no host sync); same sums, same counts."""
    from lightning_rank.stats.sums import InputStatistics

    x = torch.randn(9, 5)
    x[2, 1], x[7, 4] = float("nan"), float("-inf")
    dropped, masked = InputStatistics.zeros(5, torch.float32, "cpu"), InputStatistics.zeros(5, torch.float32, "cpu")
    dropped.update(x)
    rows, kept = masked._finite_rows(x.clone(), masked=True)
    assert isinstance(kept, torch.Tensor) and int(kept) == 7
    assert bool(torch.isfinite(rows).all()) and int((rows.abs().sum(dim=1) == 0).sum()) == 2
    torch.testing.assert_close(rows.t() @ rows, dropped.gram)
    assert int(masked.nonfinite) == int(dropped.nonfinite) == 2 and int(dropped.count) == 7


@pytest.mark.parametrize("layer", [nn.Linear(4, 3), nn.Conv2d(4, 3, 3, padding=1)], ids=["linear", "conv"])
def test_inference_mode_state_can_be_updated_later_outside_it(layer: nn.Module) -> None:
    collector = StatisticsCollector(layer, max_rows_per_batch=None)
    shape = (5, 4) if isinstance(layer, nn.Linear) else (2, 4, 5, 5)
    a, b = torch.randn(shape), torch.randn(shape)
    with collector.attached():
        with torch.inference_mode(), collector.observe(a):
            layer(a)
        with collector.observe(b):  # a conv's sums are kept in patch order, made under inference mode
            layer(b)
    stats = collector.compute()
    assert not stats[""].gram.is_inference()
    rows = [x if isinstance(layer, nn.Linear) else patches_reference(x, layer) for x in (a, b)]
    assert_stats(stats[""], torch.cat(rows))


def test_conv_sums_read_between_batches_stay_right() -> None:
    """A conv's sums are stored in patch order and put in the weight's order when read: reading them
    between batches (as a mid-epoch report would) must change nothing that follows."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 2), padding=1, dilation=(2, 1))
    batches = [torch.randn(2, 3, 7, 6) for _ in range(3)]
    collector = StatisticsCollector(conv, max_rows_per_batch=None)
    with collector.attached(), torch.no_grad():
        for i, x in enumerate(batches):
            with collector.observe(x):
                conv(x)
            seen = torch.cat([patches_reference(b, conv) for b in batches[: i + 1]])
            assert_stats(collector.compute()[""], seen)


def test_forwards_outside_observe_are_ignored() -> None:
    layer = nn.Linear(4, 3)
    collector = StatisticsCollector(layer)
    a = torch.randn(5, 4)
    with collector.attached():
        layer(torch.randn(7, 4))  # a training step, say
        with collector.observe(a):
            layer(a)
    assert_stats(collector.compute()[""], a)


def test_hooks_removed_and_modes_restored_when_forward_raises() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # a submodule deliberately frozen in eval mode keeps it

    def failing(module: nn.Module, batch: torch.Tensor) -> None:
        assert not module.training  # collection runs in eval mode
        module(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        lr.collect(model, [torch.randn(2, 4)], forward=failing)
    assert model.training and model[0].training and not model[1].training and model[2].training
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_collect_leaves_gradients_alone_and_needs_no_grad_mode() -> None:
    layer = nn.Linear(4, 2)
    with torch.enable_grad():
        stats = lr.collect(layer, [torch.randn(3, 4, requires_grad=True)])
    assert not stats[""].gram.requires_grad
    assert layer.weight.grad is None


def test_statistics_stay_on_the_activations_device_and_move_on_request() -> None:
    stats = lr.collect(nn.Linear(4, 2), [torch.randn(3, 4)])
    assert stats.device == torch.device("cpu")
    moved = stats.to("meta")
    assert moved[""].gram.device.type == "meta" and stats[""].gram.device.type == "cpu"
    # the kept calibration batches move along, so that a model moved there runs on them
    assert moved.calibration[0].device.type == "meta" and stats.calibration[0].device.type == "cpu"
    assert moved.forward is stats.forward


def test_collect_keeps_detached_copies_of_its_first_few_batches_for_calibration() -> None:
    layer = nn.Linear(4, 2)
    batches = [torch.randn(3, 4) for _ in range(6)]
    stats = lr.collect(layer, (b for b in batches))  # a generator: no length
    assert len(stats.calibration) == 4 and stats.forward is None
    for kept, batch in zip(stats.calibration, batches):
        assert torch.equal(kept, batch) and kept.data_ptr() != batch.data_ptr()
    batches[0].zero_()
    assert stats.calibration[0].abs().sum() > 0  # a copy: changing the original does not change it
    assert "calibration" not in repr(stats)
    assert len(lr.collect(layer, batches[:2]).calibration) == 2  # fewer batches than that: all of them
    assert lr.collect(layer, batches, calibration_batches=0).calibration == []
    with pytest.raises(ValueError, match="`calibration_batches` must be an int >= 0"):
        lr.collect(layer, batches, calibration_batches=-1)

    # nested batches keep their structure; tensors made or read under inference mode come back as normal tensors
    def forward(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["inputs"][0])

    with torch.inference_mode():
        nested = [{"inputs": (torch.randn(3, 4), "label"), "n": 3}]
        stats = lr.collect(layer, nested, forward=forward, calibration_batches=1)
    (kept,) = stats.calibration
    assert kept["n"] == 3 and kept["inputs"][1] == "label" and stats.forward is forward
    assert not kept["inputs"][0].is_inference() and torch.equal(kept["inputs"][0], nested[0]["inputs"][0])
    x = torch.randn(3, 4, requires_grad=True)
    with torch.enable_grad():
        (kept,) = lr.collect(layer, [x], calibration_batches=1).calibration
    assert not kept.requires_grad


def test_all_reduce_sums_every_tensor_in_place() -> None:
    stats = lr.collect(nn.Linear(4, 2), [torch.randn(3, 4)])
    before = [t.clone() for t in stats[""].tensors()]
    stats.all_reduce_(lambda t: t.mul_(2))  # stands in for a 2-process all_reduce of equal data
    for old, new in zip(before, stats[""].tensors()):
        torch.testing.assert_close(new, old * 2)


def test_unreached_layer_is_skipped_with_reason() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    stats = lr.collect(Net(), [torch.randn(2, 3)])
    assert stats.layers == ["used"]
    assert "never called" in stats.skipped["unused"]


def test_target_and_exclude_selection() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), nn.LayerNorm(3), nn.Linear(3, 2))
    data = [torch.randn(2, 3)]
    assert lr.collect(model, data, target_modules=["0"]).layers == ["0.0", "0.1"]
    assert lr.collect(model, data, target_modules=r"0\.\d").layers == ["0.0", "0.1"]
    assert lr.collect(model, data, exclude_modules=["0.1", "2"]).layers == ["0.0"]
    picked = lr.collect(model, data, target_modules=lambda m, name: name.endswith("1"))
    assert picked.layers == ["0.1"] and "not a supported layer type" in picked.skipped["1"]


def test_bad_input_messages() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no batch"):
        lr.collect(model, [])
    with pytest.raises(ValueError, match=r"no layer to analyze"):
        lr.collect(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), [torch.randn(2, 3)])
    with pytest.raises(ValueError, match=r"'fc1'.*matches no module"):
        lr.collect(model, [torch.randn(2, 3)], target_modules=["fc1"])
    named = nn.Sequential()
    named.add_module("encoder_fc", nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"Close names: \['encoder_fc'\]"):
        lr.collect(named, [torch.randn(2, 3)], target_modules=["encoder_fx"])
    with pytest.raises(ValueError, match="target_modules.*matches no module"):
        lr.collect(model, [torch.randn(2, 3)], target_modules=r"blocks\..*")
    with pytest.raises(ValueError, match="max_rows_per_batch"):
        lr.collect(model, [torch.randn(2, 3)], max_rows_per_batch=0)
    with pytest.raises(ValueError, match="dtype"):
        lr.collect(model, [torch.randn(2, 3)], dtype=torch.float16)
    with pytest.raises(TypeError, match="mask_fn"):
        lr.collect(model, [torch.randn(2, 3)], mask_fn=lambda b: torch.ones(2))


def test_no_activation_is_kept_alive() -> None:
    """After a forward, the only large tensors left are the statistics themselves."""
    layer = nn.Linear(64, 8)
    collector = StatisticsCollector(layer)
    refs = []
    with collector.attached():
        for _ in range(3):
            x = torch.randn(256, 64)
            refs.append(__import__("weakref").ref(x))
            with collector.observe(x):
                layer(x)
            del x
    gc.collect()
    assert all(r() is None for r in refs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collector.compute()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 70), st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_symmetric_block_update_equals_full_gram(rows: int, dim: int, block: int, seed: int) -> None:
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    stats = lr.InputStatistics.zeros(dim, torch.float64, torch.device("cpu"))
    for part in x.split(7):
        symmetric_gram_update_(stats._gram, part, block=block)
        stats._mirrored = False
    torch.testing.assert_close(stats.gram, x.t() @ x)


@pytest.mark.parametrize("dim", [300, 600])
def test_wide_inputs_use_blocked_updates_and_read_back_full(dim: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(dim, 4)
    data = [torch.randn(50, dim) for _ in range(3)]
    collector = StatisticsCollector(layer)
    with collector.attached():
        with collector.observe(data[0]):
            layer(data[0])
        assert_stats(collector.compute()[""], data[0])  # reading mirrors the Gram matrix ...
        for x in data[1:]:
            with collector.observe(x):
                layer(x)  # ... and later updates still land right
    stats = collector.compute()
    assert_stats(stats[""], torch.cat(data))
    stats.all_reduce_(lambda t: t.mul_(2))
    gram, total, count = moments_reference(torch.cat(data))
    torch.testing.assert_close(stats[""].gram.double(), 2 * gram, rtol=1e-5, atol=1e-3)


@pytest.mark.filterwarnings("ignore:.*nested tensors:UserWarning")
def test_nested_tensor_rows_are_exactly_the_real_tokens() -> None:
    """nn.TransformerEncoder turns padded inputs into nested tensors; their rows equal the masked padded ones."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    nested = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    padded = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    padded.load_state_dict(nested.state_dict())
    x = torch.randn(4, 7, 16)
    padding = torch.zeros(4, 7, dtype=torch.bool)
    padding[1, 4:], padding[2, 2:] = True, True
    batches = [{"src": x, "src_key_padding_mask": padding}]
    seen = []
    hook = nested.layers[0].linear1.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_nested))
    got = lr.collect(nested, batches)
    hook.remove()
    assert seen == [True]  # the layers really saw nested tensors
    want = lr.collect(padded, batches, mask_fn=lambda batch: ~batch["src_key_padding_mask"])
    assert got.layers == want.layers
    for name in got.layers:
        assert int(got[name].count) == int((~padding).sum()) == int(want[name].count)
        torch.testing.assert_close(got[name].gram, want[name].gram, rtol=1e-5, atol=1e-4)
    masked = lr.collect(nested, batches, mask_fn=lambda batch: ~batch["src_key_padding_mask"])
    assert not masked.unmasked  # a mask is not needed for nested rows, and no warning says it did not fit
    torch.testing.assert_close(masked["layers.0.linear1"].gram, got["layers.0.linear1"].gram)
