"""``factorize_``: swap layers for low-rank factors in place; ``load_factorized``: rebuild that structure, then load.

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
"""

from __future__ import annotations

import heapq
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rank.analysis import analyze
from lightning_rank.layers import LOW_RANK_TYPES, disable_dense_fast_paths, low_rank_from_dense, low_rank_type
from lightning_rank.spectrum import check_threshold, clean_spectrum, energy_rank, output_factor, output_moment
from lightning_rank.statistics import ActivationStatistics
from lightning_rank.targets import ModuleSelector, Target, layer_kind, parameter_count, select_targets, weight_matrix

METHODS = ("projection", "whiten", "svd")
RankSpec = int | Mapping[str, int] | None


# -- pure math ---------------------------------------------------------------------------------
def output_error(weight: Tensor, approx: Tensor, moment: Tensor) -> Tensor:
    """``E||(W - W') x||^2 = tr((W - W') C (W - W')^T)`` for ``C = E[x x^T]``."""
    delta = weight - approx
    return ((delta @ moment) * delta).sum()


def descending_eigh(moment: Tensor, rtol: float = 0.0) -> tuple[Tensor, Tensor]:
    """Eigenvalues (largest first, those below ``rtol * max`` set to 0) and eigenvectors of a PSD matrix."""
    values, vectors = torch.linalg.eigh(moment)
    return clean_spectrum(values.flip(-1), rtol), vectors.flip(-1)


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
        top = _break_even_rank(out, fan_in)
        points = [(0, 0.0, None)] + [(dense - r * (out + fan_in), curve[r], r) for r in range(top, 0, -1)]
        points_of[name] = points
        hulls[name] = _lower_hull(points)
    if sum(points[-1][0] for points in points_of.values()) < savings:
        raise ValueError(f"rank 1 in every layer saves fewer than the {savings} parameters needed")

    chosen: dict[str, int | None] = {name: None for name in shapes}
    order = {name: i for i, name in enumerate(shapes)}
    heap = [(_slope(hull[0], hull[1]), order[name], name, 0) for name, hull in hulls.items() if len(hull) > 1]
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
            heapq.heappush(heap, (_slope(end, hulls[name][step + 2]), order[name], name, step + 1))
    return chosen


def _break_even_rank(out: int, fan_in: int) -> int:
    """The largest ``r`` with ``r * (out + fan_in) < out * fan_in`` (0 when none)."""
    return (out * fan_in - 1) // (out + fan_in)


def _lower_hull(points: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """Lower convex hull of points sorted by their first coordinate (Andrew's monotone chain)."""
    hull: list[tuple[int, float, int | None]] = []
    for p in points:
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) > 0:
                break
            hull.pop()
        hull.append(p)
    return hull


def _slope(a: tuple[int, float, Any], b: tuple[int, float, Any]) -> float:
    return (b[1] - a[1]) / (b[0] - a[0])


# -- result ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerFactorization:
    """What happened to one selected layer.

    ``rank`` is the rank planned for it (``None`` when none was), ``relative_error`` the output error
    ``E||(W - W') x||^2 / E||W x||^2`` of the layer as it now is, from the statistics (0.0 when left
    dense, ``None`` without statistics), ``reason`` why it was not replaced.
    """

    name: str
    kind: str | None
    out_features: int | None
    in_features: int | None
    replaced: bool
    rank: int | None = None
    relative_error: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["name"]
        return out


