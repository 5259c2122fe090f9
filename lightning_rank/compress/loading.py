"""Module structure: rebuilding a factorized structure from a state dict, and back (the one module setter is
:func:`lightning_rank.targets.set_submodule`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_rank.compress.layers import LOW_RANK_TYPES, disable_dense_fast_paths, low_rank_from_dense, low_rank_type
from lightning_rank.targets import Target, layer_kind, set_submodule, weight_matrix

CHECKPOINT_KEY = "lightning_rank"  # what RankCompression writes into a checkpoint of a factorized model
LOAD_HINT = (
    "A checkpoint of a factorized model holds low-rank layers (`<layer>.first.weight`, `<layer>.second.weight`) "
    "that a freshly built model does not have: load it with `model = lr.load_factorized(Model(...), path)`, or mix "
    "`lr.FactorizedCheckpointMixin` into the LightningModule so `Model.load_from_checkpoint(path)` rebuilds them."
)


def load_factorized(
    model: nn.Module, state_dict_or_path: Mapping[str, Any] | str | os.PathLike, *, strict: bool = True
) -> nn.Module:
    """Swap in low-rank layers wherever the state dict has ``<layer>.first.weight`` / ``<layer>.second.weight``,
    with the ranks its shapes say, then load the state dict; returns ``model``.

    Accepts a state dict, a checkpoint dict, or a path to either (a Lightning checkpoint's ``"state_dict"``
    is used as-is, so load it into the LightningModule itself). Files are read with
    ``torch.load(..., weights_only=True)``; for a safetensors file pass ``safetensors.torch.load_file(path)``.

    Everything is checked before ``model`` is touched: on an error nothing is changed. A key the state dict
    omits because its weight is tied to one it holds (``save_pretrained`` and safetensors files keep one
    name per tied tensor) is filled by loading that one. ``strict=True`` (default) raises for any other
    missing or unexpected key; ``strict=False`` loads what fits and warns about the rest, as
    ``load_state_dict(strict=False)`` and ``LightningModule.load_from_checkpoint`` do. Shapes must fit
    either way.

    >>> import torch, lightning_rank as lr
    >>> def build():
    ...     return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> compressed = build()
    >>> compressed[0] = lr.LowRankLinear(16, 32, rank=4)  # as factorize_ or RankCompression leave it
    >>> model = lr.load_factorized(build(), compressed.state_dict())  # or a path to a saved one, or a checkpoint
    >>> type(model[0]).__name__, model[0].rank, torch.equal(model[0].first.weight, compressed[0].first.weight)
    ('LowRankLinear', 4, True)
    """
    state = _read_state_dict(state_dict_or_path)
    modules = factorized_modules(model, state)
    missing, unexpected = _check_fit(model, modules, state, strict)
    install_factorized(model, modules)
    model.load_state_dict(state, strict=False)  # every key was checked above; tied twins load through their twin
    if missing or unexpected:
        warnings.warn(
            f"load_factorized(strict=False) into {type(model).__name__}: missing keys {_listed(missing)} (left as they "
            f"were), unexpected keys {_listed(unexpected)} (ignored).",
            stacklevel=2,
        )
    return model


def rebuild_factorized_(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, int]:
    """Give ``model`` the factorized structure ``state_dict`` has, without loading any value.

    Each layer with ``<name>.first.weight`` and ``<name>.second.weight`` in the state dict becomes a
    low-rank layer of the rank their shapes say (placeholder zeros until the state dict is loaded).
    Returns ``{name: rank}`` of the layers swapped; layers already of that structure are left as they are.
    """
    modules = factorized_modules(model, state_dict)
    install_factorized(model, modules)
    return {name: module.rank for name, module in modules.items()}


def factorized_modules(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, nn.Module]:
    """The low-rank layers (placeholder zeros) ``model`` needs to take ``state_dict``, by name; ``model`` is untouched.

    Raises a ``ValueError`` naming the layer when the state dict's factors do not fit the model's layer.
    """
    modules = dict(model.named_modules())
    planned: dict[str, nn.Module] = {}
    for key in list(state_dict):
        if not key.endswith(".first.weight"):
            continue
        name = key[: -len(".first.weight")]
        second = state_dict.get(f"{name}.second.weight")
        module = modules.get(name)
        if second is None or module is None:
            continue  # not ours: the key check reports what does not fit
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
        planned[name] = low_rank_from_dense(module, *placeholder)
    return planned


def factorized_layers(model: nn.Module) -> dict[str, int]:
    """``{name: rank}`` of the low-rank layers ``model`` holds."""
    return {name: module.rank for name, module in model.named_modules() if isinstance(module, LOW_RANK_TYPES)}


class FactorizedCheckpointMixin:
    """Mix into a LightningModule, before ``LightningModule``, so loading a checkpoint of its factorized form works:
    ``Model.load_from_checkpoint(path)``, ``trainer.test(model, ckpt_path=...)`` and resuming rebuild the low-rank
    layers the checkpoint holds before its weights load. A subclass that overrides ``on_load_checkpoint`` calls
    ``super().on_load_checkpoint(checkpoint)``.

    >>> import pathlib, tempfile
    >>> import lightning as L, torch, lightning_rank as lr
    >>> class Model(lr.FactorizedCheckpointMixin, L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(8, 4)
    >>> compressed = Model()
    >>> compressed.fc = lr.LowRankLinear(8, 4, rank=2)  # as RankCompression leaves it
    >>> with tempfile.TemporaryDirectory() as folder:  # a checkpoint as a Trainer writes it, in short
    ...     path = pathlib.Path(folder) / "last.ckpt"
    ...     torch.save({"state_dict": compressed.state_dict(), "pytorch-lightning_version": L.__version__}, path)
    ...     model = Model.load_from_checkpoint(path)  # e.g. trainer.checkpoint_callback.best_model_path
    >>> model.fc.rank, torch.equal(model.fc.first.weight, compressed.fc.first.weight)
    (2, True)
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rebuild_factorized_(self, checkpoint["state_dict"])  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]


