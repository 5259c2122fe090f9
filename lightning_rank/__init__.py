"""lightning-rank: how much of its available space each layer of a network really uses.

Measure utilized ranks with :func:`collect` and :func:`analyze`, watch them during training with the
:class:`RankMonitor` callback, and shrink the network to them with :func:`factorize_` or the
:class:`RankCompression` callback.
"""

from lightning_rank.callbacks.compression import RankCompression
from lightning_rank.callbacks.distillation import distillation_loss
from lightning_rank.callbacks.monitor import RankMonitor
from lightning_rank.compress.factorize import FactorizationPlan, factorize_, plan_factorization
from lightning_rank.compress.layers import LowRankConv1d, LowRankConv2d, LowRankLinear
from lightning_rank.compress.loading import FactorizedCheckpointMixin, load_factorized
from lightning_rank.compress.results import FactorizationResult, LayerFactorization
from lightning_rank.spectral.analysis import analyze
from lightning_rank.spectral.report import LayerRank, RankReport
from lightning_rank.stats.collect import collect
from lightning_rank.stats.collector import StatisticsCollector
from lightning_rank.stats.sums import ActivationStatistics, InputStatistics

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
    "distillation_loss",
    "factorize_",
    "load_factorized",
    "plan_factorization",
]
__version__ = "0.1.0"
