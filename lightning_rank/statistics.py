"""Streaming input statistics of target layers: ``sum x x^T``, ``sum x`` and ``n`` per distinct input.

Forward pre-hooks turn each layer's input into rows (a Linear's ``(..., d)`` input, a convolution's
receptive-field patches), keep those the row policy selects (:mod:`~lightning_rank.rows`) and add them
to an accumulator. Layers fed the very same tensor in one forward pass (q, k, v) share one accumulator,
so its Gram matrix is computed once. Gram updates run at full float32 precision whatever
``torch.set_float32_matmul_precision`` says (:mod:`~lightning_rank.precision`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rank.checks import check_mask_fn, check_row_policy
from lightning_rank.precision import full_precision_matmul
from lightning_rank.rows import ConvGeometry, RowPolicy, SharedDraws, auto_rate, conv_input, row_limit
from lightning_rank.spectrum import sum_roundoff
from lightning_rank.targets import ModuleSelector, Target, float_dtype, select_targets

MaskFn = Callable[[Any], Tensor | None]
ForwardFn = Callable[[nn.Module, Any], Any]


class InputStatistics:
    """Sums over the rows ``x`` (length ``dim``) one layer input produced: ``gram``, ``total``, ``count``.

    ``count`` is the number of rows really added; ``nonfinite`` counts rows dropped because they held
    NaN or Inf; ``updates`` counts the additions (batches), which with ``count`` sizes the round-off
    bound of the sums. All three are 0-d int64 tensors on the statistics' device.

    Updates fill only the upper block triangle of the Gram matrix (a symmetric product needs about
    half the work of a full ``addmm_``); reading :attr:`gram` mirrors it into the full matrix.
    """

    def __init__(
        self, gram: Tensor, total: Tensor, count: Tensor, nonfinite: Tensor, updates: Tensor | None = None
    ) -> None:
        self._gram = gram  # upper triangle valid; lower triangle valid only while _mirrored
        self._mirrored = True
        self._total = total
        self._order: Tensor | None = None  # where each weight-order entry is stored (None: in place)
        self.count, self.nonfinite = count, nonfinite
        self.updates = updates if updates is not None else (count > 0).to(torch.int64)

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype, device: torch.device) -> InputStatistics:
        # Created outside inference mode so that they can be updated in place anywhere later.
        with torch.inference_mode(False):
            return cls(
                gram=torch.zeros(dim, dim, dtype=dtype, device=device),
                total=torch.zeros(dim, dtype=dtype, device=device),
                count=torch.zeros((), dtype=torch.int64, device=device),
                nonfinite=torch.zeros((), dtype=torch.int64, device=device),
                updates=torch.zeros((), dtype=torch.int64, device=device),
            )

    @property
    def gram(self) -> Tensor:
        """``sum x x^T`` as the full symmetric ``(dim, dim)`` matrix."""
        self._store_in(None)
        self._mirror()
        return self._gram

    @property
    def total(self) -> Tensor:
        """``sum x``."""
        self._store_in(None)
        return self._total

    def _mirror(self) -> None:
        if not self._mirrored:
            with torch.inference_mode(False):  # read during validation, updated again after it
                self._gram = torch.triu(self._gram) + torch.triu(self._gram, diagonal=1).t()
            self._mirrored = True

    def _store_in(self, order: Tensor | None) -> None:
        """Keep the sums with each weight-order entry ``i`` at index ``order[i]`` (``None``: at ``i``).

        Rows arrive in the order their layer produces them cheaply (conv patches channels-last); the sums are
        put back in the weight's order when read, one permutation instead of one per batch."""
        if order is self._order:
            return
        self._mirror()
        with torch.inference_mode(False):  # new state tensors must stay updatable outside inference mode
            if self._order is not None:  # back to the weight's order
                self._gram, self._total = self._gram[self._order][:, self._order], self._total[self._order]
            if order is not None:
                inverse = torch.argsort(order)
                self._gram, self._total = self._gram[inverse][:, inverse], self._total[inverse]
        self._order = order

    @property
    def dim(self) -> int:
        return self._gram.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._gram.dtype

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The state tensors as stored, in the weight's order (the Gram matrix's upper triangle is the valid part)."""
        self._store_in(None)
        return self._gram, self._total, self.count, self.nonfinite, self.updates

    def all_reduce_(self, reduce: Callable[[Tensor], Any]) -> None:
        """Sum the state over processes in place with ``reduce`` (an in-place sum such as ``dist.all_reduce``)."""
        for tensor in self.tensors():
            reduce(tensor)
        self._mirrored = False  # the lower triangles of the ranks may differ: mirror again from the upper

    def to(self, device: torch.device | str) -> InputStatistics:
        """A copy on ``device``."""
        state = (self.gram, self.total, self.count, self.nonfinite, self.updates)
        return InputStatistics(*(t.to(device, copy=True) for t in state))

    def update(self, rows: Tensor, order: Tensor | None = None) -> None:
        """Add ``rows`` of shape ``(N, dim)``, upcast to the statistics' dtype; non-finite rows are dropped.

        ``order``: where each entry of the weight's order lies in a row (``None``: in place)."""
        self._store_in(order)
        rows = rows.to(self.dtype)
        if rows.device.type == "cpu":
            # A NaN or Inf anywhere makes the sum of the column sums non-finite: one cheap check, no copy of the
            # rows (a sum that only overflows sends the batch down the exact path, which then drops nothing).
            column_sums, kept = rows.sum(dim=0), rows.shape[0]
            if not math.isfinite(float(column_sums.sum())):
                rows, kept = self._finite_rows(rows)
                column_sums = rows.sum(dim=0)
        else:  # on an accelerator that check would wait for the device every batch: mask the rows instead
            rows, kept = self._finite_rows(rows, masked=True)
            column_sums = rows.sum(dim=0)
        with full_precision_matmul():  # a TF32/bf16 Gram would silently change the ranks
            symmetric_gram_update_(self._gram, rows)
        self._mirrored = False
        self._total.add_(column_sums)
        self.count.add_(kept)
        self.updates.add_(1)

    def _finite_rows(self, rows: Tensor, masked: bool = False) -> tuple[Tensor, Tensor | int]:
        """``rows`` without those holding NaN or Inf (counted in ``nonfinite``), and how many are kept. ``masked``
        zeroes them in place of dropping, so that no count leaves the device."""
        finite = torch.isfinite(rows).all(dim=1)
        dropped = (~finite).sum()
        self.nonfinite.add_(dropped)
        if masked:
            return torch.where(finite[:, None], rows, 0), rows.shape[0] - dropped
        rows = rows[finite]
        return rows, rows.shape[0]

    def roundoff(self) -> float:
        """``u`` with ``|error of C_ij| <= u * sqrt(C_ii C_jj)`` for the second moment of these sums
        (see :func:`~lightning_rank.spectrum.sum_roundoff`)."""
        return sum_roundoff(self.dtype, int(self.count), int(self.updates))

    def mean(self) -> Tensor:
        """``E[x]`` in float64 (zeros when no row was seen)."""
        return self.total.double() / self.count.clamp(min=1).double()

    def second_moment(self, centered: bool = False, dtype: torch.dtype = torch.float64) -> Tensor:
        """``C = sum x x^T / n`` in ``dtype`` (float64 by default), or the covariance ``C - mu mu^T`` when ``centered``."""
        # Centered, the subtraction cancels; from float64 sums, dividing first keeps one rounding and float32's range.
        compute = torch.float64 if centered or self.dtype == torch.float64 else dtype
        gram = self.gram
        moment = gram.to(compute)
        count = self.count.clamp(min=1).to(compute)
        moment = moment.div_(count) if moment is not gram else moment / count  # one pass over d x d, not two
        if centered:
            mu = self.mean()
            moment = moment.sub_(torch.outer(mu, mu))
        return moment.to(dtype)


