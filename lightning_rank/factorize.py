"""Plan, then apply: ``plan_factorization`` decides ranks and builds low-rank modules, ``plan.apply_`` swaps them in.

``plan_factorization`` reads the model and the statistics and changes neither: it returns a
:class:`FactorizationPlan` holding the new modules. ``plan.apply_(model)`` swaps every planned layer in,
or none when one swap fails. ``factorize_`` is the two in sequence. The math (factors, output errors,
rank allocation under a budget) is in :mod:`lightning_rank.factors`; per-layer spectra, ranks
and factors in :mod:`lightning_rank.ranks`; rebuilding a factorized structure from a state dict in
:mod:`lightning_rank.structure`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_rank.checks import RankSpec, check_budget, check_method, check_ranks, check_threshold
from lightning_rank.factors import (  # noqa: F401  (re-exported: their home before the split)
    allocate_ranks,
    output_error,
    projection_factors,
    svd_factors,
    tail_curve,
    whiten_factors,
)
from lightning_rank.layers import LOW_RANK_TYPES, low_rank_from_dense, low_rank_type
from lightning_rank.ranks import (
    Replaceable,
    check_budget_feasible,
    decompositions,
    factors,
    plan_budget,
    plan_ranks,
    relative_error,
    resolve_ranks,
    why_not_at_rank,
)
from lightning_rank.statistics import ActivationStatistics
from lightning_rank.structure import load_factorized, rebuild_factorized_  # noqa: F401
from lightning_rank.targets import (
    LayerKind,
    ModuleSelector,
    Target,
    get_submodule,
    layer_kind,
    named_modules,
    set_submodule,
    parameter_count,
    select_targets,
    weight_matrix,
)


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerFactorization:
    """What happened to one selected layer.

    ``rank`` is the rank planned for it (``None`` when none was), ``relative_error`` the output error
    ``E||(W - W') x||^2 / E||W x||^2`` of the layer as it now is, from the statistics (0.0 when left
    dense, ``None`` without statistics), ``reason`` why it was not replaced.
    """

    name: str
    kind: LayerKind | None
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



# -- what was planned ----------------------------------------------------------------------------
@dataclass
class FactorizationPlan:
    """What :func:`plan_factorization` decided: the new low-rank modules, and the result of applying them.

    ``modules`` maps each layer to replace to its new module; ``result`` is what :meth:`apply_` returns
    (``result.layers`` the ranks, ``result.details`` every selected layer). Planning leaves the model as
    it was; the plan remembers the modules it replaces, so it applies only to that model.
    """

    modules: dict[str, nn.Module]
    result: FactorizationResult
    replaced: dict[str, nn.Module] = field(repr=False)

    @property
    def layers(self) -> dict[str, int]:
        """``{name: rank}`` of the layers the plan replaces."""
        return self.result.layers

    def apply_(self, model: nn.Module) -> FactorizationResult:
        """Swap every planned layer into ``model``, or none: if a swap fails, the swapped ones are put back.

        Raises ``ValueError`` when ``model`` no longer holds the modules the plan was made from.
        """
        for name, original in self.replaced.items():
            try:
                current = get_submodule(model, name)
            except AttributeError:
                current = None
            if current is not original:
                raise ValueError(
                    f"the plan replaces layer {name!r}, but `model` holds another module there: apply a plan to the "
                    "model it was made from, before changing that model"
                )
        done: list[str] = []
        try:
            for name, module in self.modules.items():
                set_submodule(model, name, module)
                done.append(name)
        except BaseException:
            for name in reversed(done):
                set_submodule(model, name, self.replaced[name])
            raise
        return self.result


def plan_factorization(
    model: nn.Module,
    stats: ActivationStatistics | None,
    *,
    threshold: float = 0.99,
    method: str = "projection",
    ranks: RankSpec = None,
    param_budget: float | None = None,
    target_modules: ModuleSelector = None,
    exclude_modules: ModuleSelector = None,
) -> FactorizationPlan:
    """Decide the ranks of the selected layers and build their low-rank replacements; ``model`` is not changed.

    Ranks are the utilized ranks :func:`~lightning_rank.analyze` reports at ``threshold`` by default,
    or ``ranks`` (one int for all, or ``{name or regex: rank}``; a layer it does not name keeps its
    threshold rank), or chosen to keep ``param_budget`` (a fraction in (0, 1]) of the selected layers'
    parameters, removing rank where it loses the least output energy (relative to each layer's) per
    parameter saved. With statistics, ranks never depend on ``method``; only the factors do.
    A layer is replaced only where ``rank * (out + fan_in) < out * fan_in``.

    The selected layers are those ``stats`` holds (as in ``analyze``), or every supported layer of the
    model when ``stats`` is None; ``target_modules`` / ``exclude_modules`` narrow them as in
    :func:`~lightning_rank.collect`. A layer that is already factorized raises a ``ValueError``.
    """
    method = check_method(method)
    threshold = check_threshold(threshold)
    budget = check_budget(param_budget)
    ranks = check_ranks(ranks, budget)
    if stats is None and method != "svd":
        raise ValueError(
            f"method={method!r} needs `stats`: collect them with lr.collect(model, batches), or use method='svd'"
        )
    if stats is not None and not isinstance(stats, ActivationStatistics):
        raise TypeError(f"`stats` must be ActivationStatistics from lr.collect or None, got {type(stats).__name__}")

    targets, unselectable = _select(model, stats, target_modules, exclude_modules)
    wanted = resolve_ranks(ranks, targets)
    details = {name: _kept(model, name, None, reason) for name, reason in unselectable.items()}
    shared = _shared_weights(model)
    replaceable: dict[str, Target] = {}
    for name, target in targets.items():
        reason = _why_not_replaceable(name, target, stats, shared)
        if reason is not None:
            details[name] = _kept(model, name, target, reason)
        else:
            replaceable[name] = target

    needs_ranks = budget is None and any(name not in wanted for name in replaceable)
    spectra = decompositions(model, stats, replaceable, threshold, needs_ranks, method == "projection")
    layers = {name: Replaceable(target, spectra[name]) for name, target in replaceable.items()}
    layer_params_before = sum(parameter_count(t) for t in targets.values())
    if budget is not None:
        base = sum(parameter_count(layer.target) for layer in layers.values())
        plan_budget(layers, budget, base)
    else:
        plan_ranks(layers, wanted, threshold)

    modules: dict[str, nn.Module] = {}
    for name, layer in layers.items():
        reason = why_not_at_rank(layer, threshold, explicit=name in wanted or budget is not None)
        if reason is not None:
            details[name] = _kept(model, name, layer.target, reason, layer)
            continue
        modules[name] = low_rank_from_dense(layer.target.module, *factors(layer, method))
        details[name] = _replaced(layer, modules[name])

    params_before = _count_parameters(model)
    removed = sum(p.numel() for name in modules for p in targets[name].module.parameters())
    result = FactorizationResult(
        method=method,
        threshold=threshold,
        param_budget=budget,
        params_before=params_before,
        params_after=params_before - removed + sum(p.numel() for m in modules.values() for p in m.parameters()),
        layer_params_before=layer_params_before,
        layer_params_after=sum(details[name].params_after for name in targets),
        details={name: details[name] for name in [*targets, *unselectable] if name in details},
    )
    return FactorizationPlan(modules, result, {name: targets[name].module for name in modules})


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

    :func:`plan_factorization` (see there for every argument), then :meth:`FactorizationPlan.apply_`:
    either every planned layer is replaced, or, on an error, none.
    """
    plan = plan_factorization(
        model,
        stats,
        threshold=threshold,
        method=method,
        ranks=ranks,
        param_budget=param_budget,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
    )
    return plan.apply_(model)


def check_factorization(
    model: nn.Module,
    *,
    ranks: RankSpec = None,
    param_budget: float | None = None,
    target_modules: ModuleSelector = None,
    exclude_modules: ModuleSelector = None,
) -> None:
    """Raise now what :func:`plan_factorization` would raise later for any statistics of ``model``.

    Checks that the selectors match layers, that every ``ranks`` key names a selected layer with a
    rank that fits it, that no selected layer is already factorized, and that ``param_budget`` can be
    met with rank 1 in every replaceable layer (layers the data never reach can only make it harder).
    """
    budget = check_budget(param_budget)
    ranks = check_ranks(ranks, budget)
    targets, _ = _select(model, None, target_modules, exclude_modules)
    resolve_ranks(ranks, targets)
    shared = _shared_weights(model)
    replaceable = {name: t for name, t in targets.items() if _why_not_replaceable(name, t, None, shared) is None}
    if budget is not None:
        shapes = {name: tuple(weight_matrix(t)[0].shape) for name, t in replaceable.items()}
        check_budget_feasible(shapes, budget, sum(parameter_count(t) for t in replaceable.values()))


# -- selection -----------------------------------------------------------------------------------
def _select(
    model: nn.Module, stats: ActivationStatistics | None, target_modules: ModuleSelector, exclude_modules: ModuleSelector
) -> tuple[dict[str, Target], dict[str, str]]:
    """The selected layers ``(targets, unselectable name -> reason)``: those in ``stats`` unless ``target_modules``
    is given, every supported layer without statistics; raises for a layer that is already factorized."""
    targets, unselectable = select_targets(model, target_modules, exclude_modules)
    factorized = {name: m for name, m in named_modules(model) if isinstance(m, LOW_RANK_TYPES)}

    def check_not_factorized(name: str) -> None:
        owner = name if name in factorized else name.rpartition(".")[0]
        if owner in factorized:
            raise ValueError(
                f"layer {owner!r} is already factorized (rank {factorized[owner].rank}): factorization replaces dense "
                f"layers. Start from the dense model, or leave the layer out with `exclude_modules=[{owner!r}]`."
            )

    for name in targets:
        check_not_factorized(name)
    if stats is None or target_modules is not None:
        return targets, unselectable
    in_stats = {*stats.sources, *stats.skipped}
    everything = set().union(*select_targets(model))
    unknown = sorted(name for name in in_stats if name not in everything)
    for name in unknown:
        check_not_factorized(name)
    if unknown:
        raise ValueError(
            f"`stats` has layers that `model` does not have: {unknown}. Pass the model the statistics were collected on."
        )
    targets = {name: t for name, t in targets.items() if name in in_stats}
    return targets, {name: reason for name, reason in unselectable.items() if name in in_stats}


def _why_not_replaceable(
    name: str, target: Target, stats: ActivationStatistics | None, shared: dict[int, list[str]]
) -> str | None:
    """Why ``target`` cannot be swapped at all, or ``None``; raises when statistics are missing for it."""
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


def _replaced(layer: Replaceable, new: nn.Module) -> LayerFactorization:
    """The entry of a layer the plan replaces by ``new``."""
    return LayerFactorization(
        name=layer.target.name,
        kind=layer.target.kind,
        out_features=layer.shape[0],
        in_features=layer.shape[1],
        replaced=True,
        rank=layer.rank,
        relative_error=relative_error(layer, new.dense_weight().detach().to(layer.weight)),
        params_before=parameter_count(layer.target),
        params_after=sum(p.numel() for p in new.parameters()),
    )


def _kept(
    model: nn.Module, name: str, target: Target | None, reason: str, layer: Replaceable | None = None
) -> LayerFactorization:
    """The entry of a layer left as it is."""
    if target is not None:
        (out, fan_in), kind, params = weight_matrix(target)[0].shape, target.kind, parameter_count(target)
    else:
        try:
            module = get_submodule(model, name)
        except AttributeError:  # e.g. "attn.in_proj", which names no module
            module = None
        weight = getattr(module, "weight", None)
        kind = layer_kind(module) if module is not None else None
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
        relative_error=0.0 if layer is not None and layer.spectra.moment is not None else None,
        params_before=params,
        params_after=params,
        reason=reason,
    )


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> names of the modules holding it``, to spot tied weights."""
    owners: dict[int, list[str]] = {}
    for name, module in named_modules(model, remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    return owners


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