@dataclass
class FactorizationResult:
    """What :func:`factorize_` did: whole-model parameter counts and one :class:`LayerFactorization` per layer.

    ``layer_params_before`` / ``layer_params_after`` count the selected layers only (what
    ``param_budget`` is a fraction of).
    """

    method: str
    threshold: float
    param_budget: float | None
    params_before: int
    params_after: int
    layer_params_before: int
    layer_params_after: int
    details: dict[str, LayerFactorization] = field(default_factory=dict)

    @property
    def layers(self) -> dict[str, int]:
        """``{name: rank}`` of the replaced layers."""
        return {name: d.rank for name, d in self.details.items() if d.replaced}

    @property
    def not_replaced(self) -> dict[str, str]:
        """``{name: reason}`` of the selected layers left as they were."""
        return {name: d.reason for name, d in self.details.items() if not d.replaced}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "param_budget": self.param_budget,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layer_params_before": self.layer_params_before,
            "layer_params_after": self.layer_params_after,
            "layers": self.layers,
            "details": {name: d.to_dict() for name, d in self.details.items()},
        }

    def to_markdown(self) -> str:
        """A table of every selected layer, headed by the parameter counts."""
        lines = [
            f"**{self.method}**: parameters {self.params_before:,} -> {self.params_after:,} "
            f"({100 * self.params_after / max(self.params_before, 1):.1f}%), {len(self.layers)} layers replaced",
            "",
            "| layer | out x in | rank | rel. output error | params | replaced |",
            "|---|---|---:|---:|---:|---|",
        ]
        for name, d in self.details.items():
            error = "n/a" if d.relative_error is None else f"{d.relative_error:.4f}"
            params = "" if d.params_before is None else f"{d.params_before:,} -> {d.params_after:,}"
            lines.append(
                f"| {name} | {d.out_features} x {d.in_features} | {d.rank if d.rank is not None else ''} | {error} | "
                f"{params} | {'yes' if d.replaced else 'no: ' + str(d.reason)} |"
            )
        return "\n".join(lines) + "\n"


