"""Plan, then apply: ``plan_factorization`` decides ranks and builds low-rank modules, ``plan.apply_`` swaps them in.

``plan_factorization`` reads the model and the statistics and changes neither: it returns a
:class:`FactorizationPlan` holding the new modules. ``plan.apply_(model)`` swaps every planned layer in,
or none when one swap fails. ``factorize_`` is the two in sequence. Per-layer spectra, ranks and factors
come from :mod:`~lightning_rank.compress.planning`, the math from :mod:`~lightning_rank.compress.factors`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor, nn

from lightning_rank.checks import (
    RankSpec,
    check_allocation,
    check_budget,
    check_method,
    check_rank_choice,
    check_ranks,
    check_threshold,
)
from lightning_rank.compress.layers import disable_dense_fast_paths, low_rank_from_dense
from lightning_rank.compress.planning import (
    Replaceable,
    check_budget_feasible,
    decompositions,
    factors,
    plan_budget,
    plan_ranks,
    relative_output_error,
    resolve_ranks,
    why_not_at_rank,
)
from lightning_rank.compress.refactor import dense_stand_ins, onto_pairs
from lightning_rank.compress.results import FactorizationResult, LayerFactorization
from lightning_rank.compress.selection import factorization_targets, shared_weights, why_not_replaceable
from lightning_rank.compress.sharing import PlanOwners, owned_decompositions, owned_modules, replaceable_reasons
from lightning_rank.spectral.progress import progress_bar
from lightning_rank.stats.collect import ForwardFn
from lightning_rank.stats.sums import ActivationStatistics
from lightning_rank.targets import (
    ModuleSelector,
    Target,
    get_submodule,
    layer_kind,
    layer_shape,
    parameter_count,
    set_submodule,
)


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
        disable_dense_fast_paths(model)
        return self.result


def plan_factorization(
    model: nn.Module,
    stats: ActivationStatistics | None,
    *,
    threshold: float = 0.99,
    method: str = "whiten",
    ranks: RankSpec = None,
    param_budget: float | None = None,
    macs_budget: float | None = None,
    target_modules: ModuleSelector = None,
    exclude_modules: ModuleSelector = None,
    allocation: str = "auto",
    calibration: Iterable[Any] | None = None,
    forward: ForwardFn | None = None,
    progress: bool = True,
    refactorize: bool = False,
    reduce: Callable[[Tensor], None] | None = None,
    owners: PlanOwners | None = None,
) -> FactorizationPlan:
    """Decide the ranks of the selected layers and build their low-rank replacements; ``model`` is not changed.

    Ranks are the utilized ranks :func:`~lightning_rank.analyze` reports at ``threshold`` by default,
    or ``ranks`` (one int for all, or ``{name or regex: rank}``; a layer it does not name keeps its
    threshold rank), or allocated to keep ``param_budget`` (a fraction in (0, 1]) of the replaceable
    layers' parameters or ``macs_budget`` of their multiply-adds per example (at most one of ``ranks``,
    ``param_budget``, ``macs_budget``). Layers that can never be replaced (tied weights,
    ``nn.MultiheadAttention`` projections, layers without statistics) are out of a budget's base and
    listed with the reason in ``result.details``.

    A budget is shared out end to end by default: ``allocation="auto"`` (see
    :func:`~lightning_rank.compress.planning.plan_budget`) lets the model's own output on a few calibration
    batches decide where rank matters, never worse there than one common error tolerance on every layer
    (``"uniform"``). The calibration batches are, by default, the first ones :func:`~lightning_rank.collect` ran
    (``stats.calibration``, run through ``forward`` or else the ``forward`` collect was given), so the plain
    ``factorize_(model, stats, param_budget=0.5)`` allocates as ``RankCompression`` does; ``calibration=``
    (a few batches the model's ``forward`` takes) replaces them. ``allocation="uniform"`` opts out (no
    forward or backward pass); ``calibration=[]`` too, as there is then no batch to calibrate on.
    ``result.allocation`` names the rule that decided. ``macs_budget`` needs calibration batches to count
    each layer's output positions. ``method``: ``"whiten"`` (default, as in ``RankCompression``: the least output error on the
    data), ``"projection"`` (the paper's ``P_T W P_S``) or ``"svd"`` (data-free). With statistics, ranks never
    depend on ``method``; only the factors do. A layer
    is replaced only where ``rank * (out + fan_in) < out * fan_in``. ``progress``: progress bars on
    stderr for the eigenproblems and the factors when they take more than a few seconds.

    The selected layers are those ``stats`` holds (as in ``analyze``), or every supported layer of the
    model when ``stats`` is None; ``target_modules`` / ``exclude_modules`` narrow them as in
    :func:`~lightning_rank.collect`. A layer that is already factorized raises a ``ValueError``, unless
    ``refactorize``: then a pair ``A B`` is planned as its dense product (budgets stay fractions of the
    dense-equivalent layers), and the plan replaces it by a pair of lower rank, or leaves it as it is
    (see :mod:`~lightning_rank.compress.refactor`); progressive compression plans each step this way.

    ``reduce``: an in-place sum over processes (e.g. ``torch.distributed.all_reduce``) when each process calls
    this with the same model and statistics but its own ``calibration`` batches (at least one each): the probe
    then sums what it measures over all of them, so every process decides the same ranks (``RankCompression``
    passes one under DDP). ``owners``: which process holds each layer's statistics, when each process's ``stats``
    hold only its own layers' sums (and name every layer): each owner then decomposes and factorizes its layers and
    sends every process what it needs (:mod:`~lightning_rank.compress.sharing`), so all build the same plan; with
    per-process ``calibration`` it needs ``reduce`` too, or the processes would decide different ranks. Each process
    then calibrates on as many batches as the process with fewest passed (none if one passed none).
    """
    if refactorize:
        options = {k: v for k, v in locals().items() if k not in ("model", "stats", "refactorize")}
        with dense_stand_ins(model) as pairs:
            plan = plan_factorization(model, stats, **options)
        onto_pairs(plan.modules, plan.replaced, plan.result, pairs, model)
        return plan
    method = check_method(method)
    threshold = check_threshold(threshold)
    ranks, budget, macs = check_rank_choice(ranks, param_budget, macs_budget)
    allocation = check_allocation(allocation)
    if stats is None and method != "svd":
        raise ValueError(
            f"method={method!r} needs `stats`: collect them with lr.collect(model, batches), or use method='svd'"
        )
    if stats is not None and not isinstance(stats, ActivationStatistics):
        raise TypeError(f"`stats` must be ActivationStatistics from lr.collect or None, got {type(stats).__name__}")
    if calibration is not None:
        calibration = list(calibration) or None  # []: no calibration batches, not even those `stats` kept
    elif stats is not None and stats.calibration and (allocation != "uniform" or macs is not None):
        # the first batches lr.collect ran, with its forward (uniform tolerance needs them only to count MACs)
        calibration, forward = list(stats.calibration), forward or stats.forward
    if owners is not None:  # as many batches on every process: the probe meets each layer's owner once a batch
        batches = calibration or []
        calibration = batches[: min(owners.gather(len(batches)))] or None
    if macs is not None and not calibration:
        raise ValueError("`macs_budget` needs calibration batches to count each layer's output positions per example: "
                         "statistics from lr.collect keep their first batches, or pass `calibration=` (a few batches)")
    if allocation == "probe" and not calibration:
        raise ValueError("allocation='probe' needs calibration batches: statistics from lr.collect keep their first "
                         "batches, or pass `calibration=` (a few batches the model's forward takes)")

    targets, unselectable = factorization_targets(model, stats, target_modules, exclude_modules)
    wanted = resolve_ranks(ranks, targets)
    details = {name: _kept(model, name, None, reason) for name, reason in unselectable.items()}
    shared = shared_weights(model)
    replaceable: dict[str, Target] = {}
    for name, reason in replaceable_reasons(targets, stats, shared, owners).items():
        if reason is not None:
            details[name] = _kept(model, name, targets[name], reason)
        else:
            replaceable[name] = targets[name]

    budgeted = budget is not None or macs is not None
    if budgeted and not replaceable:
        reasons = "; ".join(f"{name}: {entry.reason}" for name, entry in details.items())
        raise ValueError(f"no selected layer can be factorized, so no budget can be met ({reasons or 'no layer'})")
    needs_ranks = not budgeted and any(name not in wanted for name in replaceable)
    if owners is None:
        spectra = decompositions(model, stats, replaceable, threshold, needs_ranks, method == "projection", progress)
    else:
        spectra = owned_decompositions(model, stats, replaceable, owners, threshold, needs_ranks, method == "projection",
                                       budgeted, progress)
    layers = {name: Replaceable(target, spectra[name]) for name, target in replaceable.items()}
    layer_params_before = sum(parameter_count(t) for t in targets.values())
    allocated = None
    if budgeted:
        allocated = plan_budget(model, layers, param_budget=budget, macs_budget=macs, allocation=allocation,
                                calibration=calibration, forward=forward, method=method, reduce=reduce)
    else:
        plan_ranks(layers, wanted, threshold)

    modules: dict[str, nn.Module] = {}
    unit = allocated.unit if allocated is not None else "params"
    built = None if owners is None else owned_modules(model, layers, [
        name for name, layer in layers.items() if why_not_at_rank(layer, threshold, name in wanted or budgeted, unit)
        is None], method, owners)
    with progress_bar("factors", enabled=progress, total=len(layers), unit="layer") as bar:
        for name, layer in layers.items():
            _plan_layer(model, name, layer, method, threshold, name in wanted or budgeted, allocated, modules, details,
                        None if built is None else built.get(name))
            bar.update()

    params_before = _count_parameters(model)
    removed = sum(p.numel() for name in modules for p in targets[name].module.parameters())
    result = FactorizationResult(
        method=method,
        threshold=threshold,
        param_budget=budget,
        macs_budget=macs,
        allocation=allocated.rule if allocated is not None else None,
        params_before=params_before,
        params_after=params_before - removed + sum(p.numel() for m in modules.values() for p in m.parameters()),
        layer_params_before=layer_params_before,
        layer_params_after=sum(details[name].params_after for name in targets),
        details={name: details[name] for name in [*targets, *unselectable] if name in details},
    )
    return FactorizationPlan(modules, result, {name: targets[name].module for name in modules})


def factorize_(model: nn.Module, stats: ActivationStatistics | None, **options: Any) -> FactorizationResult:
    """Replace the selected layers of ``model`` in place by low-rank factors; returns what was done.

    :func:`plan_factorization` with the same arguments, then :meth:`FactorizationPlan.apply_`: either every
    planned layer is replaced, or, on an error, none. A ``param_budget`` (or ``macs_budget``) is shared out by
    the model's own output on the batches ``stats`` kept (``stats.calibration``, the first ones
    :func:`~lightning_rank.collect` ran) unless ``calibration=`` gives others; ``allocation="uniform"`` opts out.

    >>> import torch, lightning_rank as lr
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> stats = lr.collect(model, [torch.randn(128, 64) for _ in range(4)])
    >>> result = lr.factorize_(model, stats, param_budget=0.5, progress=False)
    >>> result.allocation, result.layer_params_after <= 0.5 * result.layer_params_before  # on stats.calibration
    ('probe', True)
    """
    return plan_factorization(model, stats, **options).apply_(model)


factorize_.__signature__ = inspect.signature(plan_factorization).replace(  # type: ignore[attr-defined]
    return_annotation="FactorizationResult"
)


def check_factorization(
    model: nn.Module,
    *,
    ranks: RankSpec = None,
    param_budget: float | None = None,
    target_modules: ModuleSelector = None,
    exclude_modules: ModuleSelector = None,
    refactorize: bool = False,
) -> None:
    """Raise now what :func:`plan_factorization` would raise later for any statistics of ``model``.

    Checks that the selectors match layers, that every ``ranks`` key names a selected layer with a
    rank that fits it, that no selected layer is already factorized, and that ``param_budget`` can be
    met with rank 1 in every replaceable layer (layers the data never reach can only make it harder).
    ``refactorize``: low-rank pairs count as the dense layers they stand for, as in :func:`plan_factorization`.
    """
    if refactorize:
        with dense_stand_ins(model):
            return check_factorization(model, ranks=ranks, param_budget=param_budget, target_modules=target_modules,
                                       exclude_modules=exclude_modules)
    budget = check_budget(param_budget)
    ranks = check_ranks(ranks, budget)
    targets, _ = factorization_targets(model, None, target_modules, exclude_modules)
    resolve_ranks(ranks, targets)
    shared = shared_weights(model)
    replaceable = {name: t for name, t in targets.items() if why_not_replaceable(name, t, None, shared) is None}
    if budget is not None:
        shapes = {name: layer_shape(t) for name, t in replaceable.items()}
        check_budget_feasible(shapes, budget, sum(parameter_count(t) for t in replaceable.values()))


def _plan_layer(
    model: nn.Module,
    name: str,
    layer: Replaceable,
    method: str,
    threshold: float,
    explicit: bool,
    allocated: Any,
    modules: dict[str, nn.Module],
    details: dict[str, LayerFactorization],
    built: tuple[nn.Module, float | None] | None = None,
) -> None:
    """Build one layer's low-rank replacement into ``modules`` (or say why not), and its entry in ``details``;
    ``built``: the module and its relative output error, when the layer's owner planned it."""
    reason = why_not_at_rank(layer, threshold, explicit, allocated.unit if allocated is not None else "params")
    if reason is not None:
        details[name] = _kept(model, name, layer.target, reason, layer)
    elif built is not None:
        modules[name] = built[0]
        details[name] = _replaced(layer, modules[name], built[1])
    else:
        modules[name] = low_rank_from_dense(layer.target.module, *factors(layer, method))
        details[name] = _replaced(layer, modules[name])
    if allocated is not None and name in allocated.layers:
        chosen = allocated.layers[name]
        details[name] = replace(details[name], energy_kept=chosen.energy_kept, sensitivity=chosen.sensitivity)


def _replaced(layer: Replaceable, new: nn.Module, error: float | None = None) -> LayerFactorization:
    """The entry of a layer the plan replaces by ``new`` (``error``: its relative output error, when its owner sent
    it)."""
    if error is None:
        error = relative_output_error(layer, new.dense_weight().detach().to(layer.weight))
    return LayerFactorization(
        name=layer.target.name,
        kind=layer.target.kind,
        out_features=layer.shape[0],
        in_features=layer.shape[1],
        replaced=True,
        rank=layer.rank,
        relative_error=error,
        params_before=parameter_count(layer.target),
        params_after=sum(p.numel() for p in new.parameters()),
    )


def _kept(
    model: nn.Module, name: str, target: Target | None, reason: str, layer: Replaceable | None = None
) -> LayerFactorization:
    """The entry of a layer left as it is."""
    if target is not None:
        (out, fan_in), kind, params = layer_shape(target), target.kind, parameter_count(target)
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
        relative_error=0.0 if layer is not None and layer.spectra.measured else None,
        params_before=params,
        params_after=params,
        reason=reason,
    )


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