@dataclass
class ActivationStatistics:
    """What ``collect`` returns: input statistics per layer, plus the layers that were skipped.

    ``inputs`` is keyed by the first layer that saw each distinct input; ``sources`` maps every
    analyzed layer to that key, so layers sharing an input share one :class:`InputStatistics`.
    """

    inputs: dict[str, InputStatistics] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unmasked: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> InputStatistics:
        if name in self.sources:
            return self.inputs[self.sources[name]]
        if name in self.skipped:
            raise KeyError(f"layer {name!r} has no statistics: {self.skipped[name]}")
        raise KeyError(f"layer {name!r} has no statistics; layers with statistics: {list(self.sources)}")

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    @property
    def layers(self) -> list[str]:
        """Names of the layers with statistics, in model order."""
        return list(self.sources)

    @property
    def device(self) -> torch.device | None:
        first = next(iter(self.inputs.values()), None)
        return first.gram.device if first is not None else None

    def all_reduce_(self, reduce: Callable[[Tensor], Any]) -> ActivationStatistics:
        """Sum every statistic over processes in place; ``reduce`` is an in-place sum (e.g. ``dist.all_reduce``)."""
        for stats in self.inputs.values():
            stats.all_reduce_(reduce)
        return self

    def to(self, device: torch.device | str) -> ActivationStatistics:
        """A copy with every tensor on ``device``."""
        moved = {key: stats.to(device) for key, stats in self.inputs.items()}
        return ActivationStatistics(moved, dict(self.sources), dict(self.skipped), list(self.unmasked))


