"""Per-layer spectra, ranks and factors: what ``plan_factorization`` decides for each replaceable layer.

``decompositions`` is the one place where factorization obtains spectra; the rank of each layer is
then the one asked for, the utilized rank at the threshold, or the one a parameter budget allocates;
its factors follow from the method. Pure math is in :mod:`~lightning_rank.compress.factors`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_rank.checks import RankSpec
from lightning_rank.compress.allocation import Allocation, allocate
from lightning_rank.compress.candidates import Holder, LayerCandidate
from lightning_rank.compress.factors import (
    break_even_rank,
    output_error,
    projection_factors,
    svd_factors,
    whiten_factors,
    whitened_svd,
)
from lightning_rank.compress.probe import Probe, reshard, whole
from lightning_rank.spectral.analysis import decompose
from lightning_rank.spectral.spectrum import energy_rank
from lightning_rank.stats.collect import ForwardFn
from lightning_rank.stats.sums import ActivationStatistics
from lightning_rank.targets import Target, weight_matrix


@dataclass
class Decomposition:
    """The float64 matrices one layer's factors come from; everything but ``weight`` is None without statistics.

    ``values``/``vectors``: eigenpairs of the input moment ``C``, largest first, round-off removed;
    ``out_vectors``: eigenvectors of the output moment ``C_y`` (``projection`` only); ``in_rank``,
    ``out_rank``, ``rank``: the utilized ranks at the threshold (when asked for). ``whitened``: the whitened SVD
    (:func:`~lightning_rank.compress.factors.whitened_svd`) when its owner sent it; ``held_elsewhere``: the
    statistics and spectra are on the process that owns the layer (:mod:`~lightning_rank.compress.sharing`), and
    ``weight`` and the whitened basis are ``meta`` stand-ins; ``holder``: that owner, for the candidate.
    """

    weight: Tensor
    bias: Tensor | None = None
    moment: Tensor | None = None
    mean: Tensor | None = None
    values: Tensor | None = None
    vectors: Tensor | None = None
    out_vectors: Tensor | None = None
    in_rank: int | None = None
    out_rank: int | None = None
    rank: int | None = None
    whitened: tuple[Tensor, Tensor] | None = None
    held_elsewhere: bool = False
    holder: Holder | None = None

    @property
    def measured(self) -> bool:
        """Whether the layer has statistics (here or on its owner)."""
        return self.moment is not None or self.held_elsewhere


def decompositions(
    model: nn.Module,
    stats: ActivationStatistics | None,
    targets: dict[str, Target],
    threshold: float,
    with_ranks: bool,
    with_output_basis: bool,
    progress: bool = False,
) -> dict[str, Decomposition]:
    """Every spectrum factorization uses, per layer, from :func:`~lightning_rank.spectral.analysis.decompose`: the
    moments are decomposed once, with the round-off rule of the reports, and the ranks are the report's."""
    if stats is None:
        return {name: Decomposition(weight_matrix(t)[0].detach().double()) for name, t in targets.items()}
    if not targets:
        return {}
    analysis = decompose(model, stats, threshold=threshold, vectors=True, output_vectors=with_output_basis,
                         layers=targets, progress=progress)
    out: dict[str, Decomposition] = {}
    for name in targets:
        layer = analysis.layers[name]
        entry = Decomposition(layer.weight, layer.bias, layer.moment, layer.mean, layer.inputs.values,
                              layer.inputs.vectors, layer.outputs.vectors)
        if with_ranks or with_output_basis:
            analyzed = analysis.report.layers[name]
            entry.in_rank, entry.out_rank, entry.rank = analyzed.in_rank, analyzed.out_rank, analyzed.rank
        out[name] = entry
    return out


@dataclass
class Replaceable:
    """One layer that may be replaced: its target, spectra (see ``_decompositions``) and planned rank.

    ``truncation``: ``(B, D)`` with ``W_r = B D^T W`` (``(out, rank)`` each), set by a budget's allocation
    when it chose output-weighted truncations; ``method="whiten"`` builds its factors from it."""

    target: Target
    spectra: Decomposition
    rank: int | None = None
    _whitened_svd: tuple[Tensor, Tensor] | None = None
    truncation: tuple[Tensor, Tensor] | None = None

    @property
    def weight(self) -> Tensor:
        return self.spectra.weight

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def whitened(self) -> tuple[Tensor, Tensor]:
        """Left singular vectors and singular values of ``W S`` (computed once)."""
        if self._whitened_svd is None:
            self._whitened_svd = self.spectra.whitened or whitened_svd(self.weight, self.spectra.values,
                                                                       self.spectra.vectors)
        return self._whitened_svd


