"""Pure spectral math: energy rank, effective rank, and the output second moment of ``y = W x + b``.

Everything here works on plain tensors and knows nothing of modules or Lightning. Eigenvalues come
in ascending or any order; functions taking a spectrum accept leading batch dimensions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_rank.checks import check_threshold
from lightning_rank.stats.sums import ROUNDOFF_SAFETY


def roundoff_bounds(roundoff: float, scales: Tensor, vectors: Tensor) -> Tensor:
    """How far round-off can move each eigenvalue of a moment whose entries err by ``roundoff * s_i s_j``: along
    each eigenvector ``v_k`` (columns), ``roundoff * ||diag(s) v_k||^2``. Directions in channels of small scale get
    a small bound, whatever a few huge channels hold; the bounds lie between ``roundoff * min s_i^2`` and
    ``roundoff * max s_i^2`` and sum to ``roundoff * |s|^2``."""
    return roundoff * (vectors.square() * scales.square()[:, None]).sum(dim=0)


def solver_bound(largest: float, size: int, dtype: torch.dtype) -> float:
    """Error bound ``e`` of each eigenvalue a backward-stable symmetric eigensolver computes in ``dtype`` for a
    ``size x size`` matrix whose largest eigenvalue magnitude is ``largest``.

    ``e = 8 sqrt(n) u largest`` (``u`` the unit round-off): the solver's backward error under the
    probabilistic model of Higham and Mary that :func:`~lightning_rank.stats.sums.sum_roundoff` uses too, where a sum of ``m``
    computed eigenvalues errs by at most ``sqrt(m) e``. In float32 at ``n = 3072`` this is 3x the largest
    eigenvalue error and 6x the largest error of a partial sum measured against float64.
    """
    return ROUNDOFF_SAFETY * size**0.5 * (torch.finfo(dtype).eps / 2) * float(largest)


# Gaussian probes estimate the error of a float32 stand-in for a float64 matrix: E ||(A - M) w||^2 = ||A - M||_F^2.
# The mean over 16 probes falls below 1/16 of it with probability under 1e-7 (chi-square, worst for an
# error of rank one), so 4x its root bounds ||A - M||_F, and with it every eigenvalue's shift (Weyl) and
# the shift of any sum of m eigenvalues (sqrt(m) times: Ky Fan), at that probability.
PROBES, PROBE_FACTOR = 16, 4.0


def stand_in_error(stand_in: Tensor | Callable[[Tensor], Tensor], reference: Callable[[Tensor], Tensor], size: int,
                   device: torch.device | str = "cpu") -> float:
    """A bound on ``||A - M||_F`` (see ``PROBES``) for ``size x size`` matrices applied in float64 by ``reference``
    (``X -> M X``) and by ``stand_in`` (the matrix ``A`` itself, or ``X -> A X``)."""
    if size == 0:
        return 0.0
    generator = torch.Generator(device=device).manual_seed(0)  # the same probes every run
    probes = torch.randn(size, PROBES, generator=generator, dtype=torch.float64, device=device)
    applied = stand_in.double() @ probes if isinstance(stand_in, Tensor) else stand_in(probes)
    residual = applied - reference(probes)
    return PROBE_FACTOR * float(residual.square().sum().div(PROBES).sqrt())


def largest_eigenvalue(matrix: Tensor, steps: int = 3) -> Tensor:
    """An estimate (from below) of the largest eigenvalue of a PSD matrix: a few block power steps from fixed
    Gaussian probes, for choosing a precision, never for a rank."""
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    block = torch.randn(matrix.shape[-1], min(PROBES, matrix.shape[-1]), generator=generator, dtype=matrix.dtype,
                        device=matrix.device)
    for _ in range(steps):
        block = matrix @ block
        block = block / block.norm(dim=0, keepdim=True).clamp(min=torch.finfo(matrix.dtype).tiny)
    return ((matrix @ block) * block).sum(dim=0).max()


def symmetric_eigen(matrix: Tensor, vectors: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and, with ``vectors``, eigenvectors (columns) of a symmetric PSD matrix, robustly.

    Exact zero rows and columns are taken out first: their eigenvalues are exactly 0 and their eigenvectors unit
    vectors (a 3x3 convolution over a 1x1 map has 8 of 9 patch entries always zero, a dead channel one). A solve
    that does not converge is tried again in float64, then by numpy's LAPACK, then as an SVD (for a PSD matrix its
    singular pairs are the eigenpairs); a ``torch.linalg.LinAlgError`` only when all of them fail.
    """
    active = (matrix != 0).any(dim=-1)
    if matrix.dim() != 2 or bool(active.all()) or matrix.numel() == 0:
        return _robust_eigen(matrix, vectors)
    index = active.nonzero().squeeze(1)
    solved = _robust_eigen(matrix[index][:, index], vectors)
    sub_values = solved[0] if vectors else solved
    values = torch.zeros(matrix.shape[-1], dtype=sub_values.dtype, device=matrix.device)
    values[: len(index)] = sub_values
    order = values.argsort()
    if not vectors:
        return values[order]
    full = torch.zeros(matrix.shape, dtype=sub_values.dtype, device=matrix.device)
    full[index[:, None], torch.arange(len(index), device=matrix.device)] = solved[1]
    idle = (~active).nonzero().squeeze(1)
    full[idle, len(index) + torch.arange(len(idle), device=matrix.device)] = 1.0
    return values[order], full[:, order]


