"""``analyze``: from streamed input statistics to a :class:`RankReport`; the one spectral core.

Each distinct input moment is decomposed once (layers sharing an input share it). Output moments are derived, never
streamed: formed directly when the layer narrows, through a factor ``A`` (``C_y = A A^T``, its small ``A^T A``
decomposed) when it widens. Eigenproblems of one size are batched on the statistics' device. Round-off is removed by
bounds, never by a blanket cut (:mod:`~lightning_rank.spectral.spectrum`): float32 eigenvalues certify each energy rank
wherever the bounds can (a float32 moment carries its rounding bound ``2u ||M||_F``, float32 products their error
measured by Gaussian probes); a moment left open is solved again in float64, then with eigenvectors (tight even where
a few huge channels carry most of the energy). :func:`decompose` keeps the eigenvectors for factorization.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rank.checks import check_eig_dtype, check_threshold
from lightning_rank.spectral.certify import Float64Matrices, Spectrum, input_scales, input_trace, output_errors, settle
from lightning_rank.spectral.few_rows import few_rows_spectra, held_keys
from lightning_rank.spectral.progress import progress_bar
from lightning_rank.spectral.report import LayerRank, RankReport
from lightning_rank.spectral.spectrum import (
    cholesky_output_factor,
    effective_rank,
    eigen_batched,
    largest_eigenvalue,
    output_factor,
    output_moment,
    rounding_error,
    solver_bound,
    symmetric_eigen,
    utilization,
)
from lightning_rank.stats.precision import full_precision_matmul
from lightning_rank.stats.sums import ActivationStatistics, InputStatistics
from lightning_rank.targets import Target, get_submodule, layer_kind, parameter_count, select_targets, weight_matrix


@dataclass
class LayerSpectra:
    """One layer's matrices in the eigen dtype: ``y = W x + b`` with input moment ``C`` and mean ``mu``."""

    target: Target
    weight: Tensor
    bias: Tensor | None
    moment: Tensor | None  # None when its spectra came from the held rows (few_rows)
    mean: Tensor
    inputs: Spectrum
    outputs: Spectrum
    scales: Tensor | None = None  # round-off scales of the input and output moments, when from the held rows
    out_scales: Tensor | None = None


@dataclass
class Analysis:
    """What :func:`decompose` computed: the report, each layer's :class:`LayerSpectra`, the moments ``refined``."""

    report: RankReport
    layers: dict[str, LayerSpectra]
    refined: list[str] = field(default_factory=list)  # input keys and layer outputs solved again in float64


def analyze(model: nn.Module, stats: ActivationStatistics, *, threshold: float = 0.99, centered: bool = False,
            eig_dtype: torch.dtype = torch.float32, progress: bool = True) -> RankReport:
    """Utilized rank of every layer in ``stats``: in/out energy ranks at ``threshold``, utilization, MLU.

    ``centered=True`` uses covariances instead of (uncentered) second moments. ``eig_dtype`` is the
    precision of the eigenvalue problems: float32 by default, which gives exactly the ranks of float64
    because every moment whose energy rank its error bounds leave open is solved again in float64.
    ``progress``: a progress bar on stderr when the analysis takes more than a few seconds.

    >>> import torch, lightning_rank as lr
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> basis = torch.randn(4, 16)  # the data span 4 of the 16 input directions
    >>> report = lr.analyze(model, lr.collect(model, [torch.randn(64, 4) @ basis for _ in range(4)]))
    >>> report.layers["0"].in_rank, report.layers["0"].utilization  # rank 4 of min(32, 16)
    (4, 0.25)
    """
    return decompose(model, stats, threshold=threshold, centered=centered, eig_dtype=eig_dtype,
                     progress=progress).report