# -- factorize_ --------------------------------------------------------------------------------
@dataclass
class _Layer:
    """One replaceable layer and the float64 matrices its factors come from."""

    target: Target
    weight: Tensor
    moment: Tensor | None
    values: Tensor | None
    vectors: Tensor | None
    mean: Tensor | None
    rank: int | None = None
    _whitened_svd: tuple[Tensor, Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def whitened(self) -> tuple[Tensor, Tensor]:
        """Left singular vectors and singular values of ``W S`` (computed once)."""
        if self._whitened_svd is None:
            u, s, _ = torch.linalg.svd(whitened_weight(self.weight, self.values, self.vectors), full_matrices=False)
            self._whitened_svd = (u, s)
        return self._whitened_svd

    def error_curve(self) -> Tensor:
        """Relative output error at each rank: the least achievable (whiten) with statistics, else ``||W - W_r||_F^2``."""
        size = min(self.shape)
        if self.moment is None:
            return tail_curve(torch.linalg.svdvals(self.weight), size)
        return tail_curve(self.whitened()[1], size)


def factorize_(
    model: nn.Module,
    stats: ActivationStatistics | None,
    *,
    threshold: float = 0.99,
    method: str = "projection",
    ranks: RankSpec = None,
    param_budget: float | None = None,
    target_modules: ModuleSelector = None,
    exclude_modules: ModuleSelector = None,
) -> FactorizationResult:
    """Replace the selected layers of ``model`` in place by low-rank factors; returns what was done.

    Ranks are the utilized ranks :func:`~lightning_rank.analyze` reports at ``threshold`` by default,
    or ``ranks`` (one int for all, or ``{name or regex: rank}``; a layer it does not name keeps its
    threshold rank), or chosen to keep ``param_budget`` (a fraction in (0, 1]) of the selected layers'
    parameters, removing rank where it loses the least output energy (relative to each layer's) per
    parameter saved. With statistics, ranks never depend on ``method``; only the factors do.
    A layer is replaced only where ``rank * (out + fan_in) < out * fan_in``. ``target_modules`` /
    ``exclude_modules`` select layers as in :func:`~lightning_rank.collect`.
    """
    method = _check_method(method)
    threshold = check_threshold(threshold)
    budget = _check_budget(param_budget)
    if ranks is not None and budget is not None:
        raise ValueError("pass either `ranks` or `param_budget`, not both")
    if stats is None and method != "svd":
        raise ValueError(
            f"method={method!r} needs `stats`: collect them with lr.collect(model, batches), or use method='svd'"
        )
    if stats is not None and not isinstance(stats, ActivationStatistics):
        raise TypeError(f"`stats` must be ActivationStatistics from lr.collect or None, got {type(stats).__name__}")

    params_before = _count_parameters(model)
    targets, unselectable = select_targets(model, target_modules, exclude_modules)
    wanted = _resolve_ranks(ranks, targets)
    details: dict[str, LayerFactorization] = {}
    for name, reason in unselectable.items():
        details[name] = _kept(model, name, None, reason)

    layers: dict[str, _Layer] = {}
    shared = _shared_weights(model)
    factorized = {name for name, module in model.named_modules() if isinstance(module, LOW_RANK_TYPES)}
    eigen: dict[str, tuple[Tensor, Tensor]] = {}
    for name, target in targets.items():
        reason = _why_not_replaceable(name, target, stats, shared, factorized)
        if reason is not None:
            details[name] = _kept(model, name, target, reason)
            continue
        layers[name] = _prepare(name, target, stats, eigen)

    report = None
    needs_threshold_ranks = budget is None and any(name not in wanted for name in layers)
    if stats is not None and layers and (method == "projection" or needs_threshold_ranks):
        report = analyze(model, stats, threshold=threshold)
    layer_params_before = sum(parameter_count(t) for t in targets.values())
    if budget is not None:
        _plan_budget(layers, budget, layer_params_before)
    else:
        _plan_ranks(layers, wanted, report, threshold)

    # Everything was checked above: from here on the model changes.
    for name, layer in layers.items():
        reason = _why_not_at_rank(layer, threshold, explicit=name in wanted or budget is not None)
        if reason is not None:
            details[name] = _kept(model, name, layer.target, reason, layer)
            continue
        a, b = _factors(layer, method, report)
        new = low_rank_from_dense(layer.target.module, a, b)
        _set_submodule(model, name, new)
        approx = new.dense_weight().detach().to(layer.weight)
        details[name] = LayerFactorization(
            name=name,
            kind=layer.target.kind,
            out_features=layer.shape[0],
            in_features=layer.shape[1],
            replaced=True,
            rank=layer.rank,
            relative_error=_relative_error(layer, approx),
            params_before=parameter_count(layer.target),
            params_after=sum(p.numel() for p in new.parameters()),
        )
    disable_dense_fast_paths(model)

    return FactorizationResult(
        method=method,
        threshold=threshold,
        param_budget=budget,
        params_before=params_before,
        params_after=_count_parameters(model),
        layer_params_before=layer_params_before,
        layer_params_after=sum(details[name].params_after for name in targets),
        details={name: details[name] for name in [*targets, *unselectable] if name in details},
    )


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return method


def _check_budget(param_budget: float | None) -> float | None:
    if param_budget is None:
        return None
    if isinstance(param_budget, bool) or not isinstance(param_budget, (int, float)) or not 0 < param_budget <= 1:
        raise ValueError(
            f"`param_budget` must be a fraction in (0, 1] of the selected layers' parameters to keep, got {param_budget!r}"
        )
    return float(param_budget)


def _resolve_ranks(ranks: RankSpec, targets: dict[str, Target]) -> dict[str, int]:
    """``{layer: rank}`` from an int or ``{name or regex: rank}`` (an exact or dotted-suffix name wins,
    else the first regex in order that fully matches); every key must match a selected layer."""
    if ranks is None:
        return {}
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        chosen = {name: ranks for name in targets}
    elif isinstance(ranks, Mapping):
        chosen = {}
        patterns = []
        for key, rank in ranks.items():
            if not isinstance(key, str):
                raise TypeError(f"`ranks` keys must be layer names or regexes (str), got {key!r}")
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
        for name in targets:
            exact = [key for key, _ in patterns if name == key or name.endswith("." + key)]
            regex = [key for key, pattern in patterns if pattern is not None and pattern.fullmatch(name)]
            key = (exact or regex or [None])[0]
            if key is not None:
                chosen[name] = ranks[key]
    else:
        raise TypeError(f"`ranks` must be None, an int or a dict {{name or regex: rank}}, got {type(ranks).__name__}")
    for name, rank in chosen.items():
        out, fan_in = weight_matrix(targets[name])[0].shape
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out, fan_in):
            raise ValueError(
                f"`ranks` gives layer {name!r} rank {rank!r}; it must be an int in [1, min(out, fan_in)] = "
                f"[1, {min(out, fan_in)}] for its {out} x {fan_in} weight"
            )
    return chosen


