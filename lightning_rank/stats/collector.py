"""Forward pre-hooks that stream the inputs of the selected layers into :class:`InputStatistics`.

Each hook turns a layer's input into rows (a Linear's ``(..., d)`` input, a convolution's receptive-field
patches), keeps those the mask and the row policy select (:mod:`~lightning_rank.stats.rows`) and adds them
to an accumulator. Layers fed the very same tensor in one forward pass (q, k, v) share one accumulator,
so its Gram matrix is computed once.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rank.checks import MaskFn, check_mask_fn, check_row_policy
from lightning_rank.stats.ownership import ProcessShare
from lightning_rank.stats.rows import (
    ConvGeometry,
    RowPolicy,
    SharedDraws,
    auto_rate,
    conv_input,
    expand_mask,
    nested_rows,
    row_limit,
)
from lightning_rank.stats.settling import Settling
from lightning_rank.stats.sums import ActivationStatistics, InputStatistics
from lightning_rank.targets import ModuleSelector, Target, float_dtype, layer_shape, select_targets


def _row_kind(target: Target) -> tuple:
    """How a layer turns its input into rows: layers fed the very same tensor share an accumulator only when
    this is equal (q, k and v do; a 3x3 conv and a 1x1 shortcut reading one feature map do not)."""
    if target.kind in ("conv1d", "conv2d"):
        conv = _conv_module(target)
        return (target.kind, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode)
    if target.kind == "mha_in_proj" and not target.module.batch_first:
        return ("token_major",)
    return ("rows",)


def _conv_module(target: Target) -> nn.Conv1d | nn.Conv2d:
    return target.module.first if target.factorized else target.module


def _token_major(target: Target, x: Tensor) -> Tensor:
    if target.kind == "mha_in_proj" and target.module.batch_first is False and x.dim() == 3:
        return x.transpose(0, 1)  # (T, B, E) -> (B, T, E), so masks read (B, T) for every layer
    return x


# Conv patches are gathered at the kept positions when fewer than 1/GATHER_BELOW of them are kept; above
# that, copying every patch and selecting rows is faster (measured on CPU).
GATHER_BELOW = 2

UNREACHED = "never called during collection (not reached by the data)"
ELSEWHERE = "counted by the process that owns it"
_DIVERGED = (
    "its input was the same tensor as {key!r}'s in one batch but differed in another; "
    "exclude one of them with `exclude_modules`"
)


@dataclass
class _SeenTensor:
    ref: weakref.ref
    token: int
    keys: list[str]  # accumulators this tensor was already added to in this pass


class StatisticsCollector:
    """Hooks that stream the inputs of the selected layers into :class:`InputStatistics`.

    Use :meth:`attach`/:meth:`detach` (or ``with collector.attached():``) around the forwards, and
    wrap each forward pass in ``with collector.observe(batch):``. Forwards outside ``observe`` are
    ignored, so the hooks can stay on during training steps at no cost. ``batches``, when known, is how
    many forward passes will be observed: the row policy ``"auto"`` shares each layer's budget among them.
    ``share``: this process's place among several (see :class:`~lightning_rank.stats.ownership.ProcessShare`);
    layers another process counts alone are skipped here (:attr:`elsewhere`), and a pooled layer's budget is
    shared among the batches of every process.

    >>> import torch, lightning_rank as lr
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> collector = lr.StatisticsCollector(model, max_rows_per_batch=None)  # None: count every row
    >>> with collector.attached(), torch.no_grad():
    ...     for batch in torch.randn(96, 8).split(32):
    ...         with collector.observe(batch):
    ...             _ = model(batch)
    >>> stats = collector.compute()  # what lr.collect(model, batches) returns
    >>> collector.batches, stats.layers, int(stats["0"].count), stats["2"].gram.shape
    (3, ['0', '2'], 96, torch.Size([16, 16]))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        target_modules: ModuleSelector = None,
        exclude_modules: ModuleSelector = None,
        mask_fn: MaskFn | None = None,
        max_rows_per_batch: RowPolicy = "auto",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        batches: int | None = None,
        share: ProcessShare | None = None,
    ) -> None:
        check_row_policy(max_rows_per_batch)
        check_mask_fn(mask_fn)
        self.targets, self._unobservable = select_targets(model, target_modules, exclude_modules)
        self.mask_fn = mask_fn
        self.max_rows_per_batch = max_rows_per_batch
        self.expected_batches = batches
        self.dtype = float_dtype(dtype)
        self.seed = seed
        self.share = share
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.reset()

    def drop_sums(self) -> None:
        """Let go of the accumulators (those :meth:`compute` returned live on with whoever holds them)."""
        self._inputs = {}

    def reset(self) -> None:
        """Forget every statistic collected so far (the hooks stay as they are)."""
        self._inputs: dict[str, InputStatistics] = {}
        self._sources: dict[str, str] = {}
        self._row_kinds: dict[str, tuple] = {}  # per accumulator: how its layers turn their input into rows
        self._rates: dict[str, float] = {}  # per layer under "auto" with a known number of batches
        self._diverged: dict[str, str] = {}
        self._unmasked: set[str] = set()
        self._draws = SharedDraws(self.seed)
        self._settling = Settling()
        self._subsampled: set[str] = set()  # accumulators some of whose rows the row policy left out
        self._geometry: dict[tuple[str, tuple[int, ...], torch.device], ConvGeometry] = {}
        self._batches = 0
        self._in_pass = False
        self.pooled: dict[str, bool] = {}  # per layer reached, under a share: counted on every process
        self.elsewhere: set[str] = set()  # layers reached here that their owner counts alone
        self.seconds = 0.0  # spent in the hooks counting rows since the last reset

    @property
    def nbytes(self) -> int:
        """Bytes the statistics hold now (sums, or the rows held in their place)."""
        return sum(stats.nbytes for stats in self._inputs.values())

    @property
    def batches(self) -> int:
        """How many forward passes were observed since the last reset."""
        return self._batches

    # -- hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        for target in self.targets.values():
            hook = self._make_hook(target)
            self._handles.append(target.module.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def attached(self) -> Iterator[StatisticsCollector]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def _make_hook(self, target: Target) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._in_pass:
                return
            x = _layer_input(target, args, kwargs)
            if x is None:
                self._diverged.setdefault(
                    target.name, "nn.MultiheadAttention used as cross-attention (query, key, value differ)"
                )
                return
            start = time.perf_counter()
            if self._counted_here(target, x):
                self._observe_input(target, x)
            self.seconds += time.perf_counter() - start

        return hook

    # -- one forward pass --------------------------------------------------------------------
    @contextlib.contextmanager
    def observe(self, batch: Any) -> Iterator[None]:
        """Count the target layers' inputs during the forward pass(es) run inside this block."""
        self._mask = self._batch_mask(batch)
        self._masks: dict[torch.device, Tensor] = {}
        self._draws.new_batch()
        self._seen: dict[int, _SeenTensor] = {}
        self._layer_tokens: dict[str, set[int]] = {}
        self._input_tokens: dict[str, set[int]] = {}
        self._in_pass = True
        try:
            yield
        finally:
            self._in_pass = False
            self._check_sharing()
            self._seen.clear()
            self._mask = None
            self._masks.clear()
        self._batches += 1

    def _batch_mask(self, batch: Any) -> Tensor | None:
        if self.mask_fn is None:
            return None
        mask = self.mask_fn(batch)
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"`mask_fn` must return a bool tensor over the leading dims of the inputs (e.g. (B, T)), "
                f"got {type(mask).__name__ if not isinstance(mask, Tensor) else mask.dtype}"
            )
        return mask

    def _counted_here(self, target: Target, x: Tensor) -> bool:
        """Whether this process counts ``target``: always without a share; else when it owns the layer or the layer
        is pooled (decided on its first batch, from the rows it holds)."""
        if self.share is None:
            return True
        pooled = self.pooled.get(target.name)
        if pooled is None:
            pooled = self.pooled[target.name] = self.share.pooled(
                self.max_rows_per_batch, layer_shape(target)[1], self._row_count(target, x), self.expected_batches)
        if pooled or self.share.owns(target.name):
            return True
        self.elsewhere.add(target.name)
        return False

    def _row_count(self, target: Target, x: Tensor) -> int:
        """How many rows ``x`` holds for ``target`` before any mask or draw."""
        if x.is_nested:
            return sum(t.numel() // max(t.shape[-1], 1) for t in x.unbind())
        if target.kind not in ("conv1d", "conv2d"):
            return x.numel() // max(x.shape[-1], 1)
        batched, padding = conv_input(_conv_module(target), x)
        geometry = self._geometry_of(target, batched, padding)
        return batched.shape[0] * geometry.out_h * geometry.out_w

    def _geometry_of(self, target: Target, batched: Tensor, padding: tuple[int, int]) -> ConvGeometry:
        """The patch geometry of ``target`` on a ``(B, C, H, W)`` input with ``padding`` left (made once per shape)."""
        _, channels, height, width = batched.shape
        padded_shape = (channels, height + 2 * padding[0], width + 2 * padding[1])
        geometry = self._geometry.get((target.name, padded_shape, batched.device))
        if geometry is None:
            geometry = ConvGeometry(_conv_module(target), padded_shape, batched.device)
            self._geometry[(target.name, padded_shape, batched.device)] = geometry
        return geometry

    def _observe_input(self, target: Target, x: Tensor) -> None:
        name = target.name
        seen = self._seen.get(id(x))
        if seen is not None and seen.ref() is not x:
            seen = None  # the id belongs to a tensor that was freed: a different input
        if seen is None:
            seen = _SeenTensor(weakref.ref(x), len(self._seen), [])
            self._seen[id(x)] = seen
        key = self._sources.get(name)
        if key is None:  # share the accumulator of a layer that made the same rows of this tensor, if any
            kind = _row_kind(target)
            key = next((k for k in seen.keys if self._row_kinds[k] == kind), name)
            self._sources[name] = key
            self._row_kinds.setdefault(key, kind)
        self._layer_tokens.setdefault(name, set()).add(seen.token)
        if key in seen.keys:
            return
        if self._input_tokens.get(key) and list(self._sources.values()).count(key) > 1:
            # Another member already filled the shared accumulator in this pass: adding this
            # different tensor would corrupt the statistics of every member.
            self._diverged.setdefault(name, _DIVERGED.format(key=key))
            return
        seen.keys.append(key)
        self._input_tokens.setdefault(key, set()).add(seen.token)
        with torch.no_grad():
            rows, order, weight = self._rows(target, x.detach())
            stats = self._inputs.get(key)
            if stats is None:
                stats = self._inputs[key] = InputStatistics.zeros(rows.shape[1], self.dtype, rows.device, hold_rows=True)
            stats.update(rows, order, weight)
            if self.max_rows_per_batch == "auto" and not self.pooled.get(name):  # pooled sums: see settling
                self._settling.observe(key, stats, rows.shape[0], self.expected_batches, self._batches)

    def _rows(self, target: Target, x: Tensor) -> tuple[Tensor, Tensor | None, float]:
        """The rows of ``x`` the mask and the row policy keep, the order of their entries (``None``: the weight's;
        conv patches come channels-last, see :class:`~lightning_rank.stats.rows.ConvGeometry`) and how many rows of
        the data each stands for."""
        if x.is_nested:
            rows = nested_rows(x)
            positions, weight = self._positions(target.name, None, rows.shape[0], rows.shape[1], rows.device)
            return (rows if positions is None else rows.index_select(0, positions)), None, weight
        if target.kind not in ("conv1d", "conv2d"):
            x = _token_major(target, x)
            lead = tuple(x.shape[:-1])
            positions, weight = self._positions(target.name, lead, x.numel() // max(x.shape[-1], 1), x.shape[-1],
                                                x.device)
            rows = x.reshape(-1, x.shape[-1])
            return (rows if positions is None else rows.index_select(0, positions)), None, weight
        batched, padding = conv_input(_conv_module(target), x)
        batch = batched.shape[0]
        geometry = self._geometry_of(target, batched, padding)
        lead = (batch, geometry.out_h * geometry.out_w)
        positions, weight = self._positions(target.name, lead, batch * lead[1], geometry.fan_in, x.device)
        padded = geometry.padded(batched, padding)
        if positions is None:
            return geometry.patches(padded), geometry.order, weight
        if positions.numel() * GATHER_BELOW > lead[0] * lead[1]:  # most positions kept: copying all is faster
            return geometry.patches(padded).index_select(0, positions), geometry.order, weight
        return geometry.gather(padded, positions), geometry.order, weight

    def _positions(
        self, name: str, lead: tuple[int, ...] | None, n: int, fan_in: int, device: torch.device
    ) -> tuple[Tensor | None, float]:
        """Flat indices of the rows to count among ``n`` rows of leading dims ``lead`` (None: every row), and how many
        rows each stands for (more than 1 once the layer's spectrum has settled)."""
        valid = None
        if self._mask is not None and lead is not None:
            mask = self._masks.get(device)
            if mask is None:
                mask = self._masks[device] = self._mask.to(device)
            expanded = expand_mask(mask, lead)
            if expanded is None:
                self._unmasked.add(name)
            elif not bool(expanded.all()):
                valid = expanded.nonzero().squeeze(1)
        count = n if valid is None else valid.numel()
        limit = self._row_limit(name, fan_in, count)
        weight = 1.0
        if self.max_rows_per_batch == "auto" and count > 0:
            limit, weight = self._settling.keep(self._sources[name], count if limit is None else min(limit, count))
        if limit is None or count <= limit:
            return valid, weight
        self._subsampled.add(self._sources[name])
        keep = self._draws.positions(count, limit, device)
        return (keep if valid is None else valid[keep]), weight

    def _row_limit(self, name: str, fan_in: int, count: int) -> int | None:
        """How many of a batch's ``count`` rows layer ``name`` keeps (None: all). Under "auto" with a known number
        of batches, every batch keeps the same fraction of its rows, sized on the layer's first batch, so rows
        of short or mostly masked batches weigh what they weigh in the data."""
        if self.max_rows_per_batch != "auto" or not self.expected_batches:
            return row_limit(self.max_rows_per_batch, fan_in)
        rate = self._rates.get(name)
        if rate is None:
            if count == 0:
                return None
            batches = self.expected_batches * (self.share.world_size if self.pooled.get(name, False) else 1)
            rate = self._rates[name] = auto_rate(fan_in, count, batches)
        return math.ceil(rate * count)

    def _check_sharing(self) -> None:
        """A layer that shares an accumulator must have seen exactly the inputs added to it."""
        for name, key in self._sources.items():
            if name in self._diverged:
                continue
            if self._layer_tokens.get(name, set()) != self._input_tokens.get(key, set()):
                self._diverged[name] = _DIVERGED.format(key=key)

    # -- result ------------------------------------------------------------------------------
    def compute(self) -> ActivationStatistics:
        """The statistics so far (the live accumulators, not copies), with skipped layers and reasons."""
        skipped = dict(self._unobservable)
        skipped.update(self._diverged)
        sources = {}
        for name in self.targets:
            if name in skipped:
                continue
            if name not in self._sources:
                skipped[name] = ELSEWHERE if name in self.elsewhere else UNREACHED
            else:
                sources[name] = self._sources[name]
        inputs = {key: self._inputs[key] for key in dict.fromkeys(sources.values())}
        for key, stats in inputs.items():
            stats.settled_at = self._settling.settled_at.get(key)
            stats.rows_reason = ("settled" if stats.settled_at is not None else "all" if key not in self._subsampled
                                 else "budget" if self.max_rows_per_batch == "auto" else "cap")
        return ActivationStatistics(inputs, sources, skipped, sorted(self._unmasked & set(sources)))


def _layer_input(target: Target, args: tuple, kwargs: dict) -> Tensor | None:
    if target.kind != "mha_in_proj":
        return args[0] if args else next(iter(kwargs.values()))
    names = ("query", "key", "value")
    query, key, value = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
    return query if query is key and key is value else None