def install_factorized(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Put the low-rank ``modules`` into ``model`` by name (from :func:`factorized_modules`)."""
    for name, module in modules.items():
        set_submodule(model, name, module)
    if modules:
        disable_dense_fast_paths(model)  # torch's fused transformer kernels read dense weights


def _check_fit(
    model: nn.Module, modules: Mapping[str, nn.Module], state: Mapping[str, Any], strict: bool
) -> tuple[list[str], list[str]]:
    """Raise, before anything changes, unless ``state`` fits ``model`` with ``modules`` swapped in; with
    ``strict=False`` return the ``(missing, unexpected)`` keys instead of raising for them."""
    expected = {
        key: value for key, value in model.state_dict(keep_vars=True).items()
        if not any(key.startswith(f"{name}.") for name in modules)
    }  # fmt: skip
    for name, module in modules.items():
        expected.update({f"{name}.{key}": value for key, value in module.state_dict(keep_vars=True).items()})
    present = {id(expected[key]) for key in state if key in expected}
    missing = [key for key in expected if key not in state and id(expected[key]) not in present]  # tied twins load
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: {tuple(state[key].shape)} in the state dict, {tuple(expected[key].shape)} in the model"
        for key in state
        if key in expected and isinstance(state[key], torch.Tensor) and state[key].shape != expected[key].shape
    ]
    rebuilt = f" after rebuilding its low-rank layers {sorted(modules)}" if modules else ""
    if mismatched:
        raise RuntimeError(
            f"load_factorized: the state dict does not fit {type(model).__name__}{rebuilt}; nothing was changed. "
            f"Size mismatch: {_listed(mismatched)}. Is it the right model?"
        )
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"load_factorized: the state dict does not fit {type(model).__name__}{rebuilt}; nothing was changed. "
            f"Missing keys: {_listed(missing)}; unexpected keys: {_listed(unexpected)}. Pass `strict=False` to load "
            "what fits."
        )
    return missing, unexpected


def _listed(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(item) for item in items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"


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
