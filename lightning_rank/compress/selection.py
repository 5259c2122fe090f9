"""Which layers factorization takes, which of them it may replace, and why the others may not.

Shared by the planner (:func:`~lightning_rank.compress.factorize.plan_factorization`) and its early checks
(:func:`~lightning_rank.compress.factorize.check_factorization`).
"""

from __future__ import annotations

from torch import nn

from lightning_rank.compress.layers import LOW_RANK_TYPES, low_rank_type
from lightning_rank.stats.sums import ActivationStatistics
from lightning_rank.targets import ModuleSelector, Target, layer_shape, named_modules, select_targets


def factorization_targets(
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


def why_not_replaceable(
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
        if stats[name].empty_reason() is not None:
            return f"no statistics: {stats[name].empty_reason()}"
        fan_in = layer_shape(target)[1]
        if stats[name].dim != fan_in:
            raise ValueError(
                f"`stats` for layer {name!r} has inputs of length {stats[name].dim}, but its fan_in is {fan_in}: "
                "pass the statistics collected on this model"
            )
    return None


def shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> names of the modules holding it``, to spot tied weights."""
    owners: dict[int, list[str]] = {}
    for name, module in named_modules(model, remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    return owners
