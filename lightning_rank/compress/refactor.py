"""Re-factorization: plan a low-rank pair ``A B`` again, from its dense product, to a lower rank.

Progressive compression plans each step on the partly compressed model. A pair is planned as the dense
layer it stands for (``pair.to_dense()``, the same function), so ranks, budgets and the probe see exactly
what a dense layer would give; the new pair then replaces the old one at the same name, never nested.
Budgets therefore stay fractions of the dense-equivalent layers, i.e. of the original model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from torch import nn

from lightning_rank.compress.layers import LOW_RANK_TYPES
from lightning_rank.compress.results import FactorizationResult
from lightning_rank.targets import named_modules, set_submodule


@contextmanager
def dense_stand_ins(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Inside the block every low-rank pair of ``model`` is replaced by its dense equivalent; the pairs come back
    when it ends (also on an error). Yields ``{name: pair}`` of the pairs stood in for."""
    pairs = {name: module for name, module in named_modules(model) if isinstance(module, LOW_RANK_TYPES)}
    done: list[str] = []
    try:
        for name, pair in pairs.items():
            set_submodule(model, name, pair.to_dense())
            done.append(name)
        yield pairs
    finally:
        for name in reversed(done):
            set_submodule(model, name, pairs[name])


def onto_pairs(
    modules: dict[str, nn.Module],
    replaced: dict[str, nn.Module],
    result: FactorizationResult,
    pairs: dict[str, nn.Module],
    model: nn.Module,
) -> None:
    """Turn a plan made on the dense stand-ins (its ``modules``, ``replaced`` and ``result``, changed in place) into
    one for the model that holds ``pairs``.

    A pair is re-factorized only to a rank below its own (a higher rank adds nothing: ``A B`` has rank at most
    the pair's); otherwise it stays as it is, and so does a pair the plan would leave dense. The counts become
    the partly compressed model's: ``params_before`` is the model as it is, ``params_after`` as it will be."""
    details = dict(result.details)
    for name, pair in pairs.items():
        entry = details.get(name)
        if entry is None:
            continue
        count = sum(p.numel() for p in pair.parameters())
        new = modules.get(name)
        if new is not None and new.rank < pair.rank:
            replaced[name] = pair
            details[name] = replace(entry, params_before=count)
            continue
        modules.pop(name, None)
        replaced.pop(name, None)
        why = entry.reason if new is None else f"planned rank {new.rank} is not below it"
        details[name] = replace(entry, replaced=False, rank=pair.rank, params_before=count, params_after=count,
                                reason=f"stays a low-rank pair of rank {pair.rank}: {why}")
    for name, entry in details.items():
        old = result.details[name]
        if old is not entry and old.params_before is not None:
            result.layer_params_before += entry.params_before - old.params_before
            result.layer_params_after += entry.params_after - old.params_after
    result.details = details
    result.params_before = sum(p.numel() for p in model.parameters())
    removed = sum(p.numel() for module in replaced.values() for p in module.parameters())
    result.params_after = result.params_before - removed + sum(
        p.numel() for module in modules.values() for p in module.parameters()
    )
