"""Streaming sums of a layer input's rows: ``sum x x^T``, ``sum x`` and ``n``, and their round-off bound.

:class:`InputStatistics` holds the sums of one distinct input; :class:`ActivationStatistics` maps the
layers of a model to them. Gram updates run at full float32 precision whatever
``torch.set_float32_matmul_precision`` says (:mod:`~lightning_rank.stats.precision`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_rank.stats.precision import full_precision_matmul, symmetric_gram_update_

# Round-off of accumulated sums. Summing m products in a dtype of unit round-off u leaves an error of
# about sqrt(m) u times the sum of their magnitudes (the probabilistic bound of Higham and Mary, 2019;
# the worst case, m u, grows with the data and would remove real spectrum). For a Gram entry that
# magnitude is at most sqrt(G_ii G_jj) (Cauchy-Schwarz), so |error(C_ij)| <= r sqrt(C_ii C_jj).
ROUNDOFF_SAFETY = 8.0

# Rows are held instead of summed while fewer than this fraction of the width have been added: their small Gram
# (``n^2 d`` work, an ``n x n`` float64 eigenproblem) costs less than the ``d x d`` Gram's ``n d^2 / 2`` and its
# eigenproblem, and ``n x d`` rows take less memory than ``d x d`` sums. On a 64x64 ResNet-18 shape (128 validation
# images) holding up to 0.5 and 1.0 of the width gave the same ranks, analysis in 4.4 s and 4.0 s, against 20.5 s.
HOLD_ROWS = 1.0


def sum_roundoff(dtype: torch.dtype, rows: int, updates: int) -> float:
    """``r`` with ``|error(C_ij)| <= r * sqrt(C_ii C_jj)`` for sums of ``rows`` rows added in ``updates`` batches.

    Each entry is a sum of about ``rows / updates`` products per batch followed by ``updates`` additions.
    """
    terms = rows / max(updates, 1) + updates
    return ROUNDOFF_SAFETY * torch.finfo(dtype).eps * max(terms, 1.0) ** 0.5


class InputStatistics:
    """Sums over the rows ``x`` (length ``dim``) one layer input produced: ``gram``, ``total``, ``count``.

    ``count`` is the number of rows the sums stand for and ``summed`` the number really added: they differ only
    where rows were added with a ``weight`` (a row kept from 1 in ``w`` counts ``w`` times, see
    :mod:`~lightning_rank.stats.settling`). ``nonfinite`` counts rows dropped because they held NaN or Inf (as many
    as they stand for); ``updates`` counts the additions (batches), which with ``summed`` sizes the round-off bound
    of the sums. All four are 0-d int64 tensors on the statistics' device.

    Updates fill only the upper block triangle of the Gram matrix (a symmetric product needs about
    half the work of a full ``addmm_``); reading :attr:`gram` mirrors it into the full matrix.

    While fewer than ``HOLD_ROWS * dim`` rows have been added, the rows themselves are held instead of their
    Gram (:attr:`rows`): no more memory than the ``dim x dim`` sum, none of its ``dim^2`` work per row, and
    the moment's nonzero spectrum is that of the rows' small Gram. The first read of :attr:`gram` (or more
    rows) sums them into the Gram batch by batch, exactly as updates would have.

    >>> import torch
    >>> from lightning_rank import InputStatistics
    >>> stats = InputStatistics.zeros(3, torch.float64, torch.device("cpu"))
    >>> stats.update(torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]))  # two rows of a 3-wide input
    >>> int(stats.count), stats.mean()
    (2, tensor([0.5000, 1.5000, 1.0000], dtype=torch.float64))
    >>> stats.second_moment()  # sum x x^T / n
    tensor([[0.5000, 0.0000, 1.0000],
            [0.0000, 4.5000, 0.0000],
            [1.0000, 0.0000, 2.0000]], dtype=torch.float64)
    """

    def __init__(
        self, gram: Tensor, total: Tensor, count: Tensor, nonfinite: Tensor, updates: Tensor | None = None,
        summed: Tensor | None = None,
    ) -> None:
        self._gram = gram  # upper triangle valid; lower triangle valid only while _mirrored
        self._mirrored = True
        self._held: list[Tensor] | None = None  # rows not yet summed into the Gram, one tensor a batch
        self._held_rows: Tensor | None = None  # all of them in one tensor, once read
        self._diagonal: Tensor | None = None  # of the held rows' Gram, in float64, once read
        self._total = total
        self._order: Tensor | None = None  # where each weight-order entry is stored (None: in place)
        self.count, self.nonfinite = count, nonfinite
        self.updates = updates if updates is not None else (count > 0).to(torch.int64)
        self.summed = summed if summed is not None else count.clone()
        self.rows_reason = "all"  # why ``summed`` is that many rows; set by the collector (see LayerRank)
        self.settled_at: int | None = None  # rows summed when the spectrum settled, if it did

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype, device: torch.device, hold_rows: bool = False) -> InputStatistics:
        """Empty sums; ``hold_rows`` holds the first rows (fewer than ``HOLD_ROWS * dim``) instead of their Gram."""
        # Created outside inference mode so that they can be updated in place anywhere later.
        with torch.inference_mode(False):
            stats = cls(
                gram=torch.zeros(dim, dim, dtype=dtype, device=device) if not hold_rows else
                torch.zeros(dim, 0, dtype=dtype, device=device),
                total=torch.zeros(dim, dtype=dtype, device=device),
                count=torch.zeros((), dtype=torch.int64, device=device),
                nonfinite=torch.zeros((), dtype=torch.int64, device=device),
                updates=torch.zeros((), dtype=torch.int64, device=device),
                summed=torch.zeros((), dtype=torch.int64, device=device),
            )
        if hold_rows:
            stats._held = []
        return stats

    @property
    def gram(self) -> Tensor:
        """``sum x x^T`` as the full symmetric ``(dim, dim)`` matrix."""
        self._sum_held()
        self._store_in(None)
        self._mirror()
        return self._gram

    @property
    def holds_rows(self) -> bool:
        """Whether the rows themselves are held (fewer than ``HOLD_ROWS * dim`` added)."""
        return self._held is not None

    @property
    def rows(self) -> Tensor | None:
        """The rows added so far as ``(summed, dim)`` in the weight's order while held, else None; read, never change."""
        if self._held is None:
            return None
        self._store_in(None)
        if self._held_rows is None:  # one copy, its batches kept as views for summing them as updates would
            with torch.inference_mode(False):
                self._held_rows = torch.cat(self._held) if self._held else self._total.new_zeros(0, self.dim)
                self._held = list(self._held_rows.split([len(rows) for rows in self._held]))
        return self._held_rows

    def diagonal(self) -> Tensor:
        """The diagonal of :attr:`gram` (``sum x_i^2``); from held rows, in float64 without summing them into the Gram
        (as exact as the small Gram their spectrum comes from)."""
        if self._held is None:
            return self.gram.diagonal()
        if self._diagonal is None:
            self._diagonal = self.rows.double().square().sum(dim=0)
        return self._diagonal

    def _sum_held(self) -> None:
        """Sum the held rows into the Gram matrix, one update a batch, and hold no more."""
        if self._held is None:
            return
        held, self._held, self._held_rows = self._held, None, None
        with torch.inference_mode(False):
            self._gram = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self._total.device)
        with full_precision_matmul():
            for rows in held:
                symmetric_gram_update_(self._gram, rows)
        self._mirrored = False

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
        if self._held is not None:
            with torch.inference_mode(False):
                if self._order is not None:
                    self._held, self._total = [r[:, self._order] for r in self._held], self._total[self._order]
                if order is not None:
                    inverse = torch.argsort(order)
                    self._held, self._total = [r[:, inverse] for r in self._held], self._total[inverse]
            self._order, self._held_rows = order, None
            return
        self._mirror()
        with torch.inference_mode(False):  # new state tensors must stay updatable outside inference mode
            if self._order is not None:  # back to the weight's order
                self._gram, self._total = self._gram[self._order][:, self._order], self._total[self._order]
            if order is not None:
                inverse = torch.argsort(order)
                self._gram, self._total = self._gram[inverse][:, inverse], self._total[inverse]
        self._order = order

    def eigenvalues(self) -> Tensor:
        """Eigenvalues (ascending) of the running ``sum x x^T`` in its own dtype, in whatever order the sums are
        stored (a permutation leaves them as they are); for a stopping test, not for a reported rank."""
        self._sum_held()
        return torch.linalg.eigvalsh(self._gram, UPLO="U")

    @property
    def dim(self) -> int:
        return self._total.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: the sums, or the rows held in place of the Gram."""
        held = sum(rows.nbytes for rows in self._held) if self._held is not None else self._gram.nbytes
        return held + self._total.nbytes

    @property
    def dtype(self) -> torch.dtype:
        return self._total.dtype

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The state tensors as stored, in the weight's order (the Gram matrix's upper triangle is the valid part)."""
        self._sum_held()
        self._store_in(None)
        return self._gram, self._total, self.count, self.nonfinite, self.updates, self.summed

    def all_reduce_(self, reduce: Callable[[Tensor], Any]) -> None:
        """Sum the state over processes in place with ``reduce`` (an in-place sum such as ``dist.all_reduce``)."""
        for tensor in self.tensors():
            reduce(tensor)
        self._mirrored = False  # the lower triangles of the ranks may differ: mirror again from the upper

    def to(self, device: torch.device | str) -> InputStatistics:
        """A copy on ``device`` (held rows summed into the Gram)."""
        state = (self.gram, self.total, self.count, self.nonfinite, self.updates, self.summed)
        moved = InputStatistics(*(t.to(device, copy=True) for t in state))
        moved.rows_reason, moved.settled_at = self.rows_reason, self.settled_at
        return moved

    def update(self, rows: Tensor, order: Tensor | None = None, weight: float = 1.0) -> None:
        """Add ``rows`` of shape ``(N, dim)``, upcast to the statistics' dtype; non-finite rows are dropped.

        ``order``: where each entry of the weight's order lies in a row (``None``: in place). ``weight``: how many
        rows of the data each row stands for, when rows were kept from 1 in ``weight`` (the count then grows
        by the rows they stand for, ``summed`` by the rows added)."""
        self._store_in(order)
        rows = rows.to(self.dtype)
        if self._held is not None and weight == 1 and int(self.summed) + rows.shape[0] < HOLD_ROWS * self.dim:
            self._hold(rows)
            return
        self._sum_held()
        if rows.device.type == "cpu":
            # A NaN or Inf anywhere makes the sum of the column sums non-finite: one cheap check, no copy of the
            # rows (a sum that only overflows sends the batch down the exact path, which then drops nothing).
            column_sums, kept = rows.sum(dim=0), rows.shape[0]
            if not math.isfinite(float(column_sums.sum())):
                rows, kept = self._finite_rows(rows, weight=weight)
                column_sums = rows.sum(dim=0)
        else:  # on an accelerator that check would wait for the device every batch: mask the rows instead
            rows, kept = self._finite_rows(rows, masked=True, weight=weight)
            column_sums = rows.sum(dim=0)
        with full_precision_matmul():  # a TF32/bf16 Gram would silently change the ranks
            symmetric_gram_update_(self._gram, rows, alpha=weight)
        self._mirrored = False
        self._total.add_(column_sums, alpha=weight)
        self.count.add_(_stand_for(kept, weight))
        self.summed.add_(kept)
        self.updates.add_(1)

    def _hold(self, rows: Tensor) -> None:
        """Keep a copy of the finite ``rows`` (few rows: dropping NaN/Inf rows exactly costs little anywhere)."""
        column_sums, kept = rows.sum(dim=0), rows.shape[0]
        if not math.isfinite(float(column_sums.sum())):  # one cheap check, as in update
            rows, kept = self._finite_rows(rows)
            column_sums = rows.sum(dim=0)
        with torch.inference_mode(False):  # held past the validation that made them
            self._held.append(rows.clone())
        self._held_rows = None
        self._diagonal = None
        self._total.add_(column_sums)
        self.count.add_(kept)
        self.summed.add_(kept)
        self.updates.add_(1)

    def _finite_rows(self, rows: Tensor, masked: bool = False, weight: float = 1.0) -> tuple[Tensor, Tensor | int]:
        """``rows`` without those holding NaN or Inf (counted in ``nonfinite`` as the rows of the data they stand for,
        ``weight`` each), and how many are kept. ``masked`` zeroes them in place of dropping, so that no count leaves
        the device."""
        finite = torch.isfinite(rows).all(dim=1)
        dropped = (~finite).sum()
        self.nonfinite.add_(_stand_for(dropped, weight))
        if masked:
            return torch.where(finite[:, None], rows, 0), rows.shape[0] - dropped
        rows = rows[finite]
        return rows, rows.shape[0]

    def empty_reason(self) -> str | None:
        """Why these sums hold no row (a layer with none is skipped, never reported as rank 0), or None."""
        if int(self.count) > 0:
            return None
        if int(self.nonfinite) > 0:
            return f"every row of its input held NaN or Inf ({int(self.nonfinite)} rows dropped)"
        return "no row of its input was counted: every input it got was empty (zero rows, or every row masked out)"

    def roundoff(self) -> float:
        """``u`` with ``|error of C_ij| <= u * sqrt(C_ii C_jj)`` for the second moment of these sums
        (see :func:`sum_roundoff`)."""
        return sum_roundoff(self.dtype, int(self.summed), int(self.updates))

    def mean(self) -> Tensor:
        """``E[x]`` in float64 (zeros when no row was seen)."""
        return self.total.double() / self.count.clamp(min=1).double()

    def second_moment(self, centered: bool = False, dtype: torch.dtype = torch.float64) -> Tensor:
        """``C = sum x x^T / n`` in ``dtype`` (float64 by default), or the covariance ``C - mu mu^T`` when ``centered``.
        From held rows, their Gram is formed in float64, exactly (as their spectra are), and they stay held."""
        # Centered, the subtraction cancels; from float64 sums, dividing first keeps one rounding and float32's range.
        held = self.rows.double() if self._held is not None else None
        compute = torch.float64 if centered or self.dtype == torch.float64 or held is not None else dtype
        gram = self.gram if held is None else held.t() @ held
        moment = gram.to(compute)
        count = self.count.clamp(min=1).to(compute)
        moment = moment.div_(count) if moment is not gram else moment / count  # one pass over d x d, not two
        if centered:
            mu = self.mean()
            moment = moment.sub_(torch.outer(mu, mu))
        return moment.to(dtype)


