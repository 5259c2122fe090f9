"""Which layers are analyzed, and how each one's weight reads as an ``(out, fan_in)`` matrix."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

ModuleSelector = str | Sequence[str] | Callable[[nn.Module, str], bool] | None

# The one vocabulary of layer kinds, in reports (analyzed and skipped layers alike) and factorization results.
LayerKind = Literal["linear", "conv1d", "conv2d", "hf_conv1d", "mha_in_proj"]
KINDS: tuple[LayerKind, ...] = get_args(LayerKind)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 style ``Conv1D``: a linear layer whose weight is stored ``(in, out)`` (also once
    ``fully_shard`` made it an ``FSDPConv1D``, a subclass)."""
    return hf_conv1d_class(module) is not None and hasattr(module, "nf") and isinstance(
        getattr(module, "weight", None), Tensor
    )


def hf_conv1d_class(module: nn.Module) -> type[nn.Module] | None:
    """The class named ``Conv1D`` among ``module``'s classes (its own, or the one an FSDP2 subclass derives from)."""
    return next((cls for cls in type(module).__mro__ if cls.__name__ == "Conv1D"), None)


def factorized_kind(module: nn.Module) -> LayerKind | None:
    """The kind of the dense layer a low-rank pair (``LowRankLinear``, ``LowRankConv1d/2d``) stands for, else ``None``."""
    return getattr(module, "factorized_kind", None)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a supported layer (a low-rank pair counts as the layer it replaced), or ``None`` for anything else."""
    kind = factorized_kind(module)
    if kind is not None:
        return kind
    if isinstance(module, nn.MultiheadAttention):
        return "mha_in_proj"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if is_hf_conv1d(module):
        return "hf_conv1d"
    return None


@dataclass(frozen=True)
class Target:
    """One analyzable layer: its report name, the module whose forward is observed, and its kind.

    For ``nn.MultiheadAttention`` the name is ``"<attn>.in_proj"`` and ``module`` is the attention
    module itself, whose own input feeds the packed q/k/v projection. A low-rank pair ``A B`` is one
    target (``factorized``) of the kind it replaced: its input is the first factor's, its weight ``A B``.
    """

    name: str
    module: nn.Module
    kind: LayerKind

    @property
    def factorized(self) -> bool:
        return factorized_kind(self.module) is not None


def weight_matrix(target: Target) -> tuple[Tensor, Tensor | None]:
    """The layer as ``y = W x + b`` with ``W`` of shape ``(out, fan_in)`` (a view, no copy)."""
    module, kind = target.module, target.kind
    if target.factorized:
        return module.dense_weight(), module.second.bias
    if kind == "mha_in_proj":
        return module.in_proj_weight, module.in_proj_bias
    if kind == "hf_conv1d":
        return module.weight.t(), module.bias
    weight = module.weight
    return weight.reshape(weight.shape[0], -1), module.bias


def parameter_layout(target: Target, matrix: Tensor) -> Tensor:
    """``matrix``, the layer's ``(out, fan_in)`` weight as :func:`weight_matrix` gives it, in the shape and order of
    the weight parameter itself (a view where it can be)."""
    if target.factorized:
        raise ValueError(f"layer {target.name!r} is a low-rank pair: it has no dense weight parameter")
    if target.kind == "mha_in_proj":
        return matrix
    if target.kind == "hf_conv1d":
        return matrix.t()
    return matrix.reshape(target.module.weight.shape)


def layer_shape(target: Target) -> tuple[int, int]:
    """``(out, fan_in)`` of the layer's matrix from its parameters' shapes alone: no product and no gather (a
    sharded weight's shape is its full shape)."""
    module = target.module
    if target.factorized:
        return module.second.weight.shape[0], math.prod(module.first.weight.shape[1:])
    if target.kind == "mha_in_proj":
        return tuple(module.in_proj_weight.shape)
    if target.kind == "hf_conv1d":
        return module.weight.shape[1], module.weight.shape[0]
    return module.weight.shape[0], math.prod(module.weight.shape[1:])


def _unobservable_reason(module: nn.Module, kind: str, parent: nn.Module | None) -> str | None:
    if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
        return (
            "out_proj of nn.MultiheadAttention: the attention forward uses its weight directly and "
            "never calls this module, so its input cannot be observed"
        )
    if kind in ("conv1d", "conv2d") and getattr(module, "groups", 1) != 1:  # a low-rank pair has groups=1
        return f"grouped convolution (groups={module.groups}) is not supported"
    if kind == "mha_in_proj" and not module._qkv_same_embed_dim:
        return "nn.MultiheadAttention with separate q/k/v weights (kdim/vdim differ) is not supported"
    if kind == "mha_in_proj" and module.in_proj_weight is None:
        return "nn.MultiheadAttention has no packed in_proj_weight"
    return None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, str | None]]:
    """Every supported layer as ``(name, module, kind)``, MultiheadAttention expanded to in_proj; the
    factors inside a low-rank pair are not layers of their own."""
    found = []
    pairs: list[str] = []
    for name, module in named_modules(model):
        if any(name.startswith(pair + ".") for pair in pairs):
            continue
        kind = layer_kind(module)
        if factorized_kind(module) is not None:
            pairs.append(name)
        if kind == "mha_in_proj":
            found.append((_join(name, "in_proj"), module, kind))
        elif kind is not None:
            found.append((name, module, kind))
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_COMPILED = "_orig_mod"  # the attribute torch.compile's OptimizedModule keeps the original module under


def named_modules(model: nn.Module, remove_duplicate: bool = True) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` seen through ``torch.compile`` wrappers: each wrapper is left out and the
    ``_orig_mod`` level is dropped from names, so a compiled model reports the names of the original one."""
    return [
        (".".join(part for part in name.split(".") if part != _COMPILED), module)
        for name, module in model.named_modules(remove_duplicate=remove_duplicate)
        if not _is_compiled_wrapper(module)
    ]


def _is_compiled_wrapper(module: nn.Module) -> bool:
    return isinstance(getattr(module, "_modules", {}).get(_COMPILED), nn.Module)


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name`` in :func:`named_modules` (looking through ``torch.compile`` wrappers)."""
    module = _unwrapped(model)
    for part in name.split(".") if name else []:
        module = _unwrapped(getattr(module, part))
    return module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` (a name from :func:`named_modules`), inside any ``torch.compile`` wrapper."""
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    setattr(parent, child, module)


def _unwrapped(module: nn.Module) -> nn.Module:
    while _is_compiled_wrapper(module):
        module = module._modules[_COMPILED]
    return module


def _matcher(selector: ModuleSelector, argument: str, all_names: list[str]) -> Callable[[nn.Module, str], bool]:
    """Turn a selector into ``(module, name) -> bool``; names that match nothing raise at once."""
    if callable(selector):
        return selector
    if isinstance(selector, str):
        try:
            pattern = re.compile(selector)
        except re.error as err:
            raise ValueError(f"`{argument}`={selector!r} is not a valid regular expression: {err}") from None
        if not any(pattern.fullmatch(name) for name in all_names):
            raise ValueError(
                f"`{argument}`={selector!r} matches no module name (full match on dotted names). "
                f"Some names: {_preview(all_names)}"
            )
        return lambda module, name: pattern.fullmatch(name) is not None
    if isinstance(selector, Sequence):
        wanted = list(selector)
        for item in wanted:
            if not isinstance(item, str):
                raise TypeError(f"`{argument}` must hold module names (str), got {type(item).__name__}")
            if not any(_name_matches(name, item) for name in all_names):
                close = difflib.get_close_matches(item, all_names, n=5, cutoff=0.5)
                hint = f" Close names: {close}." if close else f" Some names: {_preview(all_names)}."
                raise ValueError(f"`{argument}` names {item!r}, which matches no module.{hint}")
        return lambda module, name: any(_name_matches(name, item) for item in wanted)
    raise TypeError(
        f"`{argument}` must be None, a regex str, a list of names or a callable (module, name) -> bool, "
        f"got {type(selector).__name__}"
    )


def _name_matches(name: str, item: str) -> bool:
    return name == item or name.endswith("." + item)


def _preview(names: list[str], limit: int = 8) -> str:
    shown = [n for n in names if n][:limit]
    return ", ".join(shown) + (", ..." if len(names) > limit else "")


def select_targets(
    model: nn.Module,
    target_modules: ModuleSelector = None,
    exclude_modules: ModuleSelector = None,
) -> tuple[dict[str, Target], dict[str, str]]:
    """Find the layers to analyze: ``(observable targets by name, skipped name -> reason)``.

    A selector matches a layer when it matches the layer's name or the name of a module above it
    (so ``"blocks.0"`` selects every layer of that block). A leaf module with parameters that the
    selection names but that is not a supported type is reported as skipped.
    """
    modules = dict(named_modules(model))
    candidates = _candidates(model)
    all_names = sorted(set(modules) | {name for name, _, _ in candidates})
    include = _matcher(target_modules, "target_modules", all_names) if target_modules is not None else None
    exclude = _matcher(exclude_modules, "exclude_modules", all_names) if exclude_modules is not None else None
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    pairs = [name for name, module, _ in candidates if factorized_kind(module) is not None]

    def matched(rule: Callable[[nn.Module, str], bool], name: str, module: nn.Module) -> bool:
        if rule(module, name):
            return True
        parts = name.split(".")
        ancestors = (".".join(parts[:i]) for i in range(len(parts)))
        return any(rule(modules[a], a) for a in ancestors if a in modules)

    targets: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    for name, module, kind in candidates:
        if include is not None and not matched(include, name, module):
            continue
        if exclude is not None and matched(exclude, name, module):
            continue
        reason = _unobservable_reason(module, kind, parents.get(id(module)))
        if reason is not None:
            skipped[name] = reason
        else:
            targets[name] = Target(name, module, kind)
    if include is not None:
        for name, module in modules.items():
            if any(name.startswith(pair + ".") for pair in pairs):
                continue
            has_own_parameters = next(module.parameters(recurse=False), None) is not None
            if layer_kind(module) is None and has_own_parameters and include(module, name):
                if exclude is None or not matched(exclude, name, module):
                    skipped[name] = (
                        f"{type(module).__name__} is not a supported layer type "
                        "(Linear, Conv1d, Conv2d, Hugging Face Conv1D, MultiheadAttention)"
                    )
    if not targets and not skipped:
        raise ValueError(
            f"{type(model).__name__} has no layer to analyze: lightning_rank observes nn.Linear, nn.Conv1d, "
            "nn.Conv2d, Hugging Face Conv1D and nn.MultiheadAttention"
            + (" among the modules selected by `target_modules`/`exclude_modules`." if include or exclude else ".")
        )
    return targets, skipped


def parameter_count(target: Target) -> int:
    """Weight plus bias elements of the layer (the packed in_proj only, for attention; both factors of a pair)."""
    if target.factorized:
        return sum(p.numel() for p in target.module.parameters())
    weight, bias = weight_matrix(target)
    return weight.numel() + (bias.numel() if bias is not None else 0)


def float_dtype(dtype: torch.dtype) -> torch.dtype:
    """Validate a statistics dtype."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")
    return dtype
