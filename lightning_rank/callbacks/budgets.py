"""The time ``RankMonitor`` may take: when its figures are drawn, and when its own cost is worth a warning."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

FIGURE_SECONDS = 0.01  # about what drawing and encoding one figure takes on a CPU core, before one was timed
COST_WARNING_SHARE = 0.25  # warn (once a fit) when the monitor took more than this share of the time it covers


class FigureBudget:
    """Figures are due when their last drawing took at most ``share`` of the time since it ended (before the first:
    :data:`FIGURE_SECONDS` a figure, against the time since :meth:`restart`); ``share=None``: always. ``clock``
    gives seconds."""

    def __init__(self, share: float | None, clock: Callable[[], float]) -> None:
        self.share, self.clock = share, clock
        self.seconds: float | None = None  # how long the last drawing took
        self.drawn_at = 0.0  # when the figures were last drawn, or the run started

    def restart(self) -> None:
        """A run starts: the time the figures may take counts from now."""
        self.drawn_at = self.clock()

    def due(self, figures: int) -> bool:
        """Whether drawing ``figures`` figures now keeps them within the budget."""
        if self.share is None:
            return True
        seconds = self.seconds if self.seconds is not None else FIGURE_SECONDS * figures
        return seconds <= self.share * (self.clock() - self.drawn_at)

    @contextlib.contextmanager
    def drawing(self) -> Iterator[None]:
        """Time the drawing done inside the block."""
        start = self.clock()
        yield
        self.drawn_at = self.clock()
        self.seconds = self.drawn_at - start


class CostWatch:
    """Says, once a run, when an analyzed epoch's ``seconds`` took more than ``share`` of the time since the previous
    one (or :meth:`restart`)."""

    def __init__(self, clock: Callable[[], float], share: float = COST_WARNING_SHARE) -> None:
        self.clock, self.share = clock, share
        self.since, self.warned = 0.0, False

    def restart(self) -> None:
        """A run starts: the monitor's cost is weighed against the time from now, and it may warn again."""
        self.since, self.warned = self.clock(), False

    def weigh(self, seconds: dict[str, float]) -> str | None:
        """The warning, the first time ``seconds`` exceed the share of the time since the last weighing; else None."""
        now = self.clock()
        elapsed, self.since = now - self.since, now
        spent = sum(seconds.values())
        if self.warned or elapsed <= 0 or spent <= self.share * elapsed:
            return None
        self.warned = True
        parts = ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items())
        return (
            f"RankMonitor took {spent:.2f} s of the last {elapsed:.2f} s of this fit ({spent / elapsed:.0%}): {parts}. "
            "Counting rows of layer inputs costs about fan_in^2 per row (each layer's `rows` is in the report). "
            "To lower it: `every_n_epochs=n` analyzes every n-th epoch only, `max_rows_per_batch` (an int) counts "
            "fewer rows a batch, `target_modules`/`exclude_modules` observe fewer layers, `tensorboard=False` skips "
            "the views. Each analyzed epoch's cost is in `monitor.history[i]['seconds']`."
        )
