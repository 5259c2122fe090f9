"""Low-rank replacements for dense layers: two stacked layers ``second(first(x))`` with ``W ~ A B``.

``first`` holds ``B`` (``rank x fan_in``, no bias) and ``second`` holds ``A`` (``out x rank``) and the
bias, so a state dict reads ``fc1.first.weight``, ``fc1.second.weight``, ``fc1.second.bias``.
Every class can give its dense layer back with :meth:`to_dense`. Building from factors skips the random
initialization (``skip_init``), so swapping layers never draws from the global random generator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from lightning_rank.targets import factorized_kind, hf_conv1d_class, is_hf_conv1d, layer_kind


def _check_factors(layer: nn.Module, a: Tensor, b: Tensor, out_features: int, fan_in: int) -> int:
    """The rank of ``a @ b`` as factors of ``layer``'s ``(out, fan_in)`` weight, or a ``ValueError``."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"factors must be a: (out, rank) and b: (rank, fan_in) matrices, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] != out_features or b.shape[1] != fan_in:
        raise ValueError(
            f"factors {tuple(a.shape)} @ {tuple(b.shape)} do not fit {type(layer).__name__} with "
            f"out={out_features}, fan_in={fan_in}"
        )
    if a.shape[1] < 1:
        raise ValueError("factors must have rank >= 1")
    return a.shape[1]


def _copy_into(param: Tensor, value: Tensor, like: Tensor | None) -> None:
    """Copy ``value`` into ``param`` and take ``requires_grad`` from the dense layer's ``like``."""
    with torch.no_grad():
        param.copy_(value.reshape(param.shape))
    param.requires_grad_(like.requires_grad if like is not None else True)


