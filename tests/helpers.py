"""Helpers shared by the tests (and the allocation benchmark) that reach into the planner's parts."""

from __future__ import annotations

from torch import nn

from lightning_rank.compress.candidates import LayerCandidate
from lightning_rank.compress.planning import Replaceable, candidate, decompositions
from lightning_rank.compress.selection import factorization_targets, shared_weights, why_not_replaceable
from lightning_rank.stats.sums import ActivationStatistics
from lightning_rank.targets import ModuleSelector


def layer_candidates(
    model: nn.Module, stats: ActivationStatistics, *, exclude_modules: ModuleSelector = None
) -> tuple[dict[str, LayerCandidate], dict[str, str]]:
    """The replaceable layers among those ``stats`` holds as allocation candidates, as the planner builds them, and
    ``{name: reason}`` of the layers left out of a budget's base."""
    targets, left_out = factorization_targets(model, stats, None, exclude_modules)
    left_out = dict(left_out)
    shared = shared_weights(model)
    replaceable = {}
    for name, target in targets.items():
        reason = why_not_replaceable(name, target, stats, shared)
        if reason is None:
            replaceable[name] = target
        else:
            left_out[name] = reason
    spectra = decompositions(model, stats, replaceable, 0.99, with_ranks=False, with_output_basis=False)
    candidates = {}
    for name, target in replaceable.items():
        entry = candidate(name, Replaceable(target, spectra[name]))
        if entry.max_rank < 1:
            left_out[name] = f"no rank saves parameters on its {entry.shape[0]} x {entry.shape[1]} weight"
        else:
            candidates[name] = entry
    return candidates, left_out