def _robust_eigen(matrix: Tensor, vectors: bool) -> Tensor | tuple[Tensor, Tensor]:
    in_float64 = [] if matrix.dtype == torch.float64 else [_float64_eigen]
    for solve in [_torch_eigen, *in_float64, _numpy_eigen]:
        try:
            return solve(matrix, vectors)
        except (torch.linalg.LinAlgError, np.linalg.LinAlgError):
            continue
    return _svd_eigen(matrix, vectors)


def _torch_eigen(matrix: Tensor, vectors: bool) -> Tensor | tuple[Tensor, Tensor]:
    return torch.linalg.eigh(matrix) if vectors else torch.linalg.eigvalsh(matrix)


def _float64_eigen(matrix: Tensor, vectors: bool) -> Tensor | tuple[Tensor, Tensor]:
    return _torch_eigen(matrix.double(), vectors)


def _numpy_eigen(matrix: Tensor, vectors: bool) -> Tensor | tuple[Tensor, Tensor]:
    array = matrix.detach().double().cpu().numpy()
    if vectors:
        values, basis = np.linalg.eigh(array)
        return torch.from_numpy(values).to(matrix.device), torch.from_numpy(basis).to(matrix.device)
    return torch.from_numpy(np.linalg.eigvalsh(array)).to(matrix.device)


def _svd_eigen(matrix: Tensor, vectors: bool) -> Tensor | tuple[Tensor, Tensor]:
    """For a PSD matrix its singular pairs are its eigenpairs (largest first, so flipped)."""
    u, s, _ = torch.linalg.svd(matrix.double())
    return (s.flip(-1), u.flip(-1)) if vectors else s.flip(-1)


def clean_spectrum(eigenvalues: Tensor, bounds: Tensor | float) -> Tensor:
    """Eigenvalues of a PSD matrix with round-off removed: those not above their error ``bounds`` become 0."""
    eigenvalues = eigenvalues.clamp(min=0)
    return torch.where(eigenvalues > bounds, eigenvalues, torch.zeros_like(eigenvalues))


def energy_rank_interval(
    eigenvalues: Tensor,
    threshold: float,
    *,
    error: float = 0.0,
    trace: float | None = None,
    zero_below: float = 0.0,
    keep_above: float = 0.0,
    zeroed_at_most: float = math.inf,
) -> tuple[int, int]:
    """The least and the largest energy rank of the round-off-free spectrum these computed ``eigenvalues`` allow.

    The exact eigenvalues ``lambda_j`` differ from the computed ones by at most ``error`` each, and a sum
    of ``m`` of them by at most ``sqrt(m) error`` (:func:`solver_bound`); ``trace``, when given, is their
    exact sum. Round-off removal zeroes ``lambda_j`` exactly when it is at most its own bound ``b_j``, with
    ``zero_below <= b_j <= keep_above`` and the bounds of the zeroed ones summing to at most
    ``zeroed_at_most``. Only the total removed mass and the eigenvalues surely kept decide the rank, so no
    eigenvector is needed. Equal ends mean the rank is certain; unequal ones, that a sharper solve is needed.
    """
    threshold = check_threshold(threshold)
    # A few vector operations on n numbers: on the host in numpy, several times quicker than torch at this size.
    values = -np.sort(-eigenvalues.detach().double().cpu().numpy())
    n = values.size
    if n == 0:
        return 0, 0
    negative = -float(values[values < 0].sum())  # below zero only by solver error: count it as more error
    values = np.maximum(values, 0.0)
    total, error = float(values.sum()), float(error)
    if trace is not None and abs(total - negative - trace) > n**0.5 * error + 1e-12 * abs(trace):
        return 0, n  # the computed spectrum contradicts the error model here: do not trust it

    kept = int((values - error > keep_above).sum())  # a prefix: above every possible bound
    zeroed = int((values + error <= zero_below).sum())  # a suffix: below every possible bound
    if zeroed == n:
        return 0, 0
    removed_least = max(float(values[n - zeroed:].sum()) - zeroed**0.5 * error, 0.0)
    removed_most = min(float(values[kept:].sum()) + (n - kept) ** 0.5 * error + negative, zeroed_at_most)
    removed_most = max(removed_most, removed_least)

    ranks = np.arange(1, n + 1, dtype=np.float64)
    held = np.cumsum(values)
    rest = np.cumsum(values[::-1])[::-1] - values  # the sum after each position, summed from the small end
    held_error, rest_error = np.sqrt(ranks) * error, np.sqrt(n - ranks) * error + negative
    # Reached at k: (1 - t) S_k >= t (R_k - Z), S_k the top-k sum, R_k the rest, Z the removed mass.
    margin_low = (1 - threshold) * (held - held_error) - threshold * (rest + rest_error - removed_least)
    margin_high = (1 - threshold) * (held + held_error) - threshold * (rest - rest_error - removed_most)
    if trace is not None:  # the same margin as S_k - t (T - Z): often tighter, the rest's error not entering
        margin_low = np.maximum(margin_low, held - held_error - threshold * (trace - removed_least))
        margin_high = np.minimum(margin_high, held + held_error - threshold * (trace - removed_most))
    # energy_rank counts a margin down to -1e-12 t T as reached; float64 sums here err by far less than 1e-13 T
    surely = (margin_low >= -0.9e-12 * total) & (ranks <= kept)  # beyond `kept` the top-k sum may lose removed values
    possibly = margin_high >= -1.1e-12 * total
    most = int(surely.argmax()) + 1 if surely.any() else n
    if removed_most >= total - n**0.5 * error:
        return 0, most  # everything may be round-off
    return (int(possibly.argmax()) + 1 if possibly.any() else n), most


