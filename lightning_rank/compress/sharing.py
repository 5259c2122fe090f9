"""Planning split over processes: each layer is decomposed and factorized by the one process that holds its statistics.

Under several processes (DDP, FSDP2) a layer's input statistics are summed to one process, its owner, and no
other process holds them. :func:`~lightning_rank.compress.factorize.plan_factorization` with ``owners`` (a
:class:`PlanOwners`) then has each owner do what needs the ``d x d`` statistics, for its layers only: the checks on
them, the eigenproblems, the whitened SVD, the factors and their output error. What every process needs is sent
from the owner, layer by layer in model order: the ranks (a few ints), the singular values of a budget's candidates
(a vector each) and the factors. The whitened bases stay on their owners: elsewhere a candidate holds ``meta``
stand-ins, and the probe gets a basis (or a product of it) from the owner while it uses it, one layer at a time
(:class:`~lightning_rank.compress.candidates.Holder`). So every process decides the same ranks and builds its
low-rank layers from the very same factors, while the statistics, moments, eigenvectors and bases of a layer exist
on its owner alone; with sharded weights (FSDP2) its full weight too, save while each process builds its module."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rank.compress.candidates import Holder
from lightning_rank.compress.factors import whitened_svd
from lightning_rank.compress.layers import low_rank_from_dense
from lightning_rank.compress.planning import Decomposition, Replaceable, decompositions, factors, relative_output_error
from lightning_rank.compress.selection import why_not_replaceable
from lightning_rank.stats.sums import ActivationStatistics
from lightning_rank.targets import Target, layer_shape


@dataclass(frozen=True)
class PlanOwners:
    """This process (``rank``), the process holding each layer's statistics (``owners``, by layer name: those of
    ``stats`` that this process holds are its own), and two collectives, called on every process in the same order:
    ``broadcast(tensor, src)`` (in place, from process ``src``) and ``gather(obj)`` (every process's ``obj``, in rank
    order; picklable and small). ``device``: where tensors are received. ``full_weights(names, keep)``: a context
    manager (entered on every process) while which the layers in ``keep`` hold their full weights, for a model whose
    weights are sharded (FSDP2): each of ``names`` is gathered in turn and dropped by the processes that do not keep
    it. Without it, weights are whole."""

    rank: int
    owners: Mapping[str, int]
    broadcast: Callable[[Tensor, int], None]
    gather: Callable[[Any], list[Any]]
    device: torch.device = torch.device("cpu")
    full_weights: Callable[[Sequence[str], Collection[str]], AbstractContextManager] | None = None

    def holding(self, names: Sequence[str], keep: Collection[str]) -> AbstractContextManager:
        """:attr:`full_weights` of ``names``, keeping ``keep`` (nothing to do when weights are whole)."""
        return contextlib.nullcontext() if self.full_weights is None else self.full_weights(names, keep)

    def holder(self, name: str) -> Holder:
        """Where layer ``name``'s matrices are, for its :class:`~lightning_rank.compress.candidates.LayerCandidate`."""
        owner = self.owners[name]
        return Holder(owner, owner == self.rank, self.broadcast, self.device)

    def judges(self, name: str) -> bool:
        """Whether this process decides for layer ``name``: it owns it, or the layer has no owner (no statistics: every
        process decides alike from the names alone)."""
        return self.owners.get(name, self.rank) == self.rank

    def agree(self, mine: dict[str, Any], failure: Exception | None) -> dict[str, Any]:
        """What each owner found for its layers (``mine`` here), on every process; raises on every process when any
        failed (``failure`` here), so that none waits for the others."""
        parts = self.gather({"found": mine, "failure": None if failure is None else f"{type(failure).__name__}: "
                                                                                     f"{failure}"})
        if failure is not None:
            raise failure
        failed = {rank: part["failure"] for rank, part in enumerate(parts) if part["failure"] is not None}
        if failed:
            raise RuntimeError(f"planning failed on process(es) {failed}")
        return {name: value for part in parts for name, value in part["found"].items()}


def replaceable_reasons(
    targets: dict[str, Target], stats: ActivationStatistics | None, shared: dict[int, list[str]],
    owners: PlanOwners | None,
) -> dict[str, str | None]:
    """Why each of ``targets`` cannot be replaced (None: it can), judged where its statistics are
    (:func:`~lightning_rank.compress.selection.why_not_replaceable`); raises what it raises, on every process."""
    reasons: dict[str, str | None] = {}
    failure = None
    for name, target in targets.items():
        if owners is None or owners.judges(name):
            try:
                reasons[name] = why_not_replaceable(name, target, stats, shared)
            except ValueError as error:
                if owners is None:
                    raise
                failure = failure or error
    if owners is None:
        return reasons
    owned = {name: reason for name, reason in reasons.items() if name in owners.owners}
    reasons.update(owners.agree(owned, failure))
    return {name: reasons[name] for name in targets}


