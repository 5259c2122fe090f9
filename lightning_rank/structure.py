"""Module structure: the one module setter, rebuilding a factorized structure from a state dict, and back."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_rank.layers import LOW_RANK_TYPES, low_rank_from_dense, low_rank_type
from lightning_rank.targets import Target, layer_kind, weight_matrix


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (the package's one module setter)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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
        set_submodule(model, name, low_rank_from_dense(module, *placeholder))
        rebuilt[name] = rank
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


def dense_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` of ``model`` with each low-rank layer's ``first``/``second`` entries replaced by its dense weights."""
    dense = dict(state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, LOW_RANK_TYPES):
            continue
        for key in [k for k in dense if k.startswith(f"{name}.first.") or k.startswith(f"{name}.second.")]:
            del dense[key]
        for key, value in module.to_dense().state_dict().items():
            dense[f"{name}.{key}"] = value.detach()
    return dense