def symmetric_gram_update_(gram: Tensor, rows: Tensor, block: int | None = None) -> None:
    """``gram += rows^T rows`` on the upper block triangle only, one GEMM per block row.

    Blocks of 128-256 columns keep every GEMM large enough to run at full speed while skipping
    about half of the products; below two blocks a plain ``addmm_`` is used.
    """
    dim = rows.shape[1]
    block = block or (128 if dim <= 1024 else 256)
    if dim < 2 * block:
        gram.addmm_(rows.t(), rows)
        return
    for start in range(0, dim, block):
        stop = min(start + block, dim)
        gram[start:stop, start:].addmm_(rows[:, start:stop].t(), rows[:, start:])


def nested_rows(x: Tensor) -> Tensor:
    """The rows of a nested tensor (e.g. from ``nn.TransformerEncoder`` with a padding mask): its values are
    the real rows only, so no mask applies."""
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in x.unbind()])


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


def _expand_mask(mask: Tensor, lead: tuple[int, ...]) -> Tensor | None:
    """The mask broadcast over ``lead`` when it covers its first dims, else ``None``."""
    if tuple(mask.shape) != lead[: mask.dim()]:
        return None
    return mask.reshape(*mask.shape, *([1] * (len(lead) - mask.dim()))).expand(lead).reshape(-1)


# Conv patches are gathered at the kept positions when fewer than 1/GATHER_BELOW of them are kept; above
# that, copying every patch and selecting rows is faster (measured on CPU).
GATHER_BELOW = 2

