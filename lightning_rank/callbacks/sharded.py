"""Full weights of sharded layers (FSDP2 through ``ModelParallelStrategy``), one layer at a time.

Under FSDP2 a layer's parameters are ``DTensor`` shards; the analysis and the factorization need the whole matrix.
Gathering is a collective, so every process gathers every named layer, in the same order, and only the process
that needs a layer keeps it, for as long as the block is open.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence

import torch
from torch import nn

from lightning_rank.targets import select_targets

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.4: no public DTensor, so nothing is sharded this way
    DTensor = None


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2 or tensor parallel)."""
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def full_weights(model: nn.Module, names: Sequence[str], keep: Collection[str]) -> Iterator[None]:
    """While open, the layers of ``model`` in ``keep`` hold their full parameters as plain tensors in place of their
    ``DTensor`` shards. Call on every process with the same ``names`` (the layers anyone keeps, in one order):
    each layer's parameters are gathered in turn, and dropped at once by the processes that do not keep it.
    Without sharded parameters this does nothing."""
    if not is_sharded(model):
        yield
        return
    targets, _ = select_targets(model)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for name in names:
            for module in targets[name].module.modules():
                for parameter_name, parameter in list(module.named_parameters(recurse=False)):
                    if not isinstance(parameter, DTensor):
                        continue
                    with torch.no_grad():
                        full = parameter.full_tensor()
                    if name in keep:
                        swapped.append((module, parameter_name, parameter))
                        module._parameters[parameter_name] = nn.Parameter(full, requires_grad=False)
        yield
    finally:
        for module, parameter_name, parameter in reversed(swapped):
            module._parameters[parameter_name] = parameter
