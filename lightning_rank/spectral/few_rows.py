"""Spectra of moments built from fewer rows than their width, from the rows' own small Gram.

A moment ``C = X^T X / n`` of ``n < d`` rows has at most ``n`` nonzero eigenvalues, those of ``X X^T / n``; the
output moment of ``y = W x + b`` is ``Y^T Y / n`` with ``Y = X W^T + b``, whose nonzero spectrum is that of the
smaller of ``Y^T Y`` and ``Y Y^T``. Formed in float64 from the held rows (float32 products are exact in float64),
these cost ``n^2 d`` and an ``n x n`` eigenproblem instead of the ``d x d`` one, and their ranks are certified by
the same bounds as every other moment's (:func:`~lightning_rank.spectral.certify.settle`), which solve the full
float64 moment only where those bounds leave a rank open.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from lightning_rank.spectral.certify import Float64Matrices, Spectrum, input_scales, input_trace, settle
from lightning_rank.spectral.spectrum import symmetric_eigen
from lightning_rank.stats.sums import ActivationStatistics


def held_keys(stats: ActivationStatistics, keys: Collection[str]) -> list[str]:
    """The inputs among ``keys`` whose rows are still held (fewer rows than ``HOLD_ROWS`` times their width)."""
    return [key for key in keys if stats.inputs[key].holds_rows and int(stats.inputs[key].count) > 0]


def _nonzero_spectrum(rows: Tensor, count: int, size: int) -> Tensor:
    """Eigenvalues (ascending) of ``rows^T rows / count`` padded with exact zeros to ``size``, from the smaller Gram."""
    small = rows @ rows.t() if rows.shape[0] <= rows.shape[1] else rows.t() @ rows
    values = symmetric_eigen(small / count, vectors=False)
    values = values[-size:]
    return torch.cat([values.new_zeros(size - values.numel()), values])


def few_rows_spectra(
    stats: ActivationStatistics,
    key: str,
    layers: dict[str, tuple[Tensor, Tensor | None]],
    centered: bool,
    threshold: float,
    exact: Float64Matrices,
    output_sizes: dict[str, int],
) -> tuple[Spectrum, dict[str, Spectrum], dict[str, Tensor]]:
    """The certified input spectrum of input ``key`` and the output spectrum of each of its ``layers`` (name to
    weight and bias), each output's of length ``output_sizes[name]``, from the held rows; also each output's
    round-off scales."""
    inputs = stats.inputs[key]
    count = int(inputs.count)
    scales = input_scales(inputs)
    # Entries zero in every row (taps always in a convolution's padding, dead channels) add nothing to any product.
    active = (inputs.diagonal() > 0).nonzero().squeeze(1)
    rows = inputs.rows.index_select(1, active).double()
    if centered:
        rows = rows - inputs.mean().to(rows.device)[active]
    values = _nonzero_spectrum(rows, count, inputs.dim)
    spectrum = settle(values, lambda: exact.moment(key), inputs, scales, threshold, keep_vectors=False,
                      trace=input_trace(inputs, centered))
    outputs, out_scales = {}, {}
    for name, (weight, bias) in layers.items():
        weight = weight.double().to(rows.device)
        bias = None if bias is None else bias.double().to(rows.device)
        produced = rows @ weight.index_select(1, active).t()
        if bias is not None and not centered:
            produced = produced + bias
        out_scales[name] = (weight.square() @ scales.to(weight.device).square()).sqrt()
        outputs[name] = settle(
            _nonzero_spectrum(produced, count, output_sizes[name]),
            lambda weight=weight, bias=bias: exact.output_moment(weight, bias, key),
            inputs, out_scales[name], threshold, keep_vectors=False)
    return spectrum, outputs, out_scales