def decompose(
    model: nn.Module,
    stats: ActivationStatistics,
    *,
    threshold: float = 0.99,
    centered: bool = False,
    eig_dtype: torch.dtype = torch.float64,
    vectors: bool = False,
    output_vectors: bool = False,
    layers: Collection[str] | None = None,
    progress: bool = False,
) -> Analysis:
    """:func:`analyze`, also returning each layer's matrices and spectra: the one place moments are decomposed.

    ``vectors`` / ``output_vectors`` keep the eigenvectors of the input / output moments (factorization needs them; a
    report does not). ``layers`` restricts the work to those layers of ``stats``. Products run at full float32
    precision whatever ``torch.set_float32_matmul_precision`` says. ``eig_dtype`` defaults to float64, unlike the public
    paths (:func:`analyze`, ``RankMonitor``: float32, passed explicitly): factorization relies on it, computing factors
    in float64 from these weights and eigenvectors (float32 would mix float32 weights with float64 refined vectors).
    """
    threshold = check_threshold(threshold)
    check_eig_dtype(eig_dtype)
    if not isinstance(stats, ActivationStatistics):
        raise TypeError(f"`stats` must be ActivationStatistics from lr.collect, got {type(stats).__name__}")
    if not stats.sources and not stats.skipped:
        raise ValueError("`stats` holds no layer: collect statistics with lr.collect(model, batches) first")
    with full_precision_matmul(), progress_bar("analyze", enabled=progress) as bar:
        return _decompose(model, stats, threshold, centered, eig_dtype, vectors, output_vectors, layers, bar)


