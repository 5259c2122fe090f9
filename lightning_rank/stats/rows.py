"""Which rows of a layer's input are counted: the row policy, one shared draw per batch, conv patches.

A d-dimensional second moment stops changing, for energy ranks, once a few dozen multiples of d rows
have been seen; counting every row of every batch is wasted work. The default policy ``"auto"`` gives
each layer a budget of ``max(AUTO_MIN_ROWS, AUTO_ROWS_PER_FEATURE * fan_in)`` rows over the whole
collection when the number of batches is known (a sized iterable in ``collect``, the validation epoch in
the callbacks): every batch keeps the same fraction of its rows, sized on the first batch, so that each
row of the data is equally likely to be counted; otherwise it keeps at most ``max(AUTO_BATCH_MIN_ROWS,
AUTO_BATCH_ROWS_PER_FEATURE * fan_in)`` rows of each batch. Rows are drawn uniformly without replacement.
An int caps every layer at that many rows a batch; ``None`` counts every row (exact statistics).

The draw is made once per batch and row count and shared by every layer with that many rows (a layer
keeping ``k`` rows takes the first ``k`` of the shared permutation), and a convolution's patches are
gathered only at the kept output positions when few are kept.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RowPolicy = int | Literal["auto"] | None

# Measured on the digits ViT and CNN (benchmarks/monitor_overhead.py): ranks within +-1 and MLU within 0.005
# of exact statistics. The ViT's 64-wide layers were within +-1 at 56 rows per feature, the CNN's at 51.
AUTO_ROWS_PER_FEATURE = 64  # over the whole collection
AUTO_MIN_ROWS = 4096
AUTO_BATCH_ROWS_PER_FEATURE = 8  # per batch, when the number of batches is unknown
AUTO_BATCH_MIN_ROWS = 512


def row_limit(policy: RowPolicy, fan_in: int) -> int | None:
    """The most rows of one input counted per batch under ``policy`` (None: all of them), when the number of
    batches is not known."""
    if policy is None:
        return None
    if policy == "auto":
        return max(AUTO_BATCH_MIN_ROWS, AUTO_BATCH_ROWS_PER_FEATURE * fan_in)
    return policy


def auto_rate(fan_in: int, rows: int, batches: int) -> float:
    """The fraction of its rows each batch keeps under "auto" when ``batches`` batches of about ``rows`` rows
    (the first batch's) are to be observed: the budget ``max(AUTO_MIN_ROWS, AUTO_ROWS_PER_FEATURE * fan_in)``
    over all of them, at most 1."""
    return min(1.0, max(AUTO_MIN_ROWS, AUTO_ROWS_PER_FEATURE * fan_in) / (rows * batches))


class SharedDraws:
    """One uniform random permutation per batch and row count, shared by every layer that subsamples.

    ``positions(n, k, device)`` is the first ``k`` entries of the batch's permutation of ``range(n)``: a
    uniform sample without replacement for each layer, drawn once for all layers with ``n`` rows.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._draws: dict[tuple[int, torch.device], Tensor] = {}

    def new_batch(self) -> None:
        self._draws.clear()

    def positions(self, n: int, k: int, device: torch.device) -> Tensor:
        draw = self._draws.get((n, device))
        if draw is None:
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(self.seed)
            draw = torch.randperm(n, generator=self._generator).to(device)
            self._draws[(n, device)] = draw
        return draw[:k]


class ConvGeometry:
    """Where the receptive-field patches of a Conv1d/Conv2d lie in its padded, channels-last input.

    Patch entries are taken in ``(kh, kw, C_in)`` order, whose runs of channels lie contiguous in a
    channels-last tensor: every patch is one strided view, copied into rows several times faster than
    ``unfold`` lays them out in the weight's ``(C_in, kh, kw)`` order. ``order`` gives, for each entry in the
    weight's order, its place in a patch row, so the sums can be put back in the weight's order once, when
    read. Built once per layer and input shape and reused.
    """

    def __init__(self, module: nn.Conv1d | nn.Conv2d, padded: tuple[int, ...], device: torch.device) -> None:
        channels, height, width = padded
        (kh, kw), (sh, sw), (dh, dw) = _pairs(module)
        self.out_h = (height - dh * (kh - 1) - 1) // sh + 1
        self.out_w = (width - dw * (kw - 1) - 1) // sw + 1
        self.fan_in = channels * kh * kw
        pixel, row = channels, width * channels  # strides of the channels-last input
        # (batch, out_h, out_w, kh, kw, C_in) over the channels-last input
        self.strides = (height * row, sh * row, sw * pixel, dh * row, dw * pixel, 1)
        self.size = (self.out_h, self.out_w, kh, kw, channels)
        self.order = patch_order(channels, kh * kw, device)

    def padded(self, batched: Tensor, padding: tuple[int, int]) -> Tensor:
        """``(B, C, H, W)`` as a contiguous channels-last ``(B, H + 2 ph, W + 2 pw, C)`` with zero padding."""
        ph, pw = padding
        channels_last = batched.permute(0, 2, 3, 1)
        if ph or pw:
            channels_last = F.pad(channels_last, (0, 0, pw, pw, ph, ph))
        return channels_last.contiguous()

    def patches(self, padded: Tensor) -> Tensor:
        """Every patch as rows ``(B * L, fan_in)``, entries in ``(kh, kw, C_in)`` order."""
        return self._view(padded).reshape(-1, self.fan_in)

    def gather(self, padded: Tensor, positions: Tensor) -> Tensor:
        """The patches at flat output ``positions`` (``b * L + l``) as rows ``(len(positions), fan_in)``."""
        b, rest = positions // (self.out_h * self.out_w), positions % (self.out_h * self.out_w)
        return self._view(padded)[b, rest // self.out_w, rest % self.out_w].reshape(-1, self.fan_in)

    def _view(self, padded: Tensor) -> Tensor:
        """``(B, out_h, out_w, kh, kw, C_in)``: every patch, as a view of the channels-last input."""
        return padded.as_strided((padded.shape[0], *self.size), self.strides)


@functools.lru_cache(maxsize=64)
def patch_order(channels: int, taps: int, device: torch.device) -> Tensor:
    """For each patch entry in the weight's ``(C_in, taps)`` order, its index in the ``(taps, C_in)`` order of
    :meth:`ConvGeometry.patches` (one tensor per shape, so equal orders are the same object; made outside
    inference mode, since it outlives the validation that first asks for it)."""
    with torch.inference_mode(False):
        return (torch.arange(taps, device=device)[None, :] * channels
                + torch.arange(channels, device=device)[:, None]).reshape(-1)


def _pairs(module: nn.Conv1d | nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Kernel, stride and dilation as 2-d pairs (a Conv1d is a Conv2d of height 1)."""
    if isinstance(module, nn.Conv1d):
        return (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
    return tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)


def conv_input(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The input as a 4-d batch ``(B, C, H, W)`` with padding applied when it is not plain zero padding
    (returned as the 2-d padding left for ``unfold``)."""
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        padding = tuple(module.padding)
    else:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * spatial
    if spatial == 1:
        return x.unsqueeze(2), (0, *padding)
    return x, padding


def nested_rows(x: Tensor) -> Tensor:
    """The rows of a nested tensor (e.g. from ``nn.TransformerEncoder`` with a padding mask): its values are
    the real rows only, so no mask applies."""
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in x.unbind()])


def expand_mask(mask: Tensor, lead: tuple[int, ...]) -> Tensor | None:
    """The mask broadcast over ``lead`` when it covers its first dims, else ``None``."""
    if tuple(mask.shape) != lead[: mask.dim()]:
        return None
    return mask.reshape(*mask.shape, *([1] * (len(lead) - mask.dim()))).expand(lead).reshape(-1)
