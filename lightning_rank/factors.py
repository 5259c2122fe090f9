"""Pure factorization math on plain tensors: factors of ``W ~ A B``, output errors, rank allocation under a budget.

Every number comes from the collected statistics, never from a second pass over data: with ``C`` the
input second moment, a layer's output error ``E||(W - W') x||^2`` is ``tr((W - W') C (W - W')^T)``.

- ``projection``: the paper's ``P_T W P_S`` (top eigenvectors of ``C`` and of the output moment ``C_y``,
  as many as the energy ranks ``k_S``, ``k_T`` at ``threshold``), truncated to the rank by an SVD of the
  small core ``U_T^T W V_S``; a rank above ``min(k_S, k_T)`` widens both projectors to that rank.
- ``whiten``: the rank-``r`` ``W'`` minimizing ``tr((W - W') C (W - W')^T)``. With ``C = S S^T``, it is the
  truncated SVD of ``W S`` mapped back; that equals ``U_r U_r^T W`` with ``U_r`` the top left singular
  vectors of ``W S``, so nothing is inverted and a singular ``C`` needs no care. The bias is kept
  exactly, so ``C`` is the uncentered moment.
- ``svd``: truncated SVD of ``W`` itself, data-free (works with ``stats=None``).

Nothing here knows modules, statistics objects or Lightning.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def output_error(weight: Tensor, approx: Tensor, moment: Tensor) -> Tensor:
    """``E||(W - W') x||^2 = tr((W - W') C (W - W')^T)`` for ``C = E[x x^T]``."""
    delta = weight - approx
    return ((delta @ moment) * delta).sum()


def whitened_weight(weight: Tensor, values: Tensor, vectors: Tensor) -> Tensor:
    """``W S`` with ``S = V L^1/2``, so ``(W S)(W S)^T = W C W^T`` and ``tr(D C D^T) = ||D S||_F^2``."""
    return weight @ (vectors * values.clamp(min=0).sqrt())


def tail_curve(singular_values: Tensor, size: int) -> Tensor:
    """``e[r] = sum_{i >= r} s_i^2 / sum_i s_i^2`` for ``r = 0..size`` (all zeros when ``s = 0``)."""
    energy = torch.zeros(size + 1, dtype=torch.float64, device=singular_values.device)
    squares = singular_values.double().square()[:size]
    energy[: len(squares)] = squares.flip(0).cumsum(0).flip(0)
    total = energy[0]
    return energy / total if total > 0 else energy


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Data-free truncated SVD ``W ~ A B``, the singular values split evenly between the factors."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def whiten_factors(weight: Tensor, values: Tensor, vectors: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The rank-``rank`` factors minimizing ``E||(W - A B) x||^2`` for ``C = V diag(values) V^T``."""
    u = torch.linalg.svd(whitened_weight(weight, values, vectors), full_matrices=False).U[:, :rank]
    return _balanced(u, u.t() @ weight)


def projection_factors(
    weight: Tensor, in_vectors: Tensor, out_vectors: Tensor, in_rank: int, out_rank: int, rank: int
) -> tuple[Tensor, Tensor]:
    """``P_T W P_S`` (top ``out_rank`` / ``in_rank`` eigenvectors, largest first) truncated to ``rank``."""
    if not rank <= min(in_rank, out_rank):
        raise ValueError(f"rank {rank} exceeds min(in_rank, out_rank) = {min(in_rank, out_rank)}")
    v_s, u_t = in_vectors[:, :in_rank], out_vectors[:, :out_rank]
    p, s, qh = torch.linalg.svd(u_t.t() @ weight @ v_s, full_matrices=False)
    root = s[:rank].sqrt()
    return u_t @ (p[:, :rank] * root), (root[:, None] * qh[:rank]) @ v_s.t()


def _balanced(u: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of ``u @ b`` (``u`` orthonormal) with the singular values split evenly, for fine-tuning."""
    p, s, qh = torch.linalg.svd(b, full_matrices=False)
    root = s.sqrt()
    return u @ (p * root), root[:, None] * qh


def allocate_ranks(
    curves: Mapping[str, Sequence[float] | Tensor], shapes: Mapping[str, tuple[int, int]], savings: int
) -> dict[str, int | None]:
    """Ranks (``None``: stay dense) that save at least ``savings`` weight parameters at little added error.

    ``curves[name][r]`` is the layer's error at rank ``r`` (``r = 0..min(out, fan_in)``), ``shapes[name]``
    its ``(out, fan_in)``. Rank ``r`` costs ``r * (out + fan_in)`` parameters against ``out * fan_in`` dense
    (only ranks below break-even are considered). Steps along each layer's lower convex hull of
    (parameters saved, error) are taken greedily, least error per parameter saved first; the step that
    reaches ``savings`` stops at the best rank inside it that is enough. Raises ``ValueError`` when
    rank 1 everywhere does not save enough.
    """
    hulls: dict[str, list[tuple[int, float, int | None]]] = {}
    points_of: dict[str, list[tuple[int, float, int | None]]] = {}
    for name, (out, fan_in) in shapes.items():
        curve = [float(e) for e in curves[name]]
        dense = out * fan_in
        top = break_even_rank(out, fan_in)
        points = [(0, 0.0, None)] + [(dense - r * (out + fan_in), curve[r], r) for r in range(top, 0, -1)]
        points_of[name] = points
        hulls[name] = lower_hull(points)
    if sum(points[-1][0] for points in points_of.values()) < savings:
        raise ValueError(f"rank 1 in every layer saves fewer than the {savings} parameters needed")

    chosen: dict[str, int | None] = {name: None for name in shapes}
    order = {name: i for i, name in enumerate(shapes)}
    heap = [(slope(hull[0], hull[1]), order[name], name, 0) for name, hull in hulls.items() if len(hull) > 1]
    heapq.heapify(heap)
    saved = 0
    while saved < savings:
        _, _, name, step = heapq.heappop(heap)
        start, end = hulls[name][step], hulls[name][step + 1]
        if saved - start[0] + end[0] >= savings:
            enough = [p for p in points_of[name] if start[0] + savings - saved <= p[0] <= end[0]]
            best = min(enough, key=lambda p: (p[1], p[0]))
            chosen[name] = best[2]
            break
        chosen[name] = end[2]
        saved += end[0] - start[0]
        if step + 2 < len(hulls[name]):
            heapq.heappush(heap, (slope(end, hulls[name][step + 2]), order[name], name, step + 1))
    return chosen


def lower_hull(points: list[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """Lower convex hull of points sorted by their first coordinate (Andrew's monotone chain)."""
    hull: list[tuple[float, float, Any]] = []
    for p in points:
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) > 0:
                break
            hull.pop()
        hull.append(p)
    return hull


def slope(a: tuple[float, float, Any], b: tuple[float, float, Any]) -> float:
    return (b[1] - a[1]) / (b[0] - a[0])


def break_even_rank(out: int, fan_in: int) -> int:
    """The largest ``r`` with ``r * (out + fan_in) < out * fan_in`` (0 when none): ranks above it save nothing."""
    return (out * fan_in - 1) // (out + fan_in)
