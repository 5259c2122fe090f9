"""Rank allocation under a budget: which rank each layer gets so the whole model keeps most of its output.

    allocation = allocate(candidates, param_budget=0.5,             # or macs_budget=...
                          probe=Probe(model, calibration_batches))  # probe=None: uniform tolerance
    allocation.ranks       # {name: rank} of the layers to factorize (the others stay dense)
    allocation.layers      # {name: AllocatedRank}: rank, params, macs, energy kept, relative
                           # output error, and the measured end-to-end sensitivity where probed

Candidates (:class:`~lightning_rank.compress.candidates.LayerCandidate`) are the replaceable layers; a
budget is a fraction of what they hold (weights and biases, or multiply-adds per example), so layers that
can never be factorized are out of its base.

- ``rule="uniform"`` (the floor): one common tolerance ``t`` on every layer's relative output error,
  rank ``r_l = min{r >= 1: e_l[r] <= t}``, with ``t`` the smallest value that meets the budget.
- ``rule="probe"`` (the default when a :class:`~lightning_rank.compress.probe.Probe` is given): the model's
  own output decides. On the first calibration batch one backward pass of ``z . f`` (``z`` a random
  direction over the output ``f``) gives each layer's output-gradient moment ``G``; each layer's truncation
  is then weighted by it (:meth:`~lightning_rank.compress.candidates.LayerCandidate.output_weighted`: the
  rank-``r`` weight of least ``tr(G (W - W_r) C (W - W_r)^T)``, so the output directions the model
  amplifies are kept first; ``output_weighted=False`` keeps the plain whitened truncation). One forward and
  backward pass per calibration batch then gives, for every layer and every rank at once, the linearized
  damage ``D_l(r) = E||f(W_r) - f(W)||^2 / E||f||^2`` of truncating that layer alone (estimated through
  ``z``; see :meth:`~lightning_rank.compress.probe.Probe.linear_damage`). Ranks are allocated greedily on
  those curves (lower convex hull of damage against cost saved, leftover budget spent back). Finally this
  allocation and uniform tolerance's (plain whitened truncations) are both evaluated on the calibration
  batches (the probe restores every weight bit-exactly after overwriting it in place under ``no_grad``)
  and the one with the lower output error is returned, so the result is never worse than the floor
  there. Cost, in forward passes over one calibration batch (a backward counts as two): ``5 x batches + 2``,
  linear in depth, independent of the ranks; plus, per layer and pass, products of its outputs with
  ``max_rank + 1`` directions, and once its gradient moment (``rows x out^2``), a Cholesky factorization
  of it and an SVD of ``out x min(out, fan_in)``.

With a probe that has a ``reduce`` (each process probing its own calibration batches), the gradient moments,
the damage curves and both rules' output errors are sums over every process's batches, so every process
allocates the same ranks and picks the same rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_rank.checks import check_budget
from lightning_rank.compress.candidates import LayerCandidate
from lightning_rank.compress.probe import Probe
from lightning_rank.targets import Target

RULES = ("probe", "uniform")



# -- result ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AllocatedRank:
    """The rank one layer got and what it costs and loses.

    ``rank`` is ``None`` when the layer stays dense. ``energy_kept`` is the fraction of the layer's
    output energy ``E||W x||^2`` its rank-``rank`` whitened truncation keeps; ``relative_error`` is
    ``E||(W - W_r) x||^2 / E||W x||^2`` from the statistics. ``sensitivity`` is, where probed, the
    model's relative output error per unit of this layer's relative error (measured with the layer
    alone truncated), and ``output_error`` the model's relative output error predicted for this layer
    alone at ``rank``.
    """

    name: str
    out_features: int
    in_features: int
    rank: int | None
    params: int
    dense_params: int
    macs: float
    dense_macs: float
    energy_kept: float
    relative_error: float
    sensitivity: float | None = None
    output_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["name"]
        return out


@dataclass
class Allocation:
    """What :func:`allocate` decided: per-layer records and the budget bookkeeping.

    ``rule`` is the rule whose ranks were returned (``"probe"`` falls back to ``"uniform"`` when that
    did better on the calibration batches); ``calibration_error`` holds each evaluated rule's relative
    output error on them. ``probe_passes`` counts forward passes over one calibration batch (a
    backward pass counts as two). ``candidates`` are those whose truncations ``ranks`` refer to (the
    output-weighted ones when the probe rule won): the planner builds the factors from them.
    """

    rule: str
    unit: str
    budget: float
    base: float
    kept: float
    layers: dict[str, AllocatedRank]
    tolerance: float | None = None
    calibration_error: dict[str, float] = field(default_factory=dict)
    probe_passes: int = 0
    seconds: float = 0.0
    candidates: dict[str, LayerCandidate] = field(default_factory=dict, repr=False)

    @property
    def ranks(self) -> dict[str, int]:
        """``{name: rank}`` of the layers to factorize (dense layers are not listed)."""
        return {name: d.rank for name, d in self.layers.items() if d.rank is not None}

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("rule", "unit", "budget", "base", "kept", "tolerance", "probe_passes",
                                             "seconds")}
        out["calibration_error"] = dict(self.calibration_error)
        out["layers"] = {name: d.to_dict() for name, d in self.layers.items()}
        return out


# -- the floor: uniform tolerance ----------------------------------------------------------------
def tolerance_rank(candidate: LayerCandidate, tolerance: float) -> int | None:
    """The least rank ``r >= 1`` with ``e[r] <= tolerance``, or ``None`` (dense) when it would not save."""
    below = torch.nonzero(candidate.curve[1:] <= tolerance)
    rank = int(below[0]) + 1 if len(below) else len(candidate.curve) - 1
    return rank if rank <= candidate.max_rank else None


def uniform_tolerance(
    candidates: Mapping[str, LayerCandidate], allowed: float, unit: str = "params"
) -> tuple[dict[str, int | None], float]:
    """Ranks from the smallest common tolerance whose total cost is at most ``allowed``; returns ``(ranks, t)``.

    The cost is non-increasing in ``t`` and changes only at the values the curves take, so the search
    is an exact bisection over those values. Raises ``ValueError`` when rank 1 everywhere costs more.
    """
    cost = _cost_fn(unit)
    floor = sum(cost(c, 1) for c in candidates.values())
    if floor > allowed:
        raise ValueError(_too_small(unit, allowed, floor, sum(cost(c, None) for c in candidates.values())))
    levels = torch.cat([c.curve[1 : c.max_rank + 1] for c in candidates.values()] + [torch.zeros(1, dtype=torch.float64)])
    levels = torch.unique(levels)  # sorted ascending

    def ranks_at(t: float) -> dict[str, int | None]:
        return {name: tolerance_rank(c, t) for name, c in candidates.items()}

    def total(ranks: Mapping[str, int | None]) -> float:
        return sum(cost(candidates[name], r) for name, r in ranks.items())

    lo, hi = 0, len(levels) - 1  # levels[hi] gives rank 1 (or less) everywhere: meets the budget
    if total(ranks_at(float(levels[hi]))) > allowed:
        return {name: 1 for name in candidates}, float(levels[hi])
    while lo < hi:
        mid = (lo + hi) // 2
        if total(ranks_at(float(levels[mid]))) <= allowed:
            hi = mid
        else:
            lo = mid + 1
    tolerance = float(levels[lo])
    return ranks_at(tolerance), tolerance


# -- greedy on damage curves -------------------------------------------------------------------
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


def allocate_on_curves(
    candidates: Mapping[str, LayerCandidate],
    damage: Mapping[str, Sequence[float] | Tensor],
    allowed: float,
    unit: str = "params",
) -> dict[str, int | None]:
    """Ranks (``None``: dense) of least total ``sum_l damage[l][r_l]`` with a total cost at most ``allowed``.

    ``damage[name][r]`` is the layer's damage at rank ``r`` (``r = 0..min(out, fan_in)``). Steps along
    each layer's lower convex hull of (cost saved, damage) are taken greedily, least damage per unit
    saved first, until the budget is met; then any slack left is spent back, largest damage removed
    per unit of cost first. Raises ``ValueError`` when rank 1 everywhere costs more than ``allowed``.
    """
    cost = _cost_fn(unit)
    chosen: dict[str, int | None] = {name: None for name in candidates}
    floor = sum(cost(c, 1) for c in candidates.values())
    total = sum(cost(c, None) for c in candidates.values())
    if floor > allowed:
        raise ValueError(_too_small(unit, allowed, floor, total))
    points: dict[str, list[tuple[float, float, int | None]]] = {}
    hulls: dict[str, list[tuple[float, float, int | None]]] = {}
    for name, c in candidates.items():
        curve = [float(d) for d in damage[name]]
        dense = cost(c, None)
        points[name] = [(0.0, 0.0, None)] + [(dense - cost(c, r), curve[r], r) for r in range(c.max_rank, 0, -1)]
        hulls[name] = lower_hull(points[name])
    order = {name: i for i, name in enumerate(candidates)}
    step = {name: 0 for name in candidates}
    while total > allowed:
        best = None
        for name, hull in hulls.items():
            i = step[name]
            if i + 1 < len(hull):
                key = (slope(hull[i], hull[i + 1]), order[name])
                if best is None or key < best[0]:
                    best = (key, name)
        name = best[1]
        start, end = hulls[name][step[name]], hulls[name][step[name] + 1]
        step[name] += 1
        total -= end[0] - start[0]
        chosen[name] = end[2]
    return _spend_slack(candidates, damage, chosen, allowed, cost)


def _spend_slack(
    candidates: Mapping[str, LayerCandidate],
    damage: Mapping[str, Sequence[float] | Tensor],
    chosen: dict[str, int | None],
    allowed: float,
    cost: Callable[[LayerCandidate, int | None], float],
) -> dict[str, int | None]:
    """Raise ranks (up to dense) while the budget allows, best damage removed per unit cost first."""
    total = sum(cost(candidates[name], r) for name, r in chosen.items())
    while True:
        best = None
        for name, rank in chosen.items():
            if rank is None:
                continue
            c, now = candidates[name], float(damage[name][rank])
            for new in [*range(rank + 1, c.max_rank + 1), None]:
                extra = cost(c, new) - cost(c, rank)
                if total + extra > allowed:
                    break
                gain = now - (0.0 if new is None else float(damage[name][new]))
                if gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, name, new, extra)
        if best is None:
            return chosen
        _, name, new, extra = best
        chosen[name] = new
        total += extra


def _cost_fn(unit: str) -> Callable[[LayerCandidate, int | None], float]:
    if unit == "params":
        return lambda c, r: c.params(r)
    if unit == "macs":
        return lambda c, r: c.macs(r)
    raise ValueError(f"unit must be 'params' or 'macs', got {unit!r}")


def _too_small(unit: str, allowed: float, floor: float, base: float) -> str:
    argument = "param_budget" if unit == "params" else "macs_budget"
    return (
        f"`{argument}`={allowed / base:.4g} keeps {allowed:,.0f} of the replaceable layers' {base:,.0f} {unit}, but "
        f"rank 1 in every replaceable layer needs {floor:,.0f}: use a {argument} of at least {floor / base:.4f}"
    )


# -- the entry point ---------------------------------------------------------------------------
def allocate(
    candidates: Mapping[str, LayerCandidate],
    *,
    param_budget: float | None = None,
    macs_budget: float | None = None,
    probe: Probe | None = None,
    rule: str | None = None,
    samples: int = 1,
    output_weighted: bool = True,
) -> Allocation:
    """Ranks for ``candidates`` that keep ``param_budget`` of their parameters or ``macs_budget`` of their
    multiply-adds per example (exactly one), by ``rule`` (default: ``"probe"`` with a probe, else
    ``"uniform"``). See the module docstring for both rules and their cost. ``samples``: random output
    directions per calibration batch for the linearized curves. ``output_weighted=False`` probes the plain
    whitened truncations (no gradient-moment pass)."""
    started = time.perf_counter()
    if (param_budget is None) == (macs_budget is None):
        raise ValueError("pass exactly one of `param_budget` and `macs_budget`")
    unit = "params" if param_budget is not None else "macs"
    budget = check_budget(param_budget) if unit == "params" else check_budget(macs_budget, "macs_budget")
    rule = rule if rule is not None else ("probe" if probe is not None else "uniform")
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {', '.join(map(repr, RULES))}, got {rule!r}")
    if rule == "probe" and probe is None:
        raise ValueError("rule='probe' needs a `probe`: Probe(model, calibration_batches)")
    if not candidates:
        raise ValueError("no replaceable layer to allocate ranks to")
    if rule == "probe":
        unprobed = [name for name, c in candidates.items() if c.target is None]
        if unprobed:
            raise ValueError(f"rule='probe' needs each candidate's `target`; these have none: {unprobed}")

    cost = _cost_fn(unit)
    base = sum(cost(c, None) for c in candidates.values())
    allowed = budget * base
    uniform, tolerance = uniform_tolerance(candidates, allowed, unit)
    passes_before = probe.passes if probe is not None else 0
    if rule == "uniform":
        return _result(candidates, uniform, "uniform", unit, budget, base, tolerance, started=started)

    if output_weighted:
        probed_candidates, damage = probe.weighted_damage(candidates, samples=samples)
    else:
        probed_candidates, damage = candidates, probe.linear_damage(candidates, samples=samples)
    sensitivity: dict[str, float] = {}
    probed = allocate_on_curves(probed_candidates, damage, allowed, unit)
    for name, c in probed_candidates.items():  # at the rank the layer got (its largest saving rank when dense)
        rank = probed[name] if probed[name] is not None else c.max_rank
        sensitivity[name] = float(damage[name][rank]) / c.error(rank) if c.error(rank) > 0 else 0.0
    errors = {
        "probe": probe.error(_weights(probed_candidates, probed)),
        "uniform": probe.error(_weights(candidates, uniform)),
    }
    if errors["probe"] <= errors["uniform"]:
        chosen, winner, used = probed, "probe", probed_candidates
    else:
        chosen, winner, used = uniform, "uniform", candidates
    return _result(
        used, chosen, winner, unit, budget, base, tolerance,
        sensitivity=sensitivity, damage=damage, errors=errors,
        passes=probe.passes - passes_before, started=started,
    )


def _weights(
    candidates: Mapping[str, LayerCandidate], ranks: Mapping[str, int | None]
) -> dict[Target, Callable[[], Tensor]]:
    """Each truncated weight, computed only when the probe writes it (one full matrix at a time)."""
    return {candidates[name].target: (lambda c=candidates[name], r=r: c.weight_at(r))
            for name, r in ranks.items() if r is not None}


def _result(
    candidates: Mapping[str, LayerCandidate],
    ranks: Mapping[str, int | None],
    rule: str,
    unit: str,
    budget: float,
    base: float,
    tolerance: float,
    *,
    sensitivity: Mapping[str, float] | None = None,
    damage: Mapping[str, Tensor] | None = None,
    errors: Mapping[str, float] | None = None,
    passes: int = 0,
    started: float,
) -> Allocation:
    layers = {}
    for name, c in candidates.items():
        rank = ranks[name]
        error = c.error(rank)
        layers[name] = AllocatedRank(
            name=name,
            out_features=c.shape[0],
            in_features=c.shape[1],
            rank=rank,
            params=c.params(rank),
            dense_params=c.params(None),
            macs=c.macs(rank),
            dense_macs=c.macs(None),
            energy_kept=1.0 - error,
            relative_error=error,
            sensitivity=sensitivity.get(name) if sensitivity else None,
            output_error=(0.0 if rank is None else float(damage[name][rank])) if damage is not None else None,
        )
    cost = _cost_fn(unit)
    return Allocation(
        rule=rule,
        unit=unit,
        budget=budget,
        base=base,
        kept=sum(cost(candidates[name], r) for name, r in ranks.items()),
        layers=layers,
        tolerance=tolerance,
        calibration_error=dict(errors or {}),
        probe_passes=passes,
        seconds=time.perf_counter() - started,
        candidates=dict(candidates),
    )