def _key_matches(name: str, key: str, pattern: re.Pattern | None) -> bool:
    return name == key or name.endswith("." + key) or (pattern is not None and pattern.fullmatch(name) is not None)


def _why_not_replaceable(
    name: str, target: Target, stats: ActivationStatistics | None, shared: dict[int, list[str]], factorized: set[str]
) -> str | None:
    """Why ``target`` cannot be swapped at all, or ``None``; raises when statistics are missing for it."""
    parent = name.rpartition(".")[0]
    if parent in factorized:
        return f"a factor of the already factorized layer {parent!r}"
    if target.kind == "mha_in_proj":
        return (
            "the packed in_proj of nn.MultiheadAttention is used inside the attention forward, not called as a "
            "module, so it cannot be swapped for a low-rank module"
        )
    if low_rank_type(target.module) is None:
        return f"{type(target.module).__name__} has no low-rank replacement"
    owners = shared.get(id(target.module.weight), [])
    if len(owners) > 1:
        others = [owner for owner in owners if owner != name]
        return f"its weight is shared with {', '.join(others)} (tied); replacing it would untie them"
    if name == "":
        return "the model itself is this layer: factorize a model that contains it"
    if stats is not None:
        if name in stats.skipped:
            return f"no statistics: {stats.skipped[name]}"
        if name not in stats:
            raise ValueError(
                f"`stats` has no statistics for the selected layer {name!r}: collect them with the same "
                "`target_modules`/`exclude_modules`, or leave the layer out with `exclude_modules`"
            )
        fan_in = weight_matrix(target)[0].shape[1]
        if stats[name].dim != fan_in:
            raise ValueError(
                f"`stats` for layer {name!r} has inputs of length {stats[name].dim}, but its fan_in is {fan_in}: "
                "pass the statistics collected on this model"
            )
    return None


def _prepare(
    name: str, target: Target, stats: ActivationStatistics | None, eigen: dict[str, tuple[Tensor, Tensor]]
) -> _Layer:
    """float64 weight and (shared, decomposed once per distinct input) moment of one layer."""
    weight = weight_matrix(target)[0].detach()
    if stats is None:
        return _Layer(target, weight.double(), None, None, None, None)
    key = stats.sources[name]
    inputs = stats.inputs[key]
    moment = inputs.second_moment()
    if key not in eigen:
        eigen[key] = descending_eigh(moment, inputs.dim * torch.finfo(inputs.gram.dtype).eps)
    values, vectors = eigen[key]
    return _Layer(target, weight.to(moment), moment, values, vectors, inputs.mean())


def _plan_ranks(layers: dict[str, _Layer], wanted: dict[str, int], report: Any, threshold: float) -> None:
    """Set each layer's rank: the one asked for, else the analyzed utilized rank (data-free: of ``W W^T``)."""
    for name, layer in layers.items():
        if name in wanted:
            layer.rank = wanted[name]
        elif report is not None:
            layer.rank = report.layers[name].rank
        else:
            layer.rank = int(energy_rank(torch.linalg.svdvals(layer.weight).square(), threshold))


