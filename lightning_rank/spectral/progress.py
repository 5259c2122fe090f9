"""Progress of long analyses and factorizations: a tqdm bar on stderr that shows only after a few seconds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

DELAY_SECONDS = 2.0  # quicker runs print nothing


@contextlib.contextmanager
def progress_bar(what: str, enabled: bool, total: int | None = None, unit: str = "eigenproblem") -> Iterator[Any]:
    """A bar ``lightning_rank: <what>`` that appears once the work has taken ``DELAY_SECONDS``; a silent
    stand-in when ``enabled`` is False. It is closed (and cleared) when the block ends."""
    bar = tqdm(total=total, desc=f"lightning_rank: {what}", unit=unit, delay=DELAY_SECONDS, disable=not enabled,
               leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