UNREACHED = "never called during collection (not reached by the data)"
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
    ) -> None:
        check_row_policy(max_rows_per_batch)
        check_mask_fn(mask_fn)
        self.targets, self._unobservable = select_targets(model, target_modules, exclude_modules)
        self.mask_fn = mask_fn
        self.max_rows_per_batch = max_rows_per_batch
        self.expected_batches = batches
        self.dtype = float_dtype(dtype)
        self.seed = seed
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.reset()

    def reset(self) -> None:
        """Forget every statistic collected so far (the hooks stay as they are)."""
        self._inputs: dict[str, InputStatistics] = {}
        self._sources: dict[str, str] = {}
        self._row_kinds: dict[str, tuple] = {}  # per accumulator: how its layers turn their input into rows
        self._rates: dict[str, float] = {}  # per layer under "auto" with a known number of batches
        self._diverged: dict[str, str] = {}
        self._unmasked: set[str] = set()
        self._draws = SharedDraws(self.seed)
        self._geometry: dict[tuple[str, tuple[int, ...], torch.device], ConvGeometry] = {}
        self._batches = 0
        self._in_pass = False
        self.seconds = 0.0  # spent in the hooks counting rows since the last reset

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
            rows, order = self._rows(target, x.detach())
            stats = self._inputs.get(key)
            if stats is None:
                stats = self._inputs[key] = InputStatistics.zeros(rows.shape[1], self.dtype, rows.device)
            stats.update(rows, order)

    def _rows(self, target: Target, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The rows of ``x`` the mask and the row policy keep, and the order of their entries (``None``: the
        weight's; conv patches come channels-last, see :class:`~lightning_rank.rows.ConvGeometry`)."""
        if x.is_nested:
            rows = nested_rows(x)
            positions = self._positions(target.name, None, rows.shape[0], rows.shape[1], rows.device)
            return (rows if positions is None else rows.index_select(0, positions)), None
        if target.kind not in ("conv1d", "conv2d"):
            x = _token_major(target, x)
            lead = tuple(x.shape[:-1])
            positions = self._positions(target.name, lead, x.numel() // max(x.shape[-1], 1), x.shape[-1], x.device)
            rows = x.reshape(-1, x.shape[-1])
            return (rows if positions is None else rows.index_select(0, positions)), None
        batched, padding = conv_input(_conv_module(target), x)
        batch, channels, height, width = batched.shape
        padded_shape = (channels, height + 2 * padding[0], width + 2 * padding[1])
        geometry = self._geometry.get((target.name, padded_shape, x.device))
        if geometry is None:
            geometry = ConvGeometry(_conv_module(target), padded_shape, x.device)
            self._geometry[(target.name, padded_shape, x.device)] = geometry
        lead = (batch, geometry.out_h * geometry.out_w)
        positions = self._positions(target.name, lead, batch * lead[1], geometry.fan_in, x.device)
        padded = geometry.padded(batched, padding)
        if positions is None:
            return geometry.patches(padded), geometry.order
        if positions.numel() * GATHER_BELOW > lead[0] * lead[1]:  # most positions kept: copying all is faster
            return geometry.patches(padded).index_select(0, positions), geometry.order
        return geometry.gather(padded, positions), geometry.order

    def _positions(
        self, name: str, lead: tuple[int, ...] | None, n: int, fan_in: int, device: torch.device
    ) -> Tensor | None:
        """Flat indices of the rows to count among ``n`` rows of leading dims ``lead`` (None: every row)."""
        valid = None
        if self._mask is not None and lead is not None:
            mask = self._masks.get(device)
            if mask is None:
                mask = self._masks[device] = self._mask.to(device)
            expanded = _expand_mask(mask, lead)
            if expanded is None:
                self._unmasked.add(name)
            elif not bool(expanded.all()):
                valid = expanded.nonzero().squeeze(1)
        count = n if valid is None else valid.numel()
        limit = self._row_limit(name, fan_in, count)
        if limit is None or count <= limit:
            return valid
        keep = self._draws.positions(count, limit, device)
        return keep if valid is None else valid[keep]

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
            rate = self._rates[name] = auto_rate(fan_in, count, self.expected_batches)
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
                skipped[name] = UNREACHED
            else:
                sources[name] = self._sources[name]
        inputs = {key: self._inputs[key] for key in dict.fromkeys(sources.values())}
        return ActivationStatistics(inputs, sources, skipped, sorted(self._unmasked & set(sources)))


def _layer_input(target: Target, args: tuple, kwargs: dict) -> Tensor | None:
    if target.kind != "mha_in_proj":
        return args[0] if args else next(iter(kwargs.values()))
    names = ("query", "key", "value")
    query, key, value = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
    return query if query is key and key is value else None


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a Mapping, ``model(batch[0])`` for a tuple or list, ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def collect(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: ForwardFn | None = None,
    target_modules: ModuleSelector = None,
    exclude_modules: ModuleSelector = None,
    mask_fn: MaskFn | None = None,
    max_rows_per_batch: RowPolicy = "auto",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ActivationStatistics:
    """Run ``model`` over ``batches`` in eval mode without gradients and stream each layer's input statistics.

    No activation is stored: each input adds to ``sum x x^T``, ``sum x`` and ``n`` on its own device.
    Hooks are removed and every module's training flag is restored, even when the forward raises.

    ``max_rows_per_batch`` is the row policy: ``"auto"`` (default) counts about ``max(4096, 64 * fan_in)``
    uniformly drawn rows of each input in all when ``batches`` has a length (the same fraction of every
    batch, sized on the first; at most ``max(512, 8 * fan_in)`` a batch when it has none), enough for
    ranks within +-1 of exact statistics at a fraction of the cost; an int counts at most that many a
    batch; ``None`` counts every row (exact statistics). ``seed`` seeds the draws. Each layer's rows
    counted are in its report's ``rows``.
    """
    try:
        count = len(batches)  # type: ignore[arg-type]
    except TypeError:  # a generator, or a DataLoader over an iterable dataset
        count = None
    collector = StatisticsCollector(
        model,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        mask_fn=mask_fn,
        max_rows_per_batch=max_rows_per_batch,
        dtype=dtype,
        seed=seed,
        batches=count,
    )
    forward = forward or default_forward
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with collector.attached(), torch.no_grad():
            for batch in batches:
                with collector.observe(batch):
                    forward(model, batch)
    finally:
        for module, training in modes:
            module.training = training
    if collector.batches == 0:
        raise ValueError("`batches` yielded no batch: pass an iterable with at least one batch")
    stats = collector.compute()
    warn_about_rows(stats)
    return stats


def warn_about_rows(stats: ActivationStatistics) -> None:
    """Warn once about layers the mask did not fit and about NaN/Inf rows dropped from the sums."""
    if stats.unmasked:
        warnings.warn(
            f"The mask from `mask_fn` did not fit the leading dims of the inputs of {stats.unmasked} "
            "(e.g. pooled (B, d) inputs under a (B, T) mask): every row of these layers was counted.",
            stacklevel=3,
        )
    dropped = {key: int(s.nonfinite) for key, s in stats.inputs.items()}
    dropped = {name: dropped[key] for name, key in stats.sources.items() if dropped[key]}
    if dropped:
        warnings.warn(
            f"Rows with NaN or Inf were dropped from the statistics (rows per layer: {dropped}). "
            "They are counted in each layer's `nonfinite_rows`.",
            stacklevel=3,
        )