def _decompose(
    model: nn.Module,
    stats: ActivationStatistics,
    threshold: float,
    centered: bool,
    eig_dtype: torch.dtype,
    vectors: bool,
    output_vectors: bool,
    layers: Collection[str] | None,
    bar: Any,
) -> Analysis:
    targets, empty = _targets_of(model, stats)
    if layers is not None:
        targets = {name: target for name, target in targets.items() if name in layers}
        empty = {name: reason for name, reason in empty.items() if name in layers}
    _check_analyzable(targets, stats)
    keys = dict.fromkeys(stats.sources[name] for name in targets)
    bar.total = len(keys) + len(targets)  # an eigenproblem per distinct input and layer output (reset() would draw)
    widening = {name for name, target in targets.items() if _widens(target)}
    exact = Float64Matrices(stats, centered, {})
    few = _few_rows(stats, targets, [] if vectors or output_vectors else held_keys(stats, keys), widening, centered,
                    threshold, exact, bar.update)
    keys = {key: None for key in keys if key not in few}

    with_vectors = set(keys) if vectors else set()
    # A small eigenproblem costs as little in float64 as in float32, and float64 never needs solving again.
    dtypes = {key: torch.float64 if stats.inputs[key].dim < FLOAT32_FROM else eig_dtype for key in keys}
    moments = {key: stats.inputs[key].second_moment(centered, dtype=dtypes[key]) for key in keys}
    scales = {key: input_scales(stats.inputs[key]) for key in keys}
    exact.add({key: m for key, m in moments.items() if m.dtype == torch.float64})
    errors = {key: 0.0 for key in keys}  # how far each float32 moment stands from the float64 one
    raw_in = {}
    for key in [key for key in keys if moments[key].dtype != torch.float64]:
        errors[key] = rounding_error(moments[key])
        if not math.isfinite(errors[key]):  # float64 sums beyond float32's range: the moment stays in float64
            dtypes[key], moments[key], errors[key] = torch.float64, exact.moment(key), 0.0
            continue
        float32_error = solver_bound(float(largest_eigenvalue(moments[key])), len(moments[key]), torch.float32)
        if float32_error > 2 * stats.inputs[key].roundoff() * float(scales[key].square().max()):
            # float32 errs well beyond the round-off bounds, so it could not tell round-off from signal: solving in
            # float32 first would most likely be wasted (a speed choice only: every rank is certified either way)
            raw_in[key] = symmetric_eigen(exact.moment(key), vectors=key in with_vectors)
            errors[key] = 0.0
            bar.update(1)
    unsolved = {key: m for key, m in moments.items() if key not in raw_in}
    raw_in.update(eigen_batched({k: m for k, m in unsolved.items() if k in with_vectors}, True, bar.update))
    raw_in.update(eigen_batched({k: m for k, m in unsolved.items() if k not in with_vectors}, False, bar.update))
    refined: list[str] = []
    in_spectra = {}
    for key in keys:
        in_spectra[key] = settle(raw_in[key], lambda key=key: exact.moment(key), stats.inputs[key], scales[key],
                                  threshold, keep_vectors=key in with_vectors, extra=errors[key],
                                  trace=input_trace(stats.inputs[key], centered))
        if in_spectra[key].refined:
            refined.append(key)

    spectra: dict[str, LayerSpectra] = {}
    imprecise: list[str] = []
    output_matrices: dict[str, Tensor] = {}
    factors: dict[str, Tensor] = {}
    for name, target in targets.items():
        key = stats.sources[name]
        if key in few:
            spectra[name] = few[key][name]
            continue
        weight, bias = (t.detach().to(device=stats.device, dtype=dtypes[key]) if t is not None else None
                        for t in weight_matrix(target))
        mean = stats.inputs[key].mean().to(dtypes[key])
        spectra[name] = LayerSpectra(target, weight, bias, moments[key], mean, in_spectra[key], Spectrum(torch.empty(0)))
        if name in widening:
            spectrum = in_spectra[key]
            if spectrum.vectors is not None:
                factors[name] = output_factor(weight, bias, spectrum.values.to(weight), spectrum.vectors.to(weight),
                                              mean, centered)
            else:
                factors[name] = cholesky_output_factor(weight, bias, moments[key], mean, centered)
            if factors[name] is None:  # a singular moment has no Cholesky factor: the eigen one, in float64
                factors[name] = exact.factor(name, weight, bias, key)
            output_matrices[name] = factors[name].t() @ factors[name]
        else:
            output_matrices[name] = output_moment(weight, bias, moments[key], mean, centered)
    extras = output_errors(stats, {name: (spectra[name].weight, spectra[name].bias) for name in output_matrices},
                           output_matrices, factors, exact)
    raw_out = eigen_batched(output_matrices, output_vectors, bar.update)
    for name, layer in spectra.items():
        key = stats.sources[name]
        inputs = stats.inputs[key]
        if key in few:
            if _precision_limited(inputs, few[key][name].scales, few[key][name].out_scales, layer.outputs.values,
                                  threshold, centered):
                imprecise.append(name)
            continue
        # W dC W^T with independent entry errors r s_j s_k errs by about r t_a t_b, t = sqrt(W^2 s^2)
        out_scales = (layer.weight.double().square() @ scales[key].to(layer.weight.device).square()).sqrt()
        if name in widening:
            layer.outputs = settle(raw_out[name], lambda name=name, layer=layer, key=key: exact.factor(
                name, layer.weight, layer.bias, key), inputs, out_scales, threshold, output_vectors, factor=True,
                extra=extras[name], solved_factor=factors[name])
        else:
            layer.outputs = settle(raw_out[name], lambda layer=layer, key=key: exact.output_moment(
                layer.weight, layer.bias, key), inputs, out_scales, threshold, output_vectors, extra=extras[name])
        if _precision_limited(inputs, scales[key], out_scales, layer.outputs.values, threshold, centered):
            imprecise.append(name)
        if layer.outputs.refined:
            refined.append(name)

    report = _report(model, stats, spectra, empty, threshold, centered)
    if imprecise:
        warnings.warn(
            f"The sums of the inputs of {imprecise} cannot resolve their spectra at threshold "
            f"{threshold}: their round-off may hold more than the {1 - threshold:.3g} of the energy the ranks leave out, "
            "so these ranks may be too low (a centered moment whose mean dwarfs its spread loses most of it to "
            "cancellation). Collect their statistics with dtype=torch.float64.",
            stacklevel=4,
        )
    return Analysis(report, spectra, refined)