def _fill(new: nn.Module, a: Tensor, b: Tensor, layer: nn.Module) -> nn.Module:
    """Put the factors (``b`` first, ``a`` second) and the dense ``layer``'s bias into ``new``, in its training mode."""
    _copy_into(new.first.weight, b, layer.weight)
    _copy_into(new.second.weight, a, layer.weight)
    if layer.bias is not None:
        _copy_into(new.second.bias, layer.bias, layer.bias)
    return new.train(layer.training)


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` computed in at least float32 (bf16/fp16 factors), cast back to their dtype."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


class LowRankLinear(nn.Module):
    """``y = A (B x) + b``: a Linear (or Hugging Face ``Conv1D``) of weight ``W ~ A B`` as two Linears.

    ``dense_type`` is the class :meth:`to_dense` rebuilds (``nn.Linear``, or the ``Conv1D`` class the
    layer came from, whose weight is stored transposed).

    >>> import torch, lightning_rank as lr
    >>> _ = torch.manual_seed(0)
    >>> dense = torch.nn.Linear(16, 8)
    >>> u, s, vh = torch.linalg.svd(dense.weight.detach())
    >>> low = lr.LowRankLinear.from_dense(dense, u[:, :4] * s[:4], vh[:4])  # W ~ A B of rank 4: A (8, 4), B (4, 16)
    >>> low.rank, low.first.weight.shape, low.second.weight.shape
    (4, torch.Size([4, 16]), torch.Size([8, 4]))
    >>> sum(p.numel() for p in low.parameters()), sum(p.numel() for p in dense.parameters())
    (104, 136)
    >>> x = torch.randn(2, 16)
    >>> torch.allclose(low.to_dense()(x), low(x), atol=1e-6)  # the dense layer of weight A B
    True
    """


    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        dense_type: type[nn.Module] = nn.Linear,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"`rank` must be in [1, min(in, out)] = [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.dense_type = dense_type
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.first.out_features

    @property
    def factorized_kind(self) -> str:
        """The kind of the layer it replaced (see :func:`~lightning_rank.targets.factorized_kind`)."""
        return "linear" if self.dense_type is nn.Linear else "hf_conv1d"

    @classmethod
    def from_dense(cls, layer: nn.Module, a: Tensor, b: Tensor) -> LowRankLinear:
        """Factors ``a`` ``(out, rank)`` and ``b`` ``(rank, in)`` of ``layer``'s weight, with its bias, dtype and device.

        ``layer`` is an ``nn.Linear`` or a Hugging Face style ``Conv1D`` (weight ``(in, out)``).
        """
        if is_hf_conv1d(layer):
            in_features, out_features = layer.weight.shape
        elif isinstance(layer, nn.Linear):
            in_features, out_features = layer.in_features, layer.out_features
        else:
            raise TypeError(f"LowRankLinear.from_dense takes nn.Linear or Conv1D, got {type(layer).__name__}")
        rank = _check_factors(layer, a, b, out_features, in_features)
        weight, bias = layer.weight, layer.bias
        new = skip_init(
            cls,
            in_features,
            out_features,
            rank,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
            dense_type=hf_conv1d_class(layer) if is_hf_conv1d(layer) else nn.Linear,
        )
        return _fill(new, a, b, layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> Tensor:
        """``A B`` as ``(out, in)``."""
        return _matmul(self.second.weight, self.first.weight)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """The equivalent dense layer: a ``dense_type`` ``Conv1D`` when it can be rebuilt, else ``nn.Linear``."""
        weight, bias = self.dense_weight(), self.second.bias
        kwargs: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        dense: nn.Module | None = None
        if self.dense_type is not nn.Linear:
            try:  # Hugging Face's signature is Conv1D(nf, nx)
                candidate = self.dense_type(self.out_features, self.in_features).to(**kwargs)
                if is_hf_conv1d(candidate) and candidate.weight.shape == (self.in_features, self.out_features):
                    dense = candidate
            except Exception:  # noqa: BLE001 - any failure falls back to the equivalent nn.Linear
                dense = None
        if dense is not None:
            _copy_into(dense.weight, weight.t(), self.first.weight)
            if bias is not None:
                _copy_into(dense.bias, bias, bias)
            else:
                dense.bias.zero_()
        else:
            dense = skip_init(nn.Linear, self.in_features, self.out_features, bias=bias is not None, **kwargs)
            _copy_into(dense.weight, weight, self.first.weight)
            if bias is not None:
                _copy_into(dense.bias, bias, bias)
        return dense.train(self.training)

    def extra_repr(self) -> str:
        dense = "" if self.dense_type is nn.Linear else f", dense_type={self.dense_type.__name__}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.second.bias is not None}{dense}"
        )


class _LowRankConv(nn.Module):
    """``Conv(C_in -> r, k, stride, padding, dilation)`` then ``Conv(r -> C_out, 1, bias)``."""

    _conv: type[nn.Conv1d] | type[nn.Conv2d]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        rank: int,
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.first = self._conv(
            in_channels, rank, kernel_size, stride=stride, padding=padding, dilation=dilation,
            bias=False, padding_mode=padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        fan_in = self.first.weight[0].numel()
        if not 1 <= rank <= min(fan_in, out_channels):
            raise ValueError(f"`rank` must be in [1, min(fan_in, out)] = [1, {min(fan_in, out_channels)}], got {rank}")
        self.second = self._conv(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.first.out_channels

    @property
    def in_channels(self) -> int:
        return self.first.in_channels

    @property
    def out_channels(self) -> int:
        return self.second.out_channels

    @classmethod
    def from_dense(cls, layer: nn.Module, a: Tensor, b: Tensor) -> _LowRankConv:
        """Factors ``a`` ``(out, rank)`` and ``b`` ``(rank, C_in * prod(kernel))`` of ``layer``'s weight, with its bias."""
        if not isinstance(layer, cls._conv) or layer.groups != 1:
            raise TypeError(f"{cls.__name__}.from_dense takes an {cls._conv.__name__} with groups=1, got {layer!r}")
        weight, bias = layer.weight, layer.bias
        rank = _check_factors(layer, a, b, layer.out_channels, weight[0].numel())
        new = skip_init(
            cls, layer.in_channels, layer.out_channels, layer.kernel_size, rank, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, bias=bias is not None,
            padding_mode=layer.padding_mode, device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        return _fill(new, a, b, layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> Tensor:
        """``A B`` as ``(out, C_in * prod(kernel))``."""
        return _matmul(self.second.weight.flatten(1), self.first.weight.flatten(1))

    @torch.no_grad()
    def to_dense(self) -> nn.Conv1d | nn.Conv2d:
        """The equivalent dense convolution."""
        first, bias = self.first, self.second.bias
        weight = self.dense_weight()
        dense = skip_init(
            self._conv, first.in_channels, self.out_channels, first.kernel_size, stride=first.stride,
            padding=first.padding, dilation=first.dilation, bias=bias is not None, padding_mode=first.padding_mode,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        _copy_into(dense.weight, weight, first.weight)
        if bias is not None:
            _copy_into(dense.bias, bias, bias)
        return dense.train(self.training)

    def extra_repr(self) -> str:
        first = self.first
        s = (
            f"{first.in_channels}, {self.out_channels}, kernel_size={first.kernel_size}, rank={self.rank}, "
            f"stride={first.stride}"
        )
        if first.padding != (0,) * len(first.kernel_size):
            s += f", padding={first.padding}"
        if first.dilation != (1,) * len(first.kernel_size):
            s += f", dilation={first.dilation}"
        if first.padding_mode != "zeros":
            s += f", padding_mode={first.padding_mode}"
        return s + f", bias={self.second.bias is not None}"


class LowRankConv2d(_LowRankConv):
    """A Conv2d of weight ``W ~ A B`` as a ``k x k`` Conv2d to ``rank`` channels and a ``1 x 1`` Conv2d with the bias.

    >>> import torch, lightning_rank as lr
    >>> _ = torch.manual_seed(0)
    >>> conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    >>> u, s, vh = torch.linalg.svd(conv.weight.detach().flatten(1))  # W as (out, C_in * kh * kw) = (8, 27)
    >>> low = lr.LowRankConv2d.from_dense(conv, u[:, :2] * s[:2], vh[:2])
    >>> low.first
    Conv2d(3, 2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    >>> low.second
    Conv2d(2, 8, kernel_size=(1, 1), stride=(1, 1))
    >>> low.to_dense()
    Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    """

    _conv = nn.Conv2d
    factorized_kind = "conv2d"


class LowRankConv1d(_LowRankConv):
    """A Conv1d of weight ``W ~ A B`` as a size-``k`` Conv1d to ``rank`` channels and a size-1 Conv1d with the bias.

    >>> import torch, lightning_rank as lr
    >>> _ = torch.manual_seed(0)
    >>> conv = torch.nn.Conv1d(4, 6, kernel_size=5)
    >>> u, s, vh = torch.linalg.svd(conv.weight.detach().flatten(1))  # (6, 4 * 5)
    >>> low = lr.LowRankConv1d.from_dense(conv, u[:, :3] * s[:3], vh[:3])
    >>> low.rank, low.first, low.second
    (3, Conv1d(4, 3, kernel_size=(5,), stride=(1,), bias=False), Conv1d(3, 6, kernel_size=(1,), stride=(1,)))
    """

    _conv = nn.Conv1d
    factorized_kind = "conv1d"


LOW_RANK_TYPES = (LowRankLinear, LowRankConv1d, LowRankConv2d)
_LOW_RANK_OF_KIND: dict[str, type[nn.Module]] = {
    "linear": LowRankLinear,
    "hf_conv1d": LowRankLinear,
    "conv1d": LowRankConv1d,
    "conv2d": LowRankConv2d,
}


def low_rank_type(layer: nn.Module) -> type[LowRankLinear] | type[_LowRankConv] | None:
    """The low-rank class that can replace ``layer``, or ``None`` when there is none."""
    if factorized_kind(layer) is not None:
        return None  # already a low-rank pair
    kind = layer_kind(layer)
    if kind in ("conv1d", "conv2d") and layer.groups != 1:
        return None
    return _LOW_RANK_OF_KIND.get(kind)  # type: ignore[return-value]


def low_rank_from_dense(layer: nn.Module, a: Tensor, b: Tensor) -> LowRankLinear | _LowRankConv:
    """The low-rank replacement of ``layer`` with weight factors ``a @ b`` (``(out, r) @ (r, fan_in)``)."""
    cls = low_rank_type(layer)
    if cls is None:
        raise TypeError(
            f"{type(layer).__name__} has no low-rank replacement: supported are nn.Linear, Hugging Face Conv1D, "
            "and nn.Conv1d / nn.Conv2d with groups=1"
        )
    return cls.from_dense(layer, a, b)


def _has_dense_weights(layer: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(getattr(layer, name, None), "weight", None), Tensor) for name in names)


def disable_dense_fast_paths(model: nn.Module) -> list[str]:
    """Make torch's fused inference paths decline wherever they would read a factorized layer's dense ``.weight``.

    Call it after swapping low-rank layers into ``model`` (``factorize_`` and ``load_factorized`` do);
    it returns the names of the modules it changed, and changes nothing else.

    In eval mode without gradients, ``nn.TransformerEncoderLayer`` runs one fused kernel that takes
    ``linear1.weight``/``linear2.weight`` directly, and ``nn.TransformerEncoder`` reads its first layer's
    weights before packing padded inputs into nested tensors. A low-rank layer has no dense weight on
    purpose: materializing ``A B`` on every call would cost the dense layer's time and memory (and
    in-place writes to such a weight would be silently lost). So a layer with a factorized ``linear1`` or
    ``linear2`` gets ``activation_relu_or_gelu = 0`` (that flag only picks the fused kernel's activation;
    with 0 the layer runs its regular forward, which calls the low-rank layers and gives the same
    outputs), and an encoder whose first layer is such a layer gets ``use_nested_tensor = False``
    (torch's own switch, which its ``__init__`` sets for layers that cannot take the fast path). Later
    factorized layers still accept the nested tensors an encoder with a dense first layer passes them.
    """
    changed = []
    ffn = ("linear1", "linear2")
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) and not _has_dense_weights(module, ffn):
            if module.activation_relu_or_gelu:
                module.activation_relu_or_gelu = 0
                changed.append(name)
        elif isinstance(module, nn.TransformerEncoder) and len(module.layers) > 0:
            if not _has_dense_weights(module.layers[0], ffn) and getattr(module, "use_nested_tensor", False):
                module.use_nested_tensor = False
                changed.append(name)
    return changed