def candidate(name: str, layer: Replaceable, positions: float = 1.0) -> LayerCandidate:
    """What rank allocation needs of one replaceable layer: its weight and the SVD of its whitened weight
    (of the weight itself without statistics), from the planner's own decompositions, and its bias in full
    (gathered when sharded: call it for every layer in the same order on every process)."""
    if layer.spectra.measured:
        basis, singular_values = layer.whitened()
    else:
        basis, singular_values = torch.linalg.svd(layer.weight, full_matrices=False)[:2]
    bias = weight_matrix(layer.target)[1]
    bias = whole(bias).detach().clone() if bias is not None else None  # FSDP2 frees a gathered bias's storage
    return LayerCandidate(name, layer.weight, basis, singular_values, bias.numel() if bias is not None else 0,
                          positions=positions, target=layer.target, bias=bias, holder=layer.spectra.holder)


def resolve_ranks(ranks: RankSpec, targets: dict[str, Target]) -> dict[str, int]:
    """``{layer: rank}`` from an int or ``{name or regex: rank}`` (an exact or dotted-suffix name wins,
    else the first regex in order that fully matches); every key must match a selected layer."""
    if ranks is None:
        return {}
    if isinstance(ranks, int):
        chosen = {name: ranks for name in targets}
    else:
        patterns = []
        for key in ranks:
            try:
                patterns.append((key, re.compile(key)))
            except re.error:
                patterns.append((key, None))
        for key, pattern in patterns:
            if not any(_key_matches(name, key, pattern) for name in targets):
                raise ValueError(
                    f"`ranks` key {key!r} matches no selected layer (exact name, dotted suffix or full regex match). "
                    f"Selected layers: {', '.join(targets) or 'none'}"
                )
        chosen = {}
        for name in targets:
            exact = [key for key, _ in patterns if name == key or name.endswith("." + key)]
            regex = [key for key, pattern in patterns if pattern is not None and pattern.fullmatch(name)]
            key = (exact or regex or [None])[0]
            if key is not None:
                chosen[name] = ranks[key]
    for name, rank in chosen.items():
        out, fan_in = weight_matrix(targets[name])[0].shape
        if not 1 <= rank <= min(out, fan_in):
            raise ValueError(
                f"`ranks` gives layer {name!r} rank {rank!r}; it must be an int in [1, min(out, fan_in)] = "
                f"[1, {min(out, fan_in)}] for its {out} x {fan_in} weight"
            )
    return chosen


def _key_matches(name: str, key: str, pattern: re.Pattern | None) -> bool:
    return name == key or name.endswith("." + key) or (pattern is not None and pattern.fullmatch(name) is not None)


# -- ranks ---------------------------------------------------------------------------------------
def plan_ranks(layers: dict[str, Replaceable], wanted: dict[str, int], threshold: float) -> None:
    """Set each layer's rank: the one asked for, else the analyzed utilized rank (data-free: of ``W W^T``)."""
    for name, layer in layers.items():
        if name in wanted:
            layer.rank = wanted[name]
        elif layer.spectra.rank is not None:
            layer.rank = layer.spectra.rank
        else:
            layer.rank = int(energy_rank(torch.linalg.svdvals(layer.weight).square(), threshold))


def check_budget_feasible(shapes: dict[str, tuple[int, int]], budget: float, base: int) -> None:
    """Raise unless rank 1 in every layer that can save parameters keeps at most ``budget * base`` of them."""
    allowed = math.floor(budget * base)
    smallest = base - sum(o * i - (o + i) for o, i in shapes.values() if break_even_rank(o, i) >= 1)
    if smallest > allowed:
        raise ValueError(
            f"`param_budget`={budget} keeps {allowed:,} of the selected layers' {base:,} parameters, but even rank 1 "
            f"in every replaceable layer leaves {smallest:,}; use a param_budget of at least {smallest / base:.4f}"
        )


