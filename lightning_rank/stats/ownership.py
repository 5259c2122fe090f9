"""Which process owns each layer's statistics when several processes validate (DDP, FSDP2).

Each layer input is counted, held and analyzed by one process, its owner, so that per-process statistics
memory (``d^2``) and analysis time (``d^3``) divide by the number of processes and only the small report
is gathered. Siblings under one parent with the same fan_in and kind (q, k and v; gate and up) most likely
read one input, so they get one owner and still share one accumulator. Owners are given largest cost first,
each to the least loaded process, so every process ends with about the same eigenproblem work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lightning_rank.stats.rows import RowPolicy, auto_rate
from lightning_rank.targets import Target, layer_shape


@dataclass(frozen=True)
class ProcessShare:
    """This process (``rank`` of ``world_size``) and the owner of every layer, by name (none: every process holds
    every layer, summed over processes).

    Under the row budget ``"auto"`` with a known number of validation batches, an owner counts its layers on
    its own share of the data, and the other processes skip them. A layer whose first batch shows that the
    owner's share holds fewer rows than the budget is counted on every process instead and summed to its owner
    (``pooled``), as every layer is when every row is counted (``None``) or rows are capped per batch (an int).
    """

    rank: int
    world_size: int
    owners: Mapping[str, int]

    def owns(self, name: str) -> bool:
        return self.owners.get(name, self.rank) == self.rank

    def pooled(self, policy: RowPolicy, fan_in: int, rows: int, batches: int | None) -> bool:
        """Whether a layer of ``fan_in`` is counted on every process and summed to its owner, decided by each process
        from ``rows``, the rows of the layer's first batch it sees, and ``batches``, its validation batches: pooled
        when that many batches of that many rows hold no more than the budget. Equal on every process whose first
        batch has as many rows (a ``DistributedSampler`` gives every process the same batch size); where they
        differ, the owner's decision holds and the sum lacks the rows of processes that decided otherwise
        (:func:`~lightning_rank.callbacks.owners.reduce_to_owners` warns)."""
        if not self.owners or policy != "auto" or not batches or self.world_size == 1:
            return True
        return auto_rate(fan_in, max(rows, 1), batches) >= 1


def assign_owners(targets: Mapping[str, Target], world_size: int) -> dict[str, int]:
    """The process owning each of ``targets``, balanced by the cost of its eigenproblems: ``fan_in^3`` for the
    input and ``min(out, fan_in)^3`` for each layer's output. The same on every process (a pure function of the
    layers' names and shapes, in model order)."""
    groups: dict[tuple[str, int, str], list[str]] = {}
    costs: dict[tuple[str, int, str], int] = {}
    for name, target in targets.items():
        out, fan_in = layer_shape(target)
        group = (name.rpartition(".")[0], fan_in, target.kind)
        if group not in groups:
            groups[group], costs[group] = [], fan_in**3
        groups[group].append(name)
        costs[group] += min(out, fan_in) ** 3
    loads = [0] * world_size
    owners: dict[str, int] = {}
    for group in sorted(groups, key=lambda g: -costs[g]):  # stable: ties keep model order
        owner = loads.index(min(loads))
        loads[owner] += costs[group]
        owners.update(dict.fromkeys(groups[group], owner))
    return {name: owners[name] for name in targets}
