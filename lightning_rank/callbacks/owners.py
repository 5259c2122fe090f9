"""One validation's statistics over several processes: each layer's sums end on the process that analyzes it,
and the reports of the processes are gathered, so that every process ends with the same report.

The processes first agree, from a few integers per layer, on which accumulators exist (a layer may be reached on
some processes only; accumulators are made lazily and keyed by the first layer that saw an input), on which
layers were pooled (:class:`~lightning_rank.stats.ownership.ProcessShare`) and on what each held. A pooled
input is then summed to its owner (``reduce``), or to every process when there are no owners (``all_reduce``);
an input its owner counted alone stays where it is. Plain ``torch.distributed`` collectives, in the same order
on every process.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_rank.callbacks.sharded import full_weights
from lightning_rank.compress.sharing import PlanOwners
from lightning_rank.spectral.analysis import UnanalyzableError, decompose, skipped_layer
from lightning_rank.spectral.report import RankReport
from lightning_rank.stats.collector import ELSEWHERE, UNREACHED, StatisticsCollector
from lightning_rank.stats.ownership import ProcessShare
from lightning_rank.stats.rows import RowPolicy
from lightning_rank.stats.settling import ROWS_REASONS
from lightning_rank.stats.sums import ActivationStatistics, InputStatistics
from lightning_rank.targets import layer_shape

ONLY_ELSEWHERE = (
    "reached only on processes that do not own it, which leave it to its owner under the row budget 'auto': count "
    "every row (`max_rows_per_batch=None`) to sum it over processes"
)


@dataclass
class SharedStatistics:
    """The statistics this process analyzes (``stats``), which process analyzes each layer (``analyzer``), whether
    each layer's rows were summed over processes (``pooled``) and the bytes each process held (``nbytes``)."""

    stats: ActivationStatistics
    analyzer: dict[str, int]
    pooled: dict[str, bool]
    nbytes: list[int]
    sources: dict[str, str] = field(default_factory=dict)  # every analyzed layer's input key, on every process

    def planning_view(self) -> ActivationStatistics:
        """What :func:`~lightning_rank.plan_factorization` with owners takes: every layer's name, this process's sums."""
        return ActivationStatistics(self.stats.inputs, dict(self.sources), dict(self.stats.skipped),
                                    list(self.stats.unmasked))


class PooledShare(ProcessShare):
    """Owners that hold the sum over every process's rows: every layer is counted on every process (under the row
    policy, which for ``RankCompression`` counts every row by default) and summed to its owner."""

    def pooled(self, policy: RowPolicy, fan_in: int, rows: int, batches: int | None) -> bool:
        return True


def reduce_to_owners(
    collector: StatisticsCollector, stats: ActivationStatistics, share: ProcessShare, device: torch.device
) -> SharedStatistics:
    """``stats`` (this process's, from ``collector``) summed to the processes that analyze them (see module doc)."""
    names = list(collector.targets)
    index = {name: i for i, name in enumerate(names)}
    # per layer: key, diverged, pooled, why its rows (ROWS_REASONS); and each process's bytes
    codes = torch.full((4, len(names) + 1), -1, dtype=torch.int64, device=device)
    for i, name in enumerate(names):
        if name in stats.sources:
            codes[0, i] = index[stats.sources[name]]
            codes[3, i] = ROWS_REASONS.index(stats[name].rows_reason)
        codes[1, i] = int(stats.skipped.get(name, UNREACHED) not in (UNREACHED, ELSEWHERE))
        codes[2, i] = int(collector.pooled[name]) if name in collector.pooled else -1
    codes[0, -1] = collector.nbytes
    parts = [torch.empty_like(codes) for _ in range(share.world_size)]
    dist.all_gather(parts, codes)
    gathered = torch.stack(parts).cpu()
    keys, diverged, pooled_codes = gathered[:, 0, :-1], gathered[:, 1, :-1].amax(dim=0) > 0, gathered[:, 2, :-1]

    skipped = {name: reason for name, reason in stats.skipped.items() if name not in index}  # unobservable layers
    sources: dict[str, str] = {}
    pool_of: dict[str, bool] = {}  # the owner's decision where it reached the layer, else any process's
    for i, name in enumerate(names):
        owner = share.owners.get(name) if share.owners else None
        owner_decided = owner is not None and pooled_codes[owner, i] >= 0
        pool_of[name] = bool((pooled_codes[owner, i] if owner_decided else pooled_codes[:, i].amax()) > 0)
    short = [name for i, name in enumerate(names) if pool_of[name] and bool((pooled_codes[:, i] == 0).any())]
    if short and share.rank == 0:
        warnings.warn(
            f"Layers {short} were summed over processes, but some processes left them to their owner: their first "
            "validation batches held different numbers of rows, so they decided differently, and those processes' "
            "rows are missing from these layers' statistics (fewer rows, still an unbiased sample). Give every process "
            "batches of one shape, or count every row (`max_rows_per_batch=None`).",
            stacklevel=2,
        )
    for i, name in enumerate(names):
        owner, pool = share.owners.get(name) if share.owners else None, pool_of[name]
        counted = keys[:, i] if pool or owner is None else keys[owner : owner + 1, i]
        reached = counted >= 0
        local = stats.skipped.get(name)
        if diverged[i]:
            skipped[name] = local if local not in (None, UNREACHED, ELSEWHERE) else (
                "its input was shared with other layers differently on another process")
        elif not reached.any():
            skipped[name] = ONLY_ELSEWHERE if bool((pooled_codes[:, i] >= 0).any()) else UNREACHED
        elif counted.amax() != torch.where(reached, counted, len(names)).amin():
            skipped[name] = "its input was shared with other layers on some processes but not on others"
        else:
            sources[name] = names[int(counted.amax())]
    pooled = {name: pool_of[key] for name, key in sources.items()}

    def analyzer_of(key: str) -> int:
        return share.owners[key] if share.owners else share.rank

    inputs: dict[str, InputStatistics] = {}
    for key in dict.fromkeys(sources.values()):
        destination = analyzer_of(key)
        local_stats = stats.inputs.get(key)
        if pool_of[key]:
            if local_stats is None:
                local_stats = InputStatistics.zeros(layer_shape(collector.targets[key])[1], collector.dtype, device)
            if share.owners:
                local_stats.all_reduce_(lambda tensor, dst=destination: dist.reduce(tensor, dst=dst))
            else:
                local_stats.all_reduce_(dist.all_reduce)
        if destination == share.rank:
            inputs[key] = local_stats
            if pool_of[key]:  # the rows of every process: cut by the policy if any process's were
                local_stats.rows_reason = ROWS_REASONS[int(gathered[:, 3, index[key]].amax().clamp(min=0))]
    here = {name: key for name, key in sources.items() if key in inputs}
    analyzed_here = ActivationStatistics(inputs, here, skipped, [n for n in stats.unmasked if n in here])
    analyzer = {name: analyzer_of(key) for name, key in sources.items()}
    return SharedStatistics(analyzed_here, analyzer, pooled, [int(n) for n in gathered[:, 0, -1]], sources)