def energy_rank(eigenvalues: Tensor, threshold: float) -> Tensor:
    """The smallest ``k`` whose top-``k`` eigenvalues hold at least ``threshold`` of the trace (0 for a zero matrix)."""
    threshold = check_threshold(threshold)
    # n numbers a spectrum: numpy on the host is several times quicker than torch at these sizes
    values = -np.sort(-np.maximum(eigenvalues.detach().double().cpu().numpy(), 0.0), axis=-1)
    if values.shape[-1] == 0:
        return torch.zeros(values.shape[:-1], dtype=torch.int64, device=eigenvalues.device)
    values = values / np.maximum(values[..., :1], np.finfo(np.float64).tiny)  # no under/overflow
    cumulative = np.cumsum(values, axis=-1)
    total = cumulative[..., -1:]
    # A relative slack keeps threshold=1.0 from counting eigenvalues lost to summation round-off.
    rank = (cumulative < threshold * total * (1 - 1e-12)).sum(axis=-1) + 1
    return torch.as_tensor(np.where(total[..., 0] > 0, rank, 0), device=eigenvalues.device)


def effective_rank(eigenvalues: Tensor) -> Tensor:
    """Roy and Vetterli's effective rank ``exp(H(p))``, ``p`` the normalized spectrum (0 for a zero matrix)."""
    # n numbers a spectrum: numpy on the host is several times quicker than torch at these sizes
    spectrum = np.maximum(eigenvalues.detach().double().cpu().numpy(), 0.0)
    total = spectrum.sum(axis=-1, keepdims=True)
    p = spectrum / np.maximum(total, np.finfo(np.float64).tiny)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)
    return torch.as_tensor(np.where(total[..., 0] > 0, np.exp(entropy), 0.0), device=eigenvalues.device)


def output_moment(weight: Tensor, bias: Tensor | None, moment: Tensor, mean: Tensor, centered: bool = False) -> Tensor:
    """Second moment of ``y = W x + b`` from the input's: ``W C W^T + W mu b^T + b mu^T W^T + b b^T``.

    With ``centered=True``, ``moment`` is the input covariance and the result the output covariance
    ``W C W^T`` (the bias shifts the mean only).
    """
    out = weight @ moment @ weight.t()
    if bias is not None and not centered:
        u = weight @ mean
        out = out + torch.outer(u, bias) + torch.outer(bias, u) + torch.outer(bias, bias)
    return (out + out.t()) / 2


def output_moment_times(
    weight: Tensor, bias: Tensor | None, moment: Tensor, mean: Tensor, centered: bool = False
) -> Callable[[Tensor], Tensor]:
    """``X -> C_y X`` for the :func:`output_moment` ``C_y``, without forming it."""

    def times(x: Tensor) -> Tensor:
        out = weight @ (moment @ (weight.t() @ x))
        if bias is not None and not centered:
            u = weight @ mean
            out = out + torch.outer(u, bias @ x) + torch.outer(bias, u @ x) + torch.outer(bias, bias @ x)
        return out

    return times


