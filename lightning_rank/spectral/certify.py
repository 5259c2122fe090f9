"""Energy ranks that round-off cannot change: eigenvector-free certificates first, float64 only where needed.

An eigenvalue is removed as round-off only against the error bound of the sums it comes from (see
:mod:`~lightning_rank.spectral.spectrum`). :func:`settle` certifies a moment's energy rank from its computed
eigenvalues where the bounds allow, and solves it again in float64 (eigenvalues, then eigenvectors)
where they do not. Float32 matrices that stand in for float64 ones carry their error, measured by
Gaussian probes (:func:`output_errors` for output moments).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_rank.spectral.spectrum import (
    cholesky_output_factor,
    clean_spectrum,
    energy_rank,
    energy_rank_interval,
    output_factor,
    output_moment,
    output_moment_times,
    roundoff_bounds,
    solver_bound,
    stand_in_error,
    symmetric_eigen,
)
from lightning_rank.stats.sums import ActivationStatistics, InputStatistics


@dataclass
class Spectrum:
    """Eigenvalues of one moment (descending, round-off removed) and, when kept, its eigenvectors (columns)."""

    values: Tensor
    vectors: Tensor | None = None
    refined: bool = False  # solved again in float64 because the first solve's bounds left its rank open
    rank: int = 0  # the energy rank of ``values`` at the threshold it was settled at


class Float64Matrices:
    """The float64 matrices a moment is solved again from when float32 bounds leave its rank open (made once)."""

    def __init__(self, stats: ActivationStatistics, centered: bool, moments: dict[str, Tensor]) -> None:
        self.stats, self.centered = stats, centered
        self._moments = dict(moments)
        self._eigen: dict[str, tuple[Tensor, Tensor]] = {}
        self._factors: dict[str, Tensor] = {}

    def add(self, moments: dict[str, Tensor]) -> None:
        """Take float64 moments already made as the references of their keys."""
        self._moments.update(moments)

    def moment(self, key: str) -> Tensor:
        if key not in self._moments:
            self._moments[key] = self.stats.inputs[key].second_moment(self.centered, dtype=torch.float64)
        return self._moments[key]

    def output_moment(self, weight: Tensor, bias: Tensor | None, key: str) -> Tensor:
        mean = self.stats.inputs[key].mean().to(weight.device)
        return output_moment(weight.double(), None if bias is None else bias.double(), self.moment(key), mean,
                             self.centered)

    def factor(self, name: str, weight: Tensor, bias: Tensor | None, key: str) -> Tensor:
        """The output factor of a widening layer in float64: from the Cholesky factor of its input moment, or from
        its eigendecomposition when the moment is singular."""
        if name not in self._factors:
            weight, bias = weight.double(), None if bias is None else bias.double()
            mean = self.stats.inputs[key].mean().to(weight.device)
            factor = cholesky_output_factor(weight, bias, self.moment(key), mean, self.centered)
            if factor is None:
                if key not in self._eigen:
                    self._eigen[key] = symmetric_eigen(self.moment(key))
                values, vectors = self._eigen[key]
                factor = output_factor(weight, bias, values, vectors, mean, self.centered)
            self._factors[name] = factor
        return self._factors[name]


def output_errors(
    stats: ActivationStatistics,
    layers: dict[str, tuple[Tensor, Tensor | None]],
    matrices: dict[str, Tensor],
    factors: dict[str, Tensor],
    exact: Float64Matrices,
) -> dict[str, float]:
    """How far each float32 output matrix stands from its float64 reference (0 for float64 ones), by probes;
    ``layers`` maps each layer to its weight and bias.

    For a widening layer the matrix is ``A^T A`` of a factor ``A``: its error is that of forming ``A^T A``
    plus that of ``A A^T`` against the output moment (their nonzero spectra are the same)."""
    errors = {name: 0.0 for name in layers}
    by_input: dict[str, list[str]] = defaultdict(list)
    for name in layers:
        if matrices[name].dtype != torch.float64:
            by_input[stats.sources[name]].append(name)
    centered = exact.centered
    for key, names in by_input.items():
        moment = exact.moment(key)
        mean = stats.inputs[key].mean().to(moment.device)
        for name in names:
            weight, bias = layers[name]
            weight, bias = weight.double(), None if bias is None else bias.double()
            times = output_moment_times(weight, bias, moment, mean, centered)
            if name in factors:
                factor = factors[name].double()
                formed = stand_in_error(matrices[name], lambda x, a=factor: a.t() @ (a @ x), factor.shape[1],
                                        factor.device)
                errors[name] = formed + stand_in_error(lambda x, a=factor: a @ (a.t() @ x), times, factor.shape[0],
                                                       factor.device)
            else:
                errors[name] = stand_in_error(matrices[name], times, len(matrices[name]), moment.device)
    return errors


def input_trace(inputs: InputStatistics, centered: bool) -> float:
    """The trace of the input moment in float64, as exact as the float64 moment's own."""
    trace = float(inputs.diagonal().double().sum()) / max(int(inputs.count), 1)
    return trace - float(inputs.mean().square().sum()) if centered else trace


