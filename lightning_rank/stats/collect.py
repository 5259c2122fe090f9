"""``collect``: run a model over batches and return the input statistics of its layers."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightning_rank.checks import MaskFn
from lightning_rank.stats.collector import StatisticsCollector
from lightning_rank.stats.rows import RowPolicy
from lightning_rank.stats.sums import ActivationStatistics, map_tensors
from lightning_rank.targets import ModuleSelector

ForwardFn = Callable[[nn.Module, Any], Any]

# The batches kept to share out a budget by the model's own output (and to count multiply-adds): ``collect`` keeps its
# first ones on the statistics, ``RankCompression`` the first validation batches of the epoch it plans from.
CALIBRATION_BATCHES = 4


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; every module's own training flag is put back after, even on error."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a Mapping, ``model(batch[0])`` for a tuple or list, ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def collect(model: nn.Module, batches: Iterable[Any], *, forward: ForwardFn | None = None,
            target_modules: ModuleSelector = None, exclude_modules: ModuleSelector = None, mask_fn: MaskFn | None = None,
            max_rows_per_batch: RowPolicy = "auto", dtype: torch.dtype = torch.float32, seed: int = 0,
            calibration_batches: int = CALIBRATION_BATCHES) -> ActivationStatistics:
    """Run ``model`` over ``batches`` in eval mode without gradients and stream each layer's input statistics.

    No activation is stored: each input adds to ``sum x x^T``, ``sum x`` and ``n`` on its own device.
    Hooks are removed and every module's training flag is restored, even when the forward raises.

    ``max_rows_per_batch`` is the row policy: ``"auto"`` (default) counts about ``max(4096, 64 * fan_in)``
    uniformly drawn rows of each input in all when ``batches`` has a length (the same fraction of every
    batch, sized on the first; at most ``max(512, 8 * fan_in)`` a batch when it has none), enough for
    ranks within +-1 of exact statistics at a fraction of the cost; an int counts at most that many a
    batch; ``None`` counts every row (exact statistics). ``seed`` seeds the draws. Each layer's rows
    counted are in its report's ``rows``.

    The first ``calibration_batches`` batches (4, as ``RankCompression`` keeps; 0 keeps none) are kept on the
    result as ``stats.calibration``, with ``forward``: :func:`~lightning_rank.factorize_` shares out a budget by
    the model's own output on them. They are detached copies (so changing or freeing the originals does not
    change them) on the devices the batches came on, the only memory the result holds beyond the sums: a few
    batches, not the data.

    >>> import torch, lightning_rank as lr
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> stats = lr.collect(model, (torch.randn(64, 16) for _ in range(10)))  # any iterable, a generator too
    >>> stats.layers, stats["0"].dim, len(stats.calibration)
    (['0', '2'], 16, 4)
    """
    if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 0:
        raise ValueError(f"`calibration_batches` must be an int >= 0, got {calibration_batches!r}")
    try:
        count = len(batches)  # type: ignore[arg-type]
    except TypeError:  # a generator, or a DataLoader over an iterable dataset
        count = None
    collector = StatisticsCollector(model, target_modules=target_modules, exclude_modules=exclude_modules, mask_fn=mask_fn,
                                    max_rows_per_batch=max_rows_per_batch, dtype=dtype, seed=seed, batches=count)
    run = forward or default_forward
    kept: list[Any] = []
    with eval_mode(model), collector.attached(), torch.no_grad():
        for batch in batches:
            if len(kept) < calibration_batches:
                kept.append(_copy(batch))
            with collector.observe(batch):
                run(model, batch)
    if collector.batches == 0:
        raise ValueError("`batches` yielded no batch: pass an iterable with at least one batch")
    stats = collector.compute()
    stats.calibration, stats.forward = kept, forward
    warn_about_rows(stats)
    return stats


def _copy(batch: Any) -> Any:
    """A copy of ``batch`` whose tensors are detached, made outside inference mode: the probe's backward passes
    (which share out a budget) may use it, even when ``collect`` ran inside ``torch.inference_mode``."""
    with torch.inference_mode(False):
        return map_tensors(batch, lambda t: t.detach().clone())


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