def output_factor(
    weight: Tensor,
    bias: Tensor | None,
    eigenvalues: Tensor,
    eigenvectors: Tensor,
    mean: Tensor,
    centered: bool = False,
) -> Tensor:
    """A matrix ``A`` with ``A A^T`` equal to :func:`output_moment`, from the input moment's eigendecomposition.

    ``A`` has ``fan_in (+1)`` columns, so the nonzero output spectrum is that of the small ``A^T A``
    when the layer widens (``out > fan_in``). Uncentered, ``M = [[C, mu], [mu^T, 1]] = F F^T`` with
    ``F = [[V L^1/2, 0], [p^T, s]]``, ``p = L^-1/2 V^T mu`` and ``s = sqrt(1 - |p|^2)`` (``C >= mu mu^T``
    keeps ``|p| <= 1``), and ``A = [W, b] F``.
    """
    eigenvalues = eigenvalues.clamp(min=0)
    root = eigenvectors * eigenvalues.sqrt()
    factor = weight @ root
    if bias is None or centered:
        return factor
    positive = eigenvalues > 0
    p = torch.where(positive, (eigenvectors.t() @ mean) / eigenvalues.clamp(min=1e-300).sqrt(), 0.0)
    s = (1 - p.square().sum()).clamp(min=0).sqrt()
    return torch.cat([factor + torch.outer(bias, p), (s * bias).unsqueeze(1)], dim=1)


def cholesky_output_factor(
    weight: Tensor, bias: Tensor | None, moment: Tensor, mean: Tensor, centered: bool = False
) -> Tensor | None:
    """A matrix ``A = [W, b] L`` with ``L L^T = [[C, mu], [mu^T, 1]]`` (Cholesky), so ``A A^T`` is the
    :func:`output_moment`, like :func:`output_factor` but without an eigendecomposition; None when the moment is
    singular. Its entries err by about ``sqrt(n) u s_i s_j`` (``s = sqrt(diag C)``), the scale of the sums' own
    round-off."""
    if bias is None or centered:
        matrix, mapping = moment, weight
    else:
        one = torch.ones(1, 1, dtype=moment.dtype, device=moment.device)
        matrix = torch.cat([torch.cat([moment, mean[:, None]], dim=1), torch.cat([mean[None, :], one], dim=1)])
        mapping = torch.cat([weight, bias[:, None]], dim=1)
    lower, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        return None
    return mapping @ lower


def rounding_error(matrix: Tensor) -> float:
    """A bound on ``||M - C||_F`` for ``M``, a float32 (or float64) second moment made from the sums with at most
    two roundings of an entry (float32 sums: the count's conversion and the division; float64 sums: the conversion
    after a float64 division), each by at most ``u`` of it or half the subnormal spacing, and ``C`` the float64
    moment of the same sums: ``2 u ||M||_F`` with room for the norm's own round-off and float64's, plus the
    subnormal term."""
    info = torch.finfo(matrix.dtype)
    largest = float(torch.linalg.vector_norm(matrix, ord=math.inf)) if matrix.numel() else 0.0
    if not math.isfinite(largest):
        return math.inf
    # scaled by the largest entry, the squares can neither overflow nor lose what matters to underflow
    norm = largest * float(torch.linalg.vector_norm(matrix / largest)) if largest > 0 else 0.0
    return 3 * (info.eps / 2) * norm + matrix.numel() ** 0.5 * info.tiny * info.eps


def utilization(rank: int, out_features: int, in_features: int) -> float:
    """``rank / min(out, fan_in)``."""
    return rank / min(out_features, in_features)


# Large eigenproblems gain nothing from batching, and stacking them costs a copy of each.
_BATCH_BELOW = 1024


def eigen_batched(
    matrices: dict[str, Tensor], vectors: bool, advance: Callable[[int], Any] = lambda n: None
) -> dict[str, Any]:
    """Eigenvalues (with ``vectors``, eigenpairs) of each symmetric matrix, one batched call per size and dtype below
    ``_BATCH_BELOW``, each larger one alone with its zero rows deflated (:func:`symmetric_eigen`, which
    also solves every matrix of a batch that did not converge); ``advance(n)`` after each call of ``n`` matrices."""
    groups: dict[tuple[int, torch.dtype, str | None], list[str]] = defaultdict(list)
    for name, matrix in matrices.items():
        size = matrix.shape[0]
        groups[(size, matrix.dtype, None if size < _BATCH_BELOW else name)].append(name)
    out: dict[str, Any] = {}
    for names in groups.values():
        if len(names) == 1:
            out[names[0]] = symmetric_eigen(matrices[names[0]], vectors)
        else:
            try:
                stacked = torch.stack([matrices[name] for name in names])
                result = torch.linalg.eigh(stacked) if vectors else torch.linalg.eigvalsh(stacked)
                out.update(zip(names, zip(*result) if vectors else result))
            except torch.linalg.LinAlgError:
                out.update({name: symmetric_eigen(matrices[name], vectors) for name in names})
        advance(len(names))
    return out