def _plan_budget(layers: dict[str, _Layer], budget: float, base: int) -> None:
    """Set each layer's rank so that the selected layers keep at most ``budget * base`` parameters."""
    allowed = math.floor(budget * base)
    fits = {name: layer for name, layer in layers.items() if _break_even_rank(*layer.shape) >= 1}
    needed = base - allowed
    if needed <= 0:
        return
    smallest = base - sum(o * i - (o + i) for o, i in (layer.shape for layer in fits.values()))
    if smallest > allowed:
        raise ValueError(
            f"`param_budget`={budget} keeps {allowed:,} of the selected layers' {base:,} parameters, but even rank 1 "
            f"in every replaceable layer leaves {smallest:,}; use a param_budget of at least {smallest / base:.4f}"
        )
    chosen = allocate_ranks(
        {name: layer.error_curve().tolist() for name, layer in fits.items()},
        {name: layer.shape for name, layer in fits.items()},
        needed,
    )
    for name, layer in layers.items():
        layer.rank = chosen[name] if name in fits else 1  # rank 1 does not save: reported as such


def _why_not_at_rank(layer: _Layer, threshold: float, explicit: bool) -> str | None:
    out, fan_in = layer.shape
    if layer.rank is None:
        return "the parameter budget is met without factorizing this layer"
    if layer.rank == 0:
        return f"utilized rank 0 at threshold {threshold}: the layer's output carries no energy on the collected data"
    if layer.rank * (out + fan_in) >= out * fan_in:
        source = "" if explicit else f" (utilized rank at threshold {threshold})"
        return (
            f"rank {layer.rank}{source} needs {layer.rank * (out + fan_in):,} weight parameters as factors, "
            f"not fewer than the {out * fan_in:,} of the dense {out} x {fan_in} weight"
        )
    return None


def _factors(layer: _Layer, method: str, report: Any) -> tuple[Tensor, Tensor]:
    rank = layer.rank
    if method == "svd":
        return svd_factors(layer.weight, rank)
    if method == "whiten":
        u = layer.whitened()[0][:, :rank]
        return _balanced(u, u.t() @ layer.weight)
    out, fan_in = layer.shape
    analyzed = report.layers[layer.target.name]
    bias = weight_matrix(layer.target)[1]
    bias = bias.detach().to(layer.weight) if bias is not None else None
    out_vectors = _output_basis(layer, bias)
    in_rank = min(max(analyzed.in_rank, rank), fan_in)
    out_rank = min(max(analyzed.out_rank, rank), out_vectors.shape[1])
    return projection_factors(layer.weight, layer.vectors, out_vectors, in_rank, out_rank, rank)


def _output_basis(layer: _Layer, bias: Tensor | None) -> Tensor:
    """Eigenvectors of the output moment ``C_y``, largest first (from its factor's SVD when the layer widens)."""
    out, fan_in = layer.shape
    if out > fan_in + 1:
        factor = output_factor(layer.weight, bias, layer.values, layer.vectors, layer.mean)
        return torch.linalg.svd(factor, full_matrices=False).U
    return torch.linalg.eigh(output_moment(layer.weight, bias, layer.moment, layer.mean)).eigenvectors.flip(-1)


def _relative_error(layer: _Layer, approx: Tensor) -> float | None:
    if layer.moment is None:
        return None
    energy = output_error(layer.weight, torch.zeros_like(layer.weight), layer.moment)
    error = output_error(layer.weight, approx, layer.moment).clamp(min=0)  # float32 sums make C slightly indefinite
    return float(error / energy) if energy > 0 else 0.0


