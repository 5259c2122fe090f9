"""``LowRankLinear`` / ``LowRankConv1d`` / ``LowRankConv2d`` against the dense layers they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_rank as lr
from lightning_rank.compress.layers import LowRankConv1d
from tests.tiny_models import Conv1D


def full_rank_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W = A B`` exactly, by an SVD of the ``(out, fan_in)`` matrix, in float64."""
    matrix = weight.detach().double().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u * s, vh


def test_linear_full_rank_matches_dense_and_round_trips() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(12, 7)
    low = lr.LowRankLinear.from_dense(dense, *full_rank_factors(dense.weight))
    x = torch.randn(5, 3, 12)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-5, atol=1e-5)
    back = low.to_dense()
    assert type(back) is nn.Linear
    torch.testing.assert_close(back.weight, dense.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back.bias, dense.bias)
    assert low.rank == 7 and "rank=7" in repr(low)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=2, padding=1),
        dict(stride=(1, 2), padding=2, dilation=2, padding_mode="reflect"),
        dict(padding="same", dilation=(2, 1), bias=False),
    ],
)
def test_conv2d_full_rank_matches_dense(kwargs: dict) -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 5, 3, **kwargs)
    low = lr.LowRankConv2d.from_dense(dense, *full_rank_factors(dense.weight))
    assert low.rank == 5
    assert low.first.kernel_size == (3, 3) and low.second.kernel_size == (1, 1)
    assert low.first.padding_mode == dense.padding_mode and low.first.stride == dense.stride
    assert (low.second.bias is None) == (dense.bias is None) and low.first.bias is None
    x = torch.randn(2, 3, 11, 9)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-5, atol=1e-5)
    back = low.to_dense()
    for attr in ("stride", "padding", "dilation", "padding_mode", "kernel_size"):
        assert getattr(back, attr) == getattr(dense, attr), attr
    torch.testing.assert_close(back(x), dense(x), rtol=1e-5, atol=1e-5)


def test_conv1d_full_rank_matches_dense() -> None:
    torch.manual_seed(0)
    dense = nn.Conv1d(4, 6, 3, stride=2, padding=1, padding_mode="circular")
    low = LowRankConv1d.from_dense(dense, *full_rank_factors(dense.weight))
    x = torch.randn(2, 4, 17)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.to_dense()(x), dense(x), rtol=1e-5, atol=1e-5)


def test_hf_conv1d_full_rank_and_to_dense_gives_conv1d_back() -> None:
    torch.manual_seed(0)
    dense = Conv1D(nf=6, nx=10)
    low = lr.LowRankLinear.from_dense(dense, *full_rank_factors(dense.weight.t()))
    assert (low.in_features, low.out_features, low.rank) == (10, 6, 6)
    assert "dense_type=Conv1D" in repr(low)
    x = torch.randn(4, 10)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-5, atol=1e-5)
    back = low.to_dense()
    assert type(back) is Conv1D and back.weight.shape == (10, 6)
    torch.testing.assert_close(back.weight, dense.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back(x), dense(x), rtol=1e-5, atol=1e-5)


def test_hf_conv1d_subclassed_by_fsdp2_is_still_a_conv1d_and_rebuilds_the_plain_class() -> None:
    """``fully_shard`` turns a module's class into a subclass named ``FSDP<name>``: an ``FSDPConv1D`` is still
    observed as ``Conv1D`` (weight ``(in, out)``), and its low-rank pair rebuilds a plain ``Conv1D``."""
    torch.manual_seed(0)
    sharded_class = type("FSDPConv1D", (Conv1D,), {})
    dense = sharded_class(nf=6, nx=10)
    assert lr.collect(nn.Sequential(dense), [torch.randn(4, 10)]).layers == ["0"]
    low = lr.LowRankLinear.from_dense(dense, *full_rank_factors(dense.weight.t()))
    assert low.dense_type is Conv1D and type(low.to_dense()) is Conv1D