def owned_decompositions(
    model: nn.Module,
    stats: ActivationStatistics,
    targets: dict[str, Target],
    owners: PlanOwners,
    threshold: float,
    with_ranks: bool,
    with_output_basis: bool,
    with_candidates: bool,
    progress: bool = False,
) -> dict[str, Decomposition]:
    """:func:`~lightning_rank.compress.planning.decompositions` of ``targets``, each computed by its owner, which alone
    holds the layer's full weight (gathered for it when sharded).

    Every process gets each layer's ranks; with ``with_candidates`` (a budget to share out) also the singular values
    of its whitened weight. A layer owned elsewhere carries ``meta`` stand-ins of its weight and whitened basis (shapes
    and layouts, no data) and a holder: the probe gets what it needs of them from the owner, one layer at a time."""
    mine = {name: target for name, target in targets.items() if owners.owners[name] == owners.rank}
    here = {name: key for name, key in stats.sources.items() if key in stats.inputs}
    local = ActivationStatistics(stats.inputs, here, dict(stats.skipped), [n for n in stats.unmasked if n in here])
    found: dict[str, Decomposition] = {}
    summary: dict[str, tuple] = {}
    failure = None
    try:
        with owners.holding(list(targets), mine):
            found = decompositions(model, local, mine, threshold, with_ranks, with_output_basis, progress)
        for name, entry in found.items():
            if with_candidates:
                entry.whitened = whitened_svd(entry.weight, entry.values, entry.vectors)
            layouts = [_layout(t) for t in entry.whitened] if with_candidates else None
            summary[name] = (entry.in_rank, entry.out_rank, entry.rank, layouts)
    except Exception as error:  # told to the others, or they would wait for this process
        failure = error
    summaries = owners.agree(summary, failure)
    out: dict[str, Decomposition] = {}
    for name, target in targets.items():  # model order: every process broadcasts alike
        in_rank, out_rank, rank, layouts = summaries[name]
        entry = found.get(name)
        if entry is None:
            weight = torch.empty(layer_shape(target), dtype=torch.float64, device="meta")
            entry = Decomposition(weight, in_rank=in_rank, out_rank=out_rank, rank=rank, held_elsewhere=True)
            if with_candidates:
                entry.whitened = (_stand_in(layouts[0]), None)
        entry.holder = owners.holder(name)
        if with_candidates:  # the singular values (a vector) to every process; the basis stays on its owner
            basis, values = entry.whitened
            entry.whitened = basis, entry.holder.send(values if values is not None else _stand_in(layouts[1]))
        out[name] = entry
    return out


def owned_modules(
    model: nn.Module, layers: dict[str, Replaceable], names: list[str], method: str, owners: PlanOwners
) -> dict[str, tuple[nn.Module, float | None]]:
    """The low-rank module of each of ``names`` and its relative output error: the owner computes the factors (and the
    error, from the statistics), and every process builds its module from the owner's factors, one layer at a time
    (with the layer's full weight and bias while it does, when they are sharded)."""
    computed: dict[str, tuple[Tensor, Tensor]] = {}
    summary: dict[str, tuple] = {}
    failure = None
    try:
        for name in names:
            if owners.owners[name] == owners.rank:
                computed[name] = factors(layers[name], method)
                summary[name] = tuple(_layout(t) for t in computed[name])
    except Exception as error:  # told to the others, or they would wait for this process
        failure = error
    layouts = owners.agree(summary, failure)
    modules: dict[str, nn.Module] = {}
    errors: dict[str, float | None] = {}
    failure = None
    for name in names:  # model order: every process broadcasts alike
        layer, holder = layers[name], owners.holder(name)
        a, b = computed.get(name) or (_stand_in(layout) for layout in layouts[name])
        a, b = holder.send(a), holder.send(b)
        with owners.holding([name], [name]):
            modules[name] = low_rank_from_dense(layer.target.module, a, b)
        if holder.here and failure is None:
            try:
                errors[name] = relative_output_error(layer, modules[name].dense_weight().detach().to(layer.weight))
            except Exception as error:  # told to the others after the loop
                failure = error
    errors = owners.agree(errors, failure)
    return {name: (modules[name], errors[name]) for name in names}


def _layout(tensor: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(tensor.shape), tuple(tensor.stride())


def _stand_in(layout: tuple) -> Tensor:
    """A ``meta`` float64 tensor of ``layout``: what :meth:`~lightning_rank.compress.candidates.Holder.send` receives
    into, elsewhere than on the owner."""
    shape, stride = layout
    return torch.empty_strided(shape, stride, dtype=torch.float64, device="meta")