def _kept(model: nn.Module, name: str, target: Target | None, reason: str, layer: _Layer | None = None) -> LayerFactorization:
    """The entry of a layer left as it is."""
    if target is not None:
        (out, fan_in), kind, params = weight_matrix(target)[0].shape, target.kind, parameter_count(target)
    else:
        try:
            module = model.get_submodule(name)
        except AttributeError:  # e.g. "attn.in_proj", which names no module
            module = None
        weight = getattr(module, "weight", None)
        kind = (layer_kind(module) or type(module).__name__) if module is not None else None
        out, fan_in = (None, None)
        if isinstance(weight, Tensor) and weight.dim() >= 2:
            out, fan_in = weight.shape[0], weight[0].numel()
        params = sum(p.numel() for p in module.parameters(recurse=False)) or None if module is not None else None
    return LayerFactorization(
        name=name,
        kind=kind,
        out_features=out,
        in_features=fan_in,
        replaced=False,
        rank=layer.rank if layer is not None else None,
        relative_error=0.0 if layer is not None and layer.moment is not None else None,
        params_before=params,
        params_after=params,
        reason=reason,
    )


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> names of the modules holding it``, to spot tied weights."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    return owners


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- load_factorized ---------------------------------------------------------------------------
def load_factorized(model: nn.Module, state_dict_or_path: Mapping[str, Any] | str | os.PathLike) -> nn.Module:
    """Swap in low-rank layers wherever the state dict has ``<layer>.first.weight`` / ``<layer>.second.weight``,
    with the ranks its shapes say, then load it strictly; returns ``model``.

    Accepts a state dict, a checkpoint dict, or a path to either (a Lightning checkpoint's
    ``"state_dict"`` is used as-is, so load it into the LightningModule itself). Files are read with
    ``torch.load(..., weights_only=True)``.
    """
    state = _read_state_dict(state_dict_or_path)
    rebuild_factorized_(model, state)
    model.load_state_dict(state, strict=True)
    return model


def rebuild_factorized_(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, int]:
    """Give ``model`` the factorized structure ``state_dict`` has, without loading any value.

    Each layer with ``<name>.first.weight`` and ``<name>.second.weight`` in the state dict becomes a
    low-rank layer of the rank their shapes say (placeholder zeros until the state dict is loaded).
    Returns ``{name: rank}`` of the layers swapped; layers already of that structure are left as they are.
    """
    modules = dict(model.named_modules())
    rebuilt: dict[str, int] = {}
    for key in list(state_dict):
        if not key.endswith(".first.weight"):
            continue
        name = key[: -len(".first.weight")]
        second = state_dict.get(f"{name}.second.weight")
        module = modules.get(name)
        if second is None or module is None:
            continue  # not ours: a strict load reports what does not fit
        first = state_dict[key]
        if isinstance(module, LOW_RANK_TYPES):
            if module.first.weight.shape == first.shape and module.second.weight.shape == second.shape:
                continue
            module = module.to_dense()
        if low_rank_type(module) is None:
            continue
        dense_weight = weight_matrix(Target(name, module, layer_kind(module)))[0]
        out, fan_in = dense_weight.shape
        rank = first.shape[0]
        fits = first[0].numel() == fan_in and second.shape[0] == out and second[0].numel() == rank
        if not fits or not 1 <= rank <= min(out, fan_in):
            raise ValueError(
                f"the state dict's factors for layer {name!r} ({tuple(first.shape)} and {tuple(second.shape)}) do not "
                f"fit the model's {type(module).__name__} with out={out}, fan_in={fan_in}: is it the right model?"
            )
        placeholder = dense_weight.new_zeros(out, rank), dense_weight.new_zeros(rank, fan_in)
        _set_submodule(model, name, low_rank_from_dense(module, *placeholder))
        rebuilt[name] = rank
    disable_dense_fast_paths(model)
    return rebuilt


def _read_state_dict(source: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping):
        raise TypeError(
            f"`state_dict_or_path` must be a state dict, a checkpoint dict or a path, got {type(source).__name__}"
        )
    if isinstance(source.get("state_dict"), Mapping):
        return source["state_dict"]
    return source
