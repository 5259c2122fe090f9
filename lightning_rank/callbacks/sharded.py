"""Full weights of sharded layers (FSDP2 through ``ModelParallelStrategy``), one layer at a time.

Under FSDP2 a layer's parameters are ``DTensor`` shards; the analysis and the factorization need the whole matrix.
Gathering is a collective, so every process gathers every named layer, in the same order, and only the process
that needs a layer keeps it, for as long as the block is open. Planning again a model that holds low-rank pairs
stands a sharded dense layer in for each (:func:`sharded_stand_ins`), and the low-rank layers a plan swaps in are
sharded like the units that held the dense ones (:func:`shard_swapped_layers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_rank.targets import select_targets, set_submodule

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
                        module._parameters[parameter_name] = nn.Parameter(full, parameter.requires_grad)
        yield
    finally:
        for module, parameter_name, parameter in reversed(swapped):
            module._parameters[parameter_name] = parameter


def mesh_of(model: nn.Module) -> Any:
    """The device mesh of ``model``'s sharded parameters (FSDP2's data-parallel mesh)."""
    return next(p.device_mesh for p in model.parameters() if isinstance(p, DTensor))


def shard_swapped_layers(model: nn.Module, replaced: Mapping[str, nn.Module], mesh: Any) -> None:
    """After dense layers of an FSDP2 model were swapped for new modules (``replaced``: name -> the dense module it
    replaced): the new modules become FSDP2 units of their own on ``mesh``, with the mixed-precision and offload
    policies of the unit that held the dense layer (of the replaced low-rank pair itself, a unit of its own) and in
    its parameters' dtype, and the dense weights leave the
    units that held them, so no process gathers or keeps them again.

    Every process must have swapped the same layers; the new modules take process 0's values, so every process
    shards the same tensors. Uses FSDP2 internals (no public API removes parameters from a unit): each unit's
    ``_fsdp_param_groups[i].fsdp_params`` loses the replaced parameters (a group left empty goes), its policies are
    read from ``_mp_policy`` and the groups' ``offload_policy``, and every unit is marked not yet initialized
    (``_is_root = None``, a fresh state context), so the next forward initializes them all again from the root(s),
    the new units included, as after ``fully_shard`` in ``configure_model``.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    gone = {id(p): name for name, module in replaced.items() for p in module.parameters()}
    # a replaced low-rank pair was a unit of its own (and has left the model): its policies are its own
    policies = {name: _policies(module) for name, module in replaced.items() if isinstance(module, FSDPModule)}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            for group in state._fsdp_param_groups:
                for param in group.fsdp_params:
                    if id(param.sharded_param) in gone:
                        policies[gone[id(param.sharded_param)]] = {"mp_policy": state._mp_policy,
                                                                   "offload_policy": group.offload_policy}
                group.fsdp_params = [p for p in group.fsdp_params if id(p.sharded_param) not in gone]
            state._fsdp_param_groups = [group for group in state._fsdp_param_groups if group.fsdp_params]
    group_of_mesh = mesh.get_group()
    for name, dense in replaced.items():
        module = model.get_submodule(name)
        dtype = next(dense.parameters()).dtype  # a sharded parameter keeps the dtype of its master weights
        module.to(dtype=dtype)
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=dist.get_global_rank(group_of_mesh, 0), group=group_of_mesh)
        fully_shard(module, mesh=mesh, **policies.get(name, {}))
    reset_units(model)  # a model may have several roots


@contextlib.contextmanager
def sharded_stand_ins(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """While open, each low-rank pair of an FSDP2 ``model`` (a unit of its own) is replaced by its dense equivalent,
    made a unit of its own on the same mesh and with the same policies, so the model can be planned again as dense
    layers while it stays sharded; yields ``{name: pair}``, as
    :func:`~lightning_rank.compress.refactor.dense_stand_ins` does for a model that is not sharded. Each pair's full
    factors are gathered in turn, on every process, to build its stand-in, then dropped. On leaving, the pairs are put
    back. Either way every unit is marked not yet initialized, as in :func:`shard_swapped_layers` (unless there was
    no pair: then nothing changes)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    targets, _ = select_targets(model)
    pairs = {name: t.module for name, t in targets.items() if t.factorized and isinstance(t.module, FSDPModule)}
    if not pairs:
        yield pairs
        return
    done: list[str] = []
    try:
        for name, pair in pairs.items():
            policies, mesh = _policies(pair), mesh_of(pair)
            with full_weights(model, [name], keep=[name]):
                dense = pair.to_dense()
            set_submodule(model, name, dense)
            done.append(name)
            fully_shard(dense, mesh=mesh, **policies)
        reset_units(model)
        yield pairs
    finally:
        for name in reversed(done):
            set_submodule(model, name, pairs[name])
        reset_units(model)


def _policies(unit: nn.Module) -> dict[str, Any]:
    """The mixed-precision and offload policies an FSDP2 ``unit`` was sharded with, as ``fully_shard`` takes them."""
    state = unit._get_fsdp_state()
    policies: dict[str, Any] = {"mp_policy": state._mp_policy}
    if state._fsdp_param_groups:
        policies["offload_policy"] = state._fsdp_param_groups[0].offload_policy
    return policies


def reset_units(model: nn.Module) -> None:
    """Mark every FSDP2 unit of ``model`` idle, resharded and not yet initialized, so the next forward initializes
    them all from the root(s) (``_is_root = None``, a fresh state context). A unit left in its forward (a planner's
    forward that raised) would otherwise skip that initialization, and its parameters would stay gathered."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPStateContext

    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            state._is_root, state._state_ctx = None, FSDPStateContext()
            state._training_state = TrainingState.IDLE
            for group in state._fsdp_param_groups:
                group._training_state = TrainingState.IDLE
                group.reshard()
