"""Pure factorization math on plain tensors: factors of ``W ~ A B``, output errors, the break-even rank.

Every number comes from the collected statistics, never from a second pass over data: with ``C`` the
input second moment, a layer's output error ``E||(W - W') x||^2`` is ``tr((W - W') C (W - W')^T)``.

- ``projection``: the paper's ``P_T W P_S`` (top eigenvectors of ``C`` and of the output moment ``C_y``,
  as many as the energy ranks ``k_S``, ``k_T`` at ``threshold``), truncated to the rank by an SVD of the
  small core ``U_T^T W V_S``; a rank above ``min(k_S, k_T)`` widens both projectors to that rank.
- ``whiten``: the rank-``r`` ``W'`` minimizing ``tr((W - W') C (W - W')^T)``. With ``C = S S^T``, it is the
  truncated SVD of ``W S`` mapped back; that equals ``U_r U_r^T W`` with ``U_r`` the top left singular
  vectors of ``W S``, so nothing is inverted and a singular ``C`` needs no care. The bias is kept
  exactly, so ``C`` is the uncentered moment.
- ``svd``: truncated SVD of ``W`` itself, data-free (works with ``stats=None``).

Nothing here knows modules, statistics objects or Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor


def output_error(weight: Tensor, approx: Tensor, moment: Tensor) -> Tensor:
    """``E||(W - W') x||^2 = tr((W - W') C (W - W')^T)`` for ``C = E[x x^T]``."""
    delta = weight - approx
    return ((delta @ moment) * delta).sum()


def whitened_svd(weight: Tensor, values: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors and singular values of the whitened weight ``W S``, ``S = V L^1/2`` for the input moment
    ``C = V diag(values) V^T``: ``(W S)(W S)^T = W C W^T``, so ``tr(D C D^T) = ||D S||_F^2`` for any ``D``."""
    u, s, _ = torch.linalg.svd(weight @ (vectors * values.clamp(min=0).sqrt()), full_matrices=False)
    return u, s


def tail_curve(squares: Tensor, size: int) -> Tensor:
    """``e[r] = sum_{i >= r} w_i / sum_i w_i`` for ``r = 0..size`` of the weights ``w`` (squared singular values, largest
    first; all zeros when they are): the relative output error of keeping the top ``r``."""
    energy = torch.zeros(size + 1, dtype=torch.float64, device=squares.device)
    squares = squares.double()[:size]
    energy[: len(squares)] = squares.flip(0).cumsum(0).flip(0)
    total = energy[0]
    return energy / total if total > 0 else energy


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Data-free truncated SVD ``W ~ A B``, the singular values split evenly between the factors."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def whiten_factors(weight: Tensor, basis: Tensor, rank: int, dual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Factors of ``W_r = B_r D_r^T W`` (``B = basis``, ``D = dual``, or ``basis`` itself without one). With ``basis``
    the left singular vectors of the whitened weight (:func:`whitened_svd`) and no dual, ``W_r`` is the rank-``rank``
    weight of least ``E||(W - W_r) x||^2``; a dual makes it an oblique projection (see
    :meth:`~lightning_rank.compress.candidates.LayerCandidate.output_weighted`)."""
    basis = basis[:, :rank]
    if dual is None:
        return balanced_factors(basis, basis.t() @ weight)
    q, t = torch.linalg.qr(basis)  # orthonormalize B, keep the product
    return balanced_factors(q, t @ (dual[:, :rank].t() @ weight))


def projection_factors(
    weight: Tensor, in_vectors: Tensor, out_vectors: Tensor, in_rank: int, out_rank: int, rank: int
) -> tuple[Tensor, Tensor]:
    """``P_T W P_S`` (top ``out_rank`` / ``in_rank`` eigenvectors, largest first) truncated to ``rank``."""
    if not rank <= min(in_rank, out_rank):
        raise ValueError(f"rank {rank} exceeds min(in_rank, out_rank) = {min(in_rank, out_rank)}")
    v_s, u_t = in_vectors[:, :in_rank], out_vectors[:, :out_rank]
    p, s, qh = torch.linalg.svd(u_t.t() @ weight @ v_s, full_matrices=False)
    root = s[:rank].sqrt()
    return u_t @ (p[:, :rank] * root), (root[:, None] * qh[:rank]) @ v_s.t()


def balanced_factors(u: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of ``u @ b`` (``u`` orthonormal) with the singular values split evenly, for fine-tuning."""
    p, s, qh = torch.linalg.svd(b, full_matrices=False)
    root = s.sqrt()
    return u @ (p * root), root[:, None] * qh


def break_even_rank(out: int, fan_in: int) -> int:
    """The largest ``r`` with ``r * (out + fan_in) < out * fan_in`` (0 when none): ranks above it save nothing."""
    return (out * fan_in - 1) // (out + fan_in)