def _stand_for(rows: Tensor | int, weight: float) -> Tensor | int:
    """How many rows of the data ``rows`` rows kept from 1 in ``weight`` stand for (on the rows' device if a tensor)."""
    return rows if weight == 1 else torch.as_tensor(rows * weight).round().long()


@dataclass
class ActivationStatistics:
    """What ``collect`` returns: input statistics per layer, plus the layers that were skipped.

    ``inputs`` is keyed by the first layer that saw each distinct input; ``sources`` maps every
    analyzed layer to that key, so layers sharing an input share one :class:`InputStatistics`.

    >>> import torch, lightning_rank as lr
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> stats = lr.collect(model, torch.randn(96, 8).split(32), max_rows_per_batch=None)
    >>> stats.layers, stats.skipped, stats["0"].dim, int(stats["0"].count)
    (['0', '2'], {}, 8, 96)

    ``calibration``: the first few batches ``collect`` ran (copies, on the devices they came on; empty for the
    statistics of a callback, which keeps its own), with ``forward``, the function it ran them with (None: the
    default). A budget in :func:`~lightning_rank.factorize_` is shared out by the model's own output on them
    unless its ``calibration=`` says otherwise. They are per process, never summed, and never saved in a report.
    """

    inputs: dict[str, InputStatistics] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unmasked: list[str] = field(default_factory=list)
    calibration: list[Any] = field(default_factory=list, repr=False, compare=False)
    forward: Callable[[Any, Any], Any] | None = field(default=None, repr=False, compare=False)

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
        return first.total.device if first is not None else None

    def all_reduce_(self, reduce: Callable[[Tensor], Any]) -> ActivationStatistics:
        """Sum every statistic over processes in place; ``reduce`` is an in-place sum (e.g. ``dist.all_reduce``)."""
        for stats in self.inputs.values():
            stats.all_reduce_(reduce)
        return self

    def to(self, device: torch.device | str) -> ActivationStatistics:
        """A copy with every tensor on ``device``, the kept ``calibration`` batches' included (so that a model moved
        to ``device`` runs on them)."""
        moved = {key: stats.to(device) for key, stats in self.inputs.items()}
        batches = [map_tensors(batch, lambda t: t.to(device, copy=True)) for batch in self.calibration]
        return ActivationStatistics(moved, dict(self.sources), dict(self.skipped), list(self.unmasked), batches,
                                    self.forward)


def map_tensors(data: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``data`` with ``fn`` applied to every tensor inside Mappings, lists and tuples (named ones included);
    any other object is kept as it is."""
    if isinstance(data, Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        items = {key: map_tensors(value, fn) for key, value in data.items()}
        try:
            return type(data)(items)  # dict, OrderedDict, Hugging Face's BatchEncoding
        except (TypeError, ValueError):  # e.g. a defaultdict
            return items
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(map_tensors(value, fn) for value in data))
    if isinstance(data, (tuple, list)):
        return type(data)(map_tensors(value, fn) for value in data)
    return data