def input_scales(inputs: InputStatistics) -> Tensor:
    """``sqrt(diag(C))`` of the uncentered moment in float64: the scale of each input's round-off."""
    return (inputs.diagonal().double() / max(int(inputs.count), 1)).clamp(min=0).sqrt()


def settle(
    solved: Any,
    matrix: Callable[[], Tensor],
    inputs: InputStatistics,
    scales: Tensor,
    threshold: float,
    keep_vectors: bool,
    factor: bool = False,
    extra: float = 0.0,
    solved_factor: Tensor | None = None,
    trace: float | None = None,
) -> Spectrum:
    """A :class:`Spectrum` (descending) whose round-off is removed and whose energy rank is certain.

    ``solved`` is ``(values, vectors)`` or ``values`` (ascending) of the moment as computed in the eigen
    dtype (with ``factor``: of ``A^T A`` for a factor ``A``, ``solved_factor``, of the moment). Entries of
    the moment err by at most ``roundoff * s_i s_j`` with ``s = scales``, which removes each eigenvalue up
    to its own direction's bound ``roundoff * ||diag(s) v||^2`` (these bounds sum to ``roundoff * |s|^2``);
    the eigenvalues err by the solver's bound and ``extra`` more from products in the eigen dtype; ``trace``
    is the moment's exact trace where known. When these bounds, free of eigenvectors, leave the rank at
    ``threshold`` open, ``matrix()`` (the moment, or its factor, in float64) is solved again: for eigenvalues
    first, then, if still open, with eigenvectors for the per-direction bounds (marked ``refined``).
    """
    values, vectors = solved if isinstance(solved, tuple) else (solved, None)
    roundoff = inputs.roundoff()
    # A handful of scalars of n numbers: on the host in numpy, several times quicker than torch at this size.
    squares = scales.square().cpu().numpy()
    positive = squares[squares > 0]
    least = roundoff * float(positive.min()) if positive.size else 0.0
    # Whatever the eigenvectors, removal takes every eigenvalue below the least bound and none above the largest.
    zero_below = roundoff * float(squares.min()) if squares.size else 0.0
    keep_above = roundoff * float(squares.max()) if squares.size else 0.0
    bounds_sum = roundoff * float(squares.sum())

    def certified(values: Tensor, extra: float) -> tuple[Tensor, int] | None:
        """The spectrum cleaned at the smallest possible bounds and its rank, if these bounds make the rank certain."""
        largest, n = float(values.abs().max()) if values.numel() else 0.0, values.numel()
        reference_solver = solver_bound(largest, n, torch.float64)  # the float64 solve's share of each bound
        low, high = energy_rank_interval(
            values, threshold, error=solver_bound(largest, n, values.dtype) + extra, trace=trace,
            zero_below=zero_below + reference_solver, keep_above=keep_above + reference_solver,
            zeroed_at_most=bounds_sum + n * reference_solver)
        if low != high:
            return None
        cleaned = clean_spectrum(values.double(), least + reference_solver)
        rank = int(energy_rank(cleaned, threshold))
        return (cleaned, rank) if rank == low else None

    exact, refined = solved_factor, False
    settled = certified(values, extra)
    if settled is None and values.dtype != torch.float64 and not keep_vectors:  # float64 eigenvalues may settle it
        exact, refined = matrix(), True
        values, vectors = symmetric_eigen(gram_of(exact, factor), vectors=False), None
        settled = certified(values, 0.0)
    if settled is None:  # each eigenvalue against its own direction's bound, from float64 eigenvectors
        if exact is None or exact.dtype != torch.float64:
            exact = matrix()
        if vectors is None or vectors.dtype != torch.float64:
            values, vectors = symmetric_eigen(gram_of(exact, factor))
        solver = solver_bound(float(values.abs().max()), values.numel(), torch.float64)
        directions = output_directions(exact, values, vectors) if factor else vectors
        cleaned = clean_spectrum(values, roundoff_bounds(roundoff, scales.to(values.device), directions) + solver)
        settled, refined = (cleaned, int(energy_rank(cleaned, threshold))), True
    cleaned, rank = settled
    order = cleaned.argsort(descending=True)
    if not keep_vectors or vectors is None:
        return Spectrum(cleaned[order], refined=refined, rank=rank)
    if factor:
        vectors = output_directions(exact, values, vectors)
    return Spectrum(cleaned[order], vectors[:, order], refined=refined, rank=rank)


def gram_of(matrix: Tensor, factor: bool) -> Tensor:
    return matrix.double().t() @ matrix.double() if factor else matrix.double()


def output_directions(factor: Tensor, values: Tensor, vectors: Tensor) -> Tensor:
    """Unit eigenvectors of ``A A^T`` from those of ``A^T A``: ``A w / |A w|`` (zero where ``A w`` is zero)."""
    directions = factor.double() @ vectors.double()
    norms = directions.norm(dim=0, keepdim=True)
    return torch.where(norms > 0, directions / norms.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
