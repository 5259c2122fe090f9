"""When a layer's spectrum has settled, so that counting more of its rows would not move its ranks.

Under the row policy ``"auto"`` the running sums of each input are checked as rows arrive: at
``max(SETTLE_FIRST_ROWS, SETTLE_ROWS_PER_FEATURE * dim)`` rows, then each time the rows have doubled. A check
takes the energy ranks of the running moment at ``SETTLE_THRESHOLDS`` (one float32 ``eigvalsh``). Energy ranks
of a sample moment creep up towards their limit about as ``1/n``, so what doubling the rows still added is
about what all further rows would add: once doubling moved no rank at all, the input has settled. A check costs
about what summing ``3 * dim`` rows costs on a CPU, so checks start at 16 rows a feature and are made only while
the batches still to come hold at least half as many of the input's rows as it has (twice as many before its first
check, so that a second can follow): a short validation is never checked, and an input that never settles pays for
two or three checks (an iterable of unknown length is checked at every doubling). Under the budget of ``64 * dim``
rows an input can settle at 32 rows a feature at the earliest, which saves at most three eighths of its rows; more
where the budget does not bind (an unsized iterable's per-batch cap). Inputs summed over several processes (see
:mod:`~lightning_rank.stats.ownership`) are not checked.

A settled input still sees the rest of the data, from 1 row in ``THIN`` of what the policy would have kept,
each row weighing what the rows it stands for would have weighed. So the sums stay an estimate of the whole
data's moment, not of its first batches (a validation set in class order would otherwise be judged by its
first classes). Thinner than 1 in 4, the few rows left add their own small-sample spread, which lowers
energy ranks: 1 in 16 cost an untrained digits CNN 3 ranks of its 144-wide layer against every row, 1 in 4
one (``benchmarks/monitor_overhead.py`` holds the policy to exact statistics on trained models).
"""

from __future__ import annotations

import math

import torch

from lightning_rank.stats.sums import InputStatistics

SETTLE_FIRST_ROWS = 1024
SETTLE_ROWS_PER_FEATURE = 16
SETTLE_THRESHOLDS = (0.9, 0.99, 0.999)
SETTLE_TOLERANCE = 0
THIN = 4
ROWS_REASONS = ("all", "cap", "budget", "settled")  # why a layer has the rows it has (LayerRank.rows_reason)


def energy_ranks(stats: InputStatistics, thresholds: tuple[float, ...] = SETTLE_THRESHOLDS) -> list[int] | None:
    """The energy ranks of the running ``sum x x^T`` at ``thresholds``, from eigenvalues in the sums' dtype (a stopping
    test, not a reported rank: those are certified by the analysis); None where the sums overflowed or the solver
    failed (such sums never settle, and the analysis says what went wrong)."""
    try:
        values = stats.eigenvalues()
    except (torch.linalg.LinAlgError, RuntimeError):
        return None
    if not bool(torch.isfinite(values).all()):
        return None
    values = values.double().clamp(min=0).flip(0)
    energy = values.cumsum(0)
    total = float(energy[-1]) if energy.numel() else 0.0
    if total <= 0:
        return [0 for _ in thresholds]
    return [int(torch.searchsorted(energy, t * total)) + 1 for t in thresholds]


class Settling:
    """Which inputs have settled, and how many rows each had summed when it did (``settled_at``)."""

    def __init__(self) -> None:
        self.settled_at: dict[str, int] = {}
        self._rows: dict[str, int] = {}
        self._next: dict[str, float] = {}
        self._ranks: dict[str, list[int]] = {}

    def keep(self, key: str, limit: int) -> tuple[int, float]:
        """How many of the ``limit`` rows the policy keeps of a batch of ``key`` are summed, and the weight of each
        (the rows kept stand for all ``limit``)."""
        if key not in self.settled_at or limit <= 1:
            return limit, 1.0
        kept = math.ceil(limit / THIN)
        return kept, limit / kept

    def observe(self, key: str, stats: InputStatistics, rows: int, batches: int | None, done: int) -> None:
        """Count ``rows`` just summed into ``stats`` during batch ``done`` (from 0) of ``batches`` (None: unknown)
        and, at a checkpoint, test whether ``key`` has settled."""
        if key in self.settled_at:
            return
        batches_left = batches - done - 1 if batches else None
        self._rows[key] = self._rows.get(key, 0) + rows
        checkpoint = self._next.setdefault(key, max(SETTLE_FIRST_ROWS, SETTLE_ROWS_PER_FEATURE * stats.dim))
        last = self._ranks.get(key)
        ahead = self._rows[key] * (0.5 if last is not None else 2)
        if self._rows[key] < checkpoint or (batches_left is not None and batches_left * rows < ahead):
            return
        ranks = energy_ranks(stats)
        if ranks is None:
            self._next[key] = math.inf
            return
        if last is not None and all(abs(a - b) <= SETTLE_TOLERANCE for a, b in zip(ranks, last)):
            self.settled_at[key] = self._rows[key]
            return
        self._ranks[key] = ranks
        self._next[key] = 2 * self._rows[key]