def _report(
    model: nn.Module,
    stats: ActivationStatistics,
    layers: dict[str, LayerSpectra],
    empty: dict[str, str],
    threshold: float,
    centered: bool,
) -> RankReport:
    entries: dict[str, LayerRank] = {}
    spectra: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer in layers.items():
        inputs = stats.inputs[stats.sources[name]]
        spectrum_in, spectrum_out = layer.inputs.values.double(), layer.outputs.values.double()
        spectra[name] = (spectrum_in, spectrum_out)
        in_rank, out_rank = layer.inputs.rank, layer.outputs.rank
        out_features, in_features = layer.weight.shape
        rank = min(in_rank, out_rank)
        entries[name] = LayerRank(
            name=name,
            kind=layer.target.kind,
            in_features=in_features,
            out_features=out_features,
            in_rank=in_rank,
            out_rank=out_rank,
            rank=rank,
            utilization=utilization(rank, out_features, in_features),
            in_effective_rank=float(effective_rank(spectrum_in)),
            out_effective_rank=float(effective_rank(spectrum_out)),
            rows=int(inputs.summed), rows_limited=int(inputs.summed) < in_features,
            rows_reason=inputs.rows_reason, settled_at=inputs.settled_at,
            nonfinite_rows=int(inputs.nonfinite),
            parameters=parameter_count(layer.target),
            factorized=layer.target.factorized,
        )
    for name, reason in {**stats.skipped, **empty}.items():
        entries[name] = skipped_layer(model, name, reason)
    report = RankReport(threshold=threshold, layers=entries, centered=centered, spectra=spectra)
    limited = [name for name, layer in report.analyzed.items() if layer.rows_limited]
    if limited:
        warnings.warn(
            f"Fewer rows than inputs (fan_in) were seen for {limited}: their input rank is bounded by the data, "
            "not by the layer (`rows_limited` in the report). Collect more batches for ranks of the layer itself.",
            stacklevel=4,
        )
    return report


def _targets_of(model: nn.Module, stats: ActivationStatistics) -> tuple[dict[str, Target], dict[str, str]]:
    """The model's layers named in ``stats`` (in its order) that have rows, and why the others have none."""
    everything, _ = select_targets(model)
    missing = [name for name in stats.sources if name not in everything]
    if missing:
        raise ValueError(
            f"`stats` has layers that `model` does not have as analyzable layers: {missing}. "
            "Pass the model the statistics were collected on."
        )
    targets, empty = {}, {}
    for name in stats.sources:
        target, inputs = everything[name], stats[name]
        fan_in = weight_matrix(target)[0].shape[1]
        if inputs.dim != fan_in:
            raise ValueError(
                f"`stats` for layer {name!r} hold inputs of length {inputs.dim}, but the model's {name!r} "
                f"({type(target.module).__name__}) has fan_in {fan_in}: the statistics come from another model. "
                "Pass the model they were collected on, or collect them again."
            )
        reason = inputs.empty_reason()
        if reason is not None:
            empty[name] = reason
        else:
            targets[name] = target
    return targets, empty


class UnanalyzableError(ValueError):
    """Layers whose ranks cannot be computed from what they hold; ``reasons`` maps each to why and what to do."""

    def __init__(self, reasons: dict[str, str]) -> None:
        self.reasons, self.layers = reasons, list(reasons)
        super().__init__("; ".join(f"layer {name!r}: {reason}" for name, reason in reasons.items()))


_DIVERGED = ("its weight holds NaN or Inf, so no rank can be computed from it: training has most likely diverged (a "
             "NaN loss, a learning rate too high). `Trainer(detect_anomaly=True)` finds the step it started at; "
             "`EarlyStopping(monitor=..., check_finite=True)` stops such runs")