def test_hf_conv1d_that_cannot_be_rebuilt_falls_back_to_linear() -> None:
    class Conv1D(nn.Module):  # noqa: N801 - same name, another constructor
        def __init__(self, *, config: object) -> None:
            super().__init__()
            self.nf = 3
            self.weight = nn.Parameter(torch.randn(5, 3))
            self.bias = nn.Parameter(torch.randn(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    dense = Conv1D(config=None)
    back = lr.LowRankLinear.from_dense(dense, *full_rank_factors(dense.weight.t())).to_dense()
    assert type(back) is nn.Linear
    x = torch.randn(2, 5)
    torch.testing.assert_close(back(x), dense(x), rtol=1e-5, atol=1e-5)


def test_low_rank_product_matches_reference_and_keeps_dtype_device_grad() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(9, 8, dtype=torch.float64)
    dense.weight.requires_grad_(False)
    a, b = torch.randn(8, 3), torch.randn(3, 9)
    low = lr.LowRankLinear.from_dense(dense, a, b)
    assert low.first.weight.dtype == torch.float64 and low.second.bias.dtype == torch.float64
    assert low.first.weight.device == dense.weight.device
    assert not low.first.weight.requires_grad and not low.second.weight.requires_grad
    assert low.second.bias.requires_grad
    x = torch.randn(6, 9, dtype=torch.float64)
    torch.testing.assert_close(low(x), x @ (a.double() @ b.double()).t() + dense.bias)
    assert not low.to_dense().weight.requires_grad


def test_conv_low_rank_product_matches_reference_in_bfloat16_and_eval_mode() -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(2, 6, 3, padding=1).to(torch.bfloat16).eval()
    a, b = torch.randn(6, 2), torch.randn(2, 18)
    low = lr.LowRankConv2d.from_dense(dense, a, b)
    assert low.first.weight.dtype == torch.bfloat16 and not low.training
    x = torch.randn(1, 2, 5, 5)
    want = F.conv2d(x, (a @ b).reshape(6, 2, 3, 3), dense.bias.float(), padding=1)
    torch.testing.assert_close(low.float()(x), want, rtol=0.05, atol=0.1)
    assert "rank=2" in repr(low) and "padding=(1, 1)" in repr(low)


def test_building_from_factors_leaves_the_global_generator_alone() -> None:
    dense, conv = nn.Linear(6, 5), nn.Conv2d(2, 4, 3)
    state = torch.get_rng_state()
    lr.LowRankLinear.from_dense(dense, torch.ones(5, 2), torch.ones(2, 6)).to_dense()
    lr.LowRankConv2d.from_dense(conv, torch.ones(4, 2), torch.ones(2, 18)).to_dense()
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_factors_and_ranks_raise_clear_errors() -> None:
    dense = nn.Linear(5, 4)
    with pytest.raises(ValueError, match="do not fit"):
        lr.LowRankLinear.from_dense(dense, torch.randn(5, 2), torch.randn(2, 5))
    with pytest.raises(ValueError, match="factors must be"):
        lr.LowRankLinear.from_dense(dense, torch.randn(4, 2), torch.randn(3, 5))
    with pytest.raises(ValueError, match="`rank`"):
        lr.LowRankLinear(5, 4, 0)
    with pytest.raises(ValueError, match="`rank`"):
        lr.LowRankConv2d(2, 8, 1, 3)  # fan_in 2
    with pytest.raises(TypeError, match="groups=1"):
        lr.LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), torch.randn(4, 1), torch.randn(1, 18))


@settings(max_examples=20, deadline=None)
@given(
    out=st.integers(1, 8),
    fan_in=st.integers(1, 8),
    data=st.data(),
    bias=st.booleans(),
)
def test_linear_factors_property(out: int, fan_in: int, data: st.DataObject, bias: bool) -> None:
    rank = data.draw(st.integers(1, min(out, fan_in)))
    g = torch.Generator().manual_seed(out * 100 + fan_in * 10 + rank)
    dense = nn.Linear(fan_in, out, bias=bias, dtype=torch.float64)
    a = torch.randn(out, rank, generator=g, dtype=torch.float64)
    b = torch.randn(rank, fan_in, generator=g, dtype=torch.float64)
    low = lr.LowRankLinear.from_dense(dense, a, b)
    x = torch.randn(3, fan_in, generator=g, dtype=torch.float64)
    torch.testing.assert_close(low(x), F.linear(x, a @ b, dense.bias))
    torch.testing.assert_close(low.to_dense()(x), low(x))
    assert sum(p.numel() for p in low.parameters()) == rank * (out + fan_in) + (out if bias else 0)
