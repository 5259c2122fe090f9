"""lightning-rank: how much of its available space each layer of a network really uses.

Measure utilized ranks with :func:`collect` and :func:`analyze`, watch them during training with the
:class:`RankMonitor` callback, and shrink the network to them with :func:`factorize_` or the
:class:`RankCompression` callback.
"""

from lightning_rank.analysis import analyze
from lightning_rank.compression import RankCompression
from lightning_rank.factorize import (
    FactorizationPlan,
    FactorizationResult,
    LayerFactorization,
    factorize_,
    load_factorized,
    plan_factorization,
)
from lightning_rank.layers import LowRankConv1d, LowRankConv2d, LowRankLinear
from lightning_rank.monitor import RankMonitor
from lightning_rank.report import LayerRank, RankReport
from lightning_rank.statistics import ActivationStatistics, InputStatistics, StatisticsCollector, collect
from lightning_rank.structure import FactorizedCheckpointMixin

__all__ = [
    "ActivationStatistics",
    "FactorizationPlan",
    "FactorizationResult",
    "FactorizedCheckpointMixin",
    "InputStatistics",
    "LayerFactorization",
    "LayerRank",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "RankCompression",
    "RankMonitor",
    "RankReport",
    "StatisticsCollector",
    "analyze",
    "collect",
    "factorize_",
    "load_factorized",
    "plan_factorization",
]
__version__ = "0.1.0"