def _check_analyzable(targets: dict[str, Target], stats: ActivationStatistics) -> None:
    """Raise an :class:`UnanalyzableError` for NaN or Inf weights and float32 input sums that over- or underflowed."""
    reasons = {}
    for name, target in targets.items():
        if not all(bool(torch.isfinite(t).all()) for t in weight_matrix(target) if t is not None):
            reasons[name] = _DIVERGED
            continue
        inputs = stats[name]
        if inputs.dtype != torch.float32:
            continue
        diagonal = inputs.diagonal()
        lost = (diagonal < torch.finfo(torch.float32).tiny) & (inputs.total != 0)
        if not bool(torch.isfinite(diagonal).all()) or bool(lost.any()):
            largest = float(inputs.total.abs().max()) / max(int(inputs.count), 1)
            reasons[name] = (f"the float32 sums of its input (entries near {largest:.0e}) overflowed or underflowed, "
                             "so its second moment is lost: collect its statistics with dtype=torch.float64")
    if reasons:
        raise UnanalyzableError(reasons)


def _precision_limited(inputs: InputStatistics, scales: Tensor, out_scales: Tensor, out_values: Tensor,
                       threshold: float, centered: bool) -> bool:
    """Whether the round-off bounds of the input or output moment exceed the ``1 - threshold`` the rank leaves out."""
    if threshold >= 1:
        return False  # at threshold 1 every eigenvalue counts: round-off removal decides by design
    roundoff, left_out = inputs.roundoff(), 1 - threshold
    in_bounds, out_bounds = roundoff * float(scales.square().sum()), roundoff * float(out_scales.square().sum())
    out_trace = float(out_values.double().clamp(min=0).sum())
    return in_bounds > left_out * input_trace(inputs, centered) or out_bounds > left_out * out_trace


def _few_rows(stats: ActivationStatistics, targets: dict[str, Target], held: list[str], widening: set[str],
              centered: bool, threshold: float, exact: Float64Matrices, advance: Callable[[int], Any]
              ) -> dict[str, dict[str, LayerSpectra]]:
    """Per input whose rows are held (:mod:`~lightning_rank.spectral.few_rows`), the spectra of each of its layers."""
    out: dict[str, dict[str, LayerSpectra]] = {}
    for key in held:
        names = [name for name in targets if stats.sources[name] == key]
        matrices = {name: tuple(t.detach().to(device=stats.device, dtype=torch.float64) if t is not None else None
                                for t in weight_matrix(targets[name])) for name in names}
        sizes = {name: w.shape[0] if name not in widening else w.shape[1] + (b is not None and not centered)
                 for name, (w, b) in matrices.items()}
        spectrum, outputs, out_scales = few_rows_spectra(stats, key, matrices, centered, threshold, exact, sizes)
        mean, scales = stats.inputs[key].mean(), input_scales(stats.inputs[key])
        out[key] = {name: LayerSpectra(targets[name], *matrices[name], None, mean, spectrum, outputs[name], scales,
                                       out_scales[name]) for name in names}
        advance(1 + len(names))
    return out


def _widens(target: Target) -> bool:
    weight, _ = weight_matrix(target)
    return weight.shape[0] > weight.shape[1] + 1


# Moments smaller than this are solved in float64 whatever ``eig_dtype`` says.
FLOAT32_FROM = 256

def skipped_layer(model: nn.Module, name: str, reason: str) -> LayerRank:
    try:
        module = get_submodule(model, name)
    except AttributeError:
        module = None
    kind = out_features = in_features = None
    if module is not None and isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() >= 2:
        weight = module.weight
        out_features, in_features = weight.shape[0], weight[0].numel()
        kind = layer_kind(module)  # the report's one vocabulary of kinds
    elif name.endswith(".in_proj"):
        try:
            mha = get_submodule(model, name[: -len(".in_proj")])
        except AttributeError:
            mha = None
        if isinstance(mha, nn.MultiheadAttention):
            kind, out_features, in_features = "mha_in_proj", 3 * mha.embed_dim, mha.embed_dim
    return LayerRank(name=name, kind=kind, in_features=in_features, out_features=out_features, skipped=reason)
