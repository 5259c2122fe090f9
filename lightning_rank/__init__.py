"""lightning-rank: how much of its available space each layer of a network really uses.

Measure utilized ranks with :func:`collect` and :func:`analyze`, watch them during training with the
:class:`RankMonitor` callback, and shrink the network to them with :func:`factorize_` or the
:class:`RankCompression` callback.
"""

from lightning_rank.analysis import analyze
from lightning_rank.report import LayerRank, RankReport
from lightning_rank.statistics import ActivationStatistics, InputStatistics, StatisticsCollector, collect

__all__ = [
    "ActivationStatistics",
    "InputStatistics",
    "LayerRank",
    "RankReport",
    "StatisticsCollector",
    "analyze",
    "collect",
]
__version__ = "0.1.0"