def analyze_shared(
    model: nn.Module, shared: SharedStatistics, share: ProcessShare | None, order: list[str], **options
) -> RankReport:
    """The report of every layer, each analyzed by the process holding its statistics, gathered on every process
    (``share``: this process among several; ``None`` with one process). ``options``: those of
    :func:`~lightning_rank.spectral.analysis.decompose`.

    Sharded (FSDP2) weights are gathered one layer at a time; the process analyzing a layer keeps its full weight
    for the analysis. Raises :class:`~lightning_rank.spectral.analysis.UnanalyzableError` on every process when
    any process could not analyze a layer, and a ``RuntimeError`` naming the process when one failed otherwise
    (so none waits for the others). ``order``: the layers in model order.
    """
    if share is None:
        with full_weights(model, [name for name in order if name in shared.analyzer], keep=shared.analyzer):
            return decompose(model, shared.stats, **options).report
    mine = {name for name, rank in shared.analyzer.items() if rank == share.rank}
    part: RankReport | None = None
    reasons: dict[str, str] = {}
    failure: Exception | None = None
    with full_weights(model, [name for name in order if name in shared.analyzer], keep=mine):
        try:
            if shared.stats.sources:
                part = decompose(model, shared.stats, **options).report
        except UnanalyzableError as error:
            reasons = error.reasons
        except Exception as error:  # told to the others before raising, or they would wait in the gather
            failure = error
    payload = {"reasons": reasons, "failure": None if failure is None else repr(failure),
               "layers": {} if part is None else part.layers,
               "spectra": {} if part is None else {n: (a.cpu(), b.cpu()) for n, (a, b) in part.spectra.items()}}
    parts = gather_objects(payload)
    if failure is not None:
        raise failure
    failed = {rank: p["failure"] for rank, p in enumerate(parts) if p["failure"] is not None}
    if failed:
        raise RuntimeError(f"the rank analysis failed on process(es) {failed}")
    reasons = {name: reason for p in parts for name, reason in p["reasons"].items()}
    if reasons:
        raise UnanalyzableError(reasons)
    layers = {name: layer for p in parts for name, layer in p["layers"].items()}
    layers.update((name, skipped_layer(model, name, reason)) for name, reason in shared.stats.skipped.items()
                  if name not in layers)
    analyzed = [name for name in order if name in layers and layers[name].analyzed]
    ordered = {name: dataclasses.replace(layers[name], pooled=shared.pooled[name]) for name in analyzed}
    ordered.update((name, layer) for name, layer in layers.items() if name not in ordered)
    spectra = {name: s for p in parts for name, s in p["spectra"].items()}
    return RankReport(threshold=options.get("threshold", 0.99), layers=ordered,
                      centered=options.get("centered", False), spectra={name: spectra[name] for name in analyzed})


def plan_owners(model: nn.Module, shared: SharedStatistics, rank: int, device: torch.device) -> PlanOwners:
    """:class:`~lightning_rank.compress.sharing.PlanOwners` over the default process group: each layer planned where
    its sums are (``shared.analyzer``); tensors sent from ``device`` (the strategy's root device: under NCCL a CPU
    tensor is moved there and back); ``model``'s sharded (FSDP2) weights gathered by :func:`full_weights`."""

    def broadcast(tensor: torch.Tensor, src: int) -> None:
        moved = tensor if tensor.device == device else tensor.to(device)
        dist.broadcast(moved, src=src)
        if moved is not tensor:
            tensor.copy_(moved)

    return PlanOwners(rank, dict(shared.analyzer), broadcast, gather_objects, device,
                      functools.partial(full_weights, model))


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable and small), in rank order, on every process."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts
