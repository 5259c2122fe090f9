"""``analyze``: from streamed input statistics to a :class:`RankReport`.

Each distinct input moment is decomposed once (layers sharing an input share it). Output moments
are derived from the input's, never streamed: formed directly when the layer narrows, and through a
factor ``A`` (``C_y = A A^T``) whose small ``A^T A`` is decomposed when it widens. Eigenproblems of
the same size are batched, on the statistics' device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rank.report import LayerRank, RankReport
from lightning_rank.spectrum import (
    check_threshold,
    clean_spectrum,
    effective_rank,
    energy_rank,
    output_factor,
    output_moment,
    utilization,
)
from lightning_rank.statistics import ActivationStatistics
from lightning_rank.targets import Target, layer_kind, parameter_count, select_targets, weight_matrix


def analyze(
    model: nn.Module,
    stats: ActivationStatistics,
    *,
    threshold: float = 0.99,
    centered: bool = False,
    eig_dtype: torch.dtype = torch.float64,
) -> RankReport:
    """Utilized rank of every layer in ``stats``: in/out energy ranks at ``threshold``, utilization, MLU.

    ``centered=True`` uses covariances instead of (uncentered) second moments. ``eig_dtype`` is the
    precision of the eigenvalue problems (float64 by default; float32 is about 3x faster on CPU).
    """
    threshold = check_threshold(threshold)
    if eig_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`eig_dtype` must be torch.float32 or torch.float64, got {eig_dtype}")
    targets = _targets_of(model, stats)
    if not stats.sources and not stats.skipped:
        raise ValueError("`stats` holds no layer: collect statistics with lr.collect(model, batches) first")

    device = stats.device
    widening = {name for name, target in targets.items() if _widens(target)}
    needs_vectors = {stats.sources[name] for name in widening}
    moments = {key: s.second_moment(centered, dtype=eig_dtype) for key, s in stats.inputs.items()}
    in_spectra, in_vectors = _input_spectra(stats, moments, needs_vectors)

    output_matrices: dict[str, Tensor] = {}
    for name, target in targets.items():
        key = stats.sources[name]
        weight, bias = (t.detach().to(device=device, dtype=eig_dtype) if t is not None else None
                        for t in weight_matrix(target))
        mean = stats.inputs[key].mean().to(eig_dtype)
        if name in widening:
            factor = output_factor(weight, bias, in_spectra[key], in_vectors[key], mean, centered)
            output_matrices[name] = factor.t() @ factor
        else:
            output_matrices[name] = output_moment(weight, bias, moments[key], mean, centered)
    out_spectra = _eigen_batched(output_matrices, torch.linalg.eigvalsh)

    rtol_of = {key: s.dim * torch.finfo(s.gram.dtype).eps for key, s in stats.inputs.items()}
    layers: dict[str, LayerRank] = {}
    spectra: dict[str, tuple[Tensor, Tensor]] = {}
    for name, target in targets.items():
        key = stats.sources[name]
        spectrum_in = in_spectra[key]
        spectrum_out = clean_spectrum(out_spectra[name], rtol_of[key])
        spectra[name] = (spectrum_in.flip(-1), spectrum_out.flip(-1))
        in_rank, out_rank = int(energy_rank(spectrum_in, threshold)), int(energy_rank(spectrum_out, threshold))
        out_features, in_features = weight_matrix(target)[0].shape
        rank = min(in_rank, out_rank)
        layers[name] = LayerRank(
            name=name,
            kind=target.kind,
            in_features=in_features,
            out_features=out_features,
            in_rank=in_rank,
            out_rank=out_rank,
            rank=rank,
            utilization=utilization(rank, out_features, in_features),
            in_effective_rank=float(effective_rank(spectrum_in)),
            out_effective_rank=float(effective_rank(spectrum_out)),
            rows=int(stats.inputs[key].count),
            nonfinite_rows=int(stats.inputs[key].nonfinite),
            parameters=parameter_count(target),
        )
    for name, reason in stats.skipped.items():
        layers[name] = _skipped_layer(model, name, reason)
    return RankReport(threshold=threshold, layers=layers, centered=centered, spectra=spectra)


def _targets_of(model: nn.Module, stats: ActivationStatistics) -> dict[str, Target]:
    """The model's layers named in ``stats``, in the order of ``stats``."""
    everything, _ = select_targets(model)
    missing = [name for name in stats.sources if name not in everything]
    if missing:
        raise ValueError(
            f"`stats` has layers that `model` does not have as analyzable layers: {missing}. "
            "Pass the model the statistics were collected on."
        )
    return {name: everything[name] for name in stats.sources}


def _widens(target: Target) -> bool:
    weight, _ = weight_matrix(target)
    return weight.shape[0] > weight.shape[1] + 1


def _input_spectra(
    stats: ActivationStatistics, moments: dict[str, Tensor], needs_vectors: set[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Cleaned eigenvalues of every distinct input moment, plus eigenvectors where a widening layer needs them."""
    with_vectors = _eigen_batched({key: moments[key] for key in moments if key in needs_vectors}, torch.linalg.eigh)
    without = _eigen_batched({key: moments[key] for key in moments if key not in needs_vectors}, torch.linalg.eigvalsh)
    spectra: dict[str, Tensor] = {}
    vectors = {key: vecs for key, (_, vecs) in with_vectors.items()}
    for key, values in [*((k, v) for k, (v, _) in with_vectors.items()), *without.items()]:
        s = stats.inputs[key]
        # the round-off sits on the scale of the summed (uncentered) numbers
        scale = float(s.gram.diagonal().max()) / max(int(s.count), 1)
        spectra[key] = clean_spectrum(values, s.dim * torch.finfo(s.gram.dtype).eps, scale)
    return spectra, vectors


# Large eigenproblems gain nothing from batching, and stacking them costs a copy of each.
_BATCH_BELOW = 1024


def _eigen_batched(matrices: dict[str, Tensor], solve: Callable[[Tensor], Any]) -> dict[str, Any]:
    """``solve`` (``eigvalsh`` or ``eigh``) of each symmetric matrix, one batched call per size below ``_BATCH_BELOW``."""
    groups: dict[tuple[int, str | None], list[str]] = defaultdict(list)
    for name, matrix in matrices.items():
        size = matrix.shape[0]
        groups[(size, None if size < _BATCH_BELOW else name)].append(name)
    out: dict[str, Any] = {}
    for names in groups.values():
        result = solve(torch.stack([matrices[name] for name in names]) if len(names) > 1 else matrices[names[0]][None])
        parts = zip(*result) if isinstance(result, tuple) else result
        out.update(zip(names, parts))
    return out


def _skipped_layer(model: nn.Module, name: str, reason: str) -> LayerRank:
    modules = dict(model.named_modules())
    module = modules.get(name)
    kind = out_features = in_features = None
    if module is not None and isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() >= 2:
        weight = module.weight
        out_features, in_features = weight.shape[0], weight[0].numel()
        kind = layer_kind(module)  # the report's one vocabulary of kinds
    elif name.endswith(".in_proj") and isinstance(modules.get(name[: -len(".in_proj")]), nn.MultiheadAttention):
        mha = modules[name[: -len(".in_proj")]]
        kind, out_features, in_features = "mha_in_proj", 3 * mha.embed_dim, mha.embed_dim
    return LayerRank(name=name, kind=kind, in_features=in_features, out_features=out_features, skipped=reason)