def plan_budget(
    model: nn.Module,
    layers: dict[str, Replaceable],
    *,
    param_budget: float | None,
    macs_budget: float | None,
    allocation: str,
    calibration: list | None,
    forward: ForwardFn | None,
    method: str = "whiten",
    reduce: Callable[[Tensor], None] | None = None,
) -> Allocation:
    """Set each layer's rank so that the replaceable layers keep ``param_budget`` of their parameters or
    ``macs_budget`` of their multiply-adds per example; returns the :class:`~lightning_rank.compress.allocation.Allocation`.

    ``allocation``: ``"probe"`` (the model's own output on the ``calibration`` batches decides, never
    worse there than ``"uniform"``), ``"uniform"`` (one common tolerance on every layer's relative
    output error: the floor) or ``"auto"`` (``"probe"`` with calibration batches, else ``"uniform"``).
    With ``method="whiten"`` the probe rule also weights each layer's truncation by how much its output
    directions move the model's output (:meth:`~lightning_rank.compress.candidates.LayerCandidate.output_weighted`);
    the factors then follow those truncations. ``reduce``: an in-place sum over processes, when each process
    passes its own ``calibration`` batches (see :class:`~lightning_rank.compress.probe.Probe`): every process
    then allocates on the sum over all of them and gets the same ranks.
    """
    fits = {name: layer for name, layer in layers.items() if break_even_rank(*layer.shape) >= 1}
    for name, layer in layers.items():
        layer.rank = 1 if name not in fits else None  # rank 1 does not save: reported as such
    probe = Probe(model, calibration, forward=forward, reduce=reduce) if calibration is not None else None
    positions = probe.positions({name: layer.target for name, layer in fits.items()}) if probe else {}
    reshard(model)  # sharded biases are gathered for the candidates, alike on every process
    candidates = {name: candidate(name, layer, positions.get(name, 1.0)) for name, layer in fits.items()}
    rule = ("probe" if probe is not None else "uniform") if allocation == "auto" else allocation
    result = allocate(candidates, param_budget=param_budget, macs_budget=macs_budget,
                      probe=probe if rule == "probe" else None, rule=rule, output_weighted=method == "whiten")
    for name, layer in fits.items():
        layer.rank = rank = result.layers[name].rank
        chosen = result.candidates[name]
        if rank is not None and chosen.dual is not None and not layer.spectra.held_elsewhere:
            layer.truncation = (chosen.basis[:, :rank], chosen.dual[:, :rank])
    return result


def why_not_at_rank(layer: Replaceable, threshold: float, explicit: bool, unit: str = "params") -> str | None:
    """Why ``layer`` is not replaced at its planned rank (``unit``: what a budget counted), or None."""
    out, fan_in = layer.shape
    if layer.rank is None:
        budget = "multiply-add" if unit == "macs" else "parameter"
        return f"the {budget} budget is met without factorizing this layer"
    if layer.rank == 0:
        return f"utilized rank 0 at threshold {threshold}: the layer's output carries no energy on the collected data"
    if layer.rank > break_even_rank(out, fan_in):
        source = "" if explicit else f" (utilized rank at threshold {threshold})"
        return (
            f"rank {layer.rank}{source} needs {layer.rank * (out + fan_in):,} weight parameters as factors, "
            f"not fewer than the {out * fan_in:,} of the dense {out} x {fan_in} weight"
        )
    return None


# -- factors -------------------------------------------------------------------------------------
def factors(layer: Replaceable, method: str) -> tuple[Tensor, Tensor]:
    rank, spectra = layer.rank, layer.spectra
    if method == "svd":
        return svd_factors(layer.weight, rank)
    if method == "whiten":
        if layer.truncation is not None:
            return whiten_factors(layer.weight, layer.truncation[0], rank, dual=layer.truncation[1])
        return whiten_factors(layer.weight, layer.whitened()[0], rank)
    in_rank = min(max(spectra.in_rank, rank), layer.shape[1])
    out_rank = min(max(spectra.out_rank, rank), spectra.out_vectors.shape[1])
    return projection_factors(layer.weight, spectra.vectors, spectra.out_vectors, in_rank, out_rank, rank)


def relative_output_error(layer: Replaceable, approx: Tensor) -> float | None:
    moment = layer.spectra.moment
    if moment is None:
        return None
    energy = output_error(layer.weight, torch.zeros_like(layer.weight), moment)
    error = output_error(layer.weight, approx, moment).clamp(min=0)  # float32 sums make C slightly indefinite
    return float(error / energy) if energy > 0 else 0.0
