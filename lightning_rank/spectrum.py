"""Pure spectral math: energy rank, effective rank, and the output second moment of ``y = W x + b``.

Everything here works on plain tensors and knows nothing of modules or Lightning. Eigenvalues come
in ascending or any order; functions taking a spectrum accept leading batch dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float in ``(0, 1]``, or a ``ValueError`` that names it."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"`threshold` must be a number in (0, 1], got {threshold!r}")
    return float(threshold)


# Round-off of accumulated sums. Summing m products in a dtype of unit round-off u leaves an error of
# about sqrt(m) u times the sum of their magnitudes (the probabilistic bound of Higham and Mary, 2019;
# the worst case, m u, grows with the data and would remove real spectrum). For a Gram entry that
# magnitude is at most sqrt(G_ii G_jj) (Cauchy-Schwarz), so |error(C_ij)| <= r sqrt(C_ii C_jj).
ROUNDOFF_SAFETY = 8.0


def sum_roundoff(dtype: torch.dtype, rows: int, updates: int) -> float:
    """``r`` with ``|error(C_ij)| <= r * sqrt(C_ii C_jj)`` for sums of ``rows`` rows added in ``updates`` batches.

    Each entry is a sum of about ``rows / updates`` products per batch followed by ``updates`` additions.
    """
    terms = rows / max(updates, 1) + updates
    return ROUNDOFF_SAFETY * torch.finfo(dtype).eps * max(terms, 1.0) ** 0.5


def roundoff_bounds(roundoff: float, scales: Tensor, vectors: Tensor | None = None) -> Tensor:
    """How far round-off can move each eigenvalue of a moment whose entries err by ``roundoff * s_i s_j``.

    With the eigenvectors ``v_k`` (columns) the bound is per direction, ``roundoff * ||diag(s) v_k||^2``:
    directions in channels of small scale get a small bound, whatever a few huge channels hold.
    Without them it is the largest over all directions, ``roundoff * max_i s_i^2`` (a 0-d tensor).
    """
    squares = scales.square()
    if vectors is None:
        return roundoff * squares.max() if squares.numel() else squares.new_zeros(())
    return roundoff * (vectors.square() * squares[:, None]).sum(dim=0)


def solver_bound(eigenvalues: Tensor, dtype: torch.dtype) -> Tensor:
    """Error bound of a backward-stable symmetric eigensolver in ``dtype``: ``n * eps * max |lambda|``."""
    n = eigenvalues.shape[-1]
    return n * torch.finfo(dtype).eps * eigenvalues.abs().amax(dim=-1, keepdim=True).squeeze(-1)


def clean_spectrum(eigenvalues: Tensor, bounds: Tensor | float) -> Tensor:
    """Eigenvalues of a PSD matrix with round-off removed: those not above their error ``bounds`` become 0."""
    eigenvalues = eigenvalues.clamp(min=0)
    return torch.where(eigenvalues > bounds, eigenvalues, torch.zeros_like(eigenvalues))


def energy_rank_interval(eigenvalues: Tensor, bounds: Tensor | float, threshold: float) -> tuple[int, int]:
    """The least and the largest :func:`energy_rank` of any spectrum within ``eigenvalues +- bounds`` (clamped at 0).

    Equal ends mean the rank is certain whatever the errors are; unequal ones, that a tighter bound is needed.
    """
    threshold = check_threshold(threshold)
    values = eigenvalues.double().clamp(min=0)
    bounds = torch.as_tensor(bounds, dtype=torch.float64, device=values.device).expand_as(values)
    order = values.argsort(descending=True)
    values, bounds = values[order], bounds[order]
    lower, upper = (values - bounds).clamp(min=0), values + bounds
    scale = upper.amax().clamp(min=torch.finfo(torch.float64).tiny) if upper.numel() else 1.0
    lower, upper = lower / scale, upper / scale  # as energy_rank does: no under/overflow

    def first_rank(top: Tensor, rest: Tensor) -> int:
        """The energy rank when the top eigenvalues take their ``top`` values and the others their ``rest`` ones."""
        held, rest_held = top.cumsum(0), rest.cumsum(0)
        remaining = rest_held[-1] - rest_held  # exactly 0 after the last
        reached = (1 - threshold) * held >= threshold * remaining - 1e-12 * threshold * (held + remaining)
        reached[-1] = True
        return int(reached.int().argmax()) + 1

    least = 0 if float(lower.sum()) == 0 else first_rank(upper, lower)
    most = 0 if float(upper.sum()) == 0 else first_rank(lower, upper)
    return least, most


def energy_rank(eigenvalues: Tensor, threshold: float) -> Tensor:
    """The smallest ``k`` whose top-``k`` eigenvalues hold at least ``threshold`` of the trace (0 for a zero matrix)."""
    threshold = check_threshold(threshold)
    descending = eigenvalues.double().clamp(min=0).sort(dim=-1, descending=True).values
    descending = descending / descending[..., :1].clamp(min=torch.finfo(torch.float64).tiny)  # no under/overflow
    cumulative = descending.cumsum(dim=-1)
    total = cumulative[..., -1:]
    # A relative slack keeps threshold=1.0 from counting eigenvalues lost to summation round-off.
    target = threshold * total * (1 - 1e-12)
    rank = (cumulative < target).sum(dim=-1) + 1
    return torch.where(total.squeeze(-1) > 0, rank, torch.zeros_like(rank))


def effective_rank(eigenvalues: Tensor) -> Tensor:
    """Roy and Vetterli's effective rank ``exp(H(p))``, ``p`` the normalized spectrum (0 for a zero matrix)."""
    spectrum = eigenvalues.double().clamp(min=0)
    total = spectrum.sum(dim=-1, keepdim=True)
    p = spectrum / total.clamp(min=torch.finfo(torch.float64).tiny)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


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


def utilization(rank: int, out_features: int, in_features: int) -> float:
    """``rank / min(out, fan_in)``."""
    return rank / min(out_features, in_features)
