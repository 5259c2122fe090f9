"""One replaceable layer as rank allocation sees it: :class:`LayerCandidate`.

A candidate holds the layer's ``(out, fan_in)`` weight ``W`` and the SVD of its whitened weight ``W S``
(``S S^T = C``, the input second moment). The best rank-``r`` weight on the data is ``W_r = U_r U_r^T W``,
whose relative output error ``E||(W - W_r) x||^2 / E||W x||^2`` is the tail of the squared singular
values (:func:`~lightning_rank.compress.factors.tail_curve`). Rank ``r`` costs ``r (out + fan_in)`` weight
parameters and ``r (out + fan_in) positions`` multiply-adds per example; a layer is only ever given a
rank up to break-even (:func:`~lightning_rank.compress.factors.break_even_rank`) or left dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_rank.compress.factors import break_even_rank, tail_curve
from lightning_rank.targets import Target


@dataclass
class LayerCandidate:
    """One replaceable layer and what allocation needs of it (all tensors float64, on one device).

    ``basis`` (``(out, k)``) and ``singular_values`` (``(k,)``, largest first) are the SVD of the
    whitened weight ``W S``; ``weight`` is ``W`` as ``(out, fan_in)``. ``target`` says where a
    :class:`Probe` writes ``W_r`` (``None``: the layer cannot be probed). ``dual`` (``None`` for the plain
    whitened truncation) makes the rank-``r`` weight the oblique projection ``W_r = B_r D_r^T W`` with
    ``B = basis``, ``D = dual`` (``D^T B = I``); :meth:`output_weighted` builds one.
    """

    name: str
    weight: Tensor
    basis: Tensor
    singular_values: Tensor
    bias_params: int = 0
    positions: float = 1.0
    target: Target | None = None
    dual: Tensor | None = None
    curve: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        squares = self.singular_values.detach().double().cpu().square()
        if self.dual is not None:  # W S = sum_i b_i s_i v_i^T with orthonormal v_i: ||b_i||^2 s_i^2 each
            squares = squares * self.basis.detach().double().cpu().square().sum(0)[: len(squares)]
        self.curve = tail_curve(squares, min(self.shape))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    @property
    def max_rank(self) -> int:
        """The largest rank that saves parameters (0 when none does)."""
        return break_even_rank(*self.shape)

    def params(self, rank: int | None) -> int:
        """Weight and bias parameters at ``rank`` (``None``: dense)."""
        out, fan_in = self.shape
        return self.bias_params + (out * fan_in if rank is None else rank * (out + fan_in))

    def macs(self, rank: int | None) -> float:
        """Multiply-adds per example at ``rank`` (``None``: dense)."""
        return (self.params(rank) - self.bias_params) * self.positions

    def error(self, rank: int | None) -> float:
        """Relative output error ``e[rank]`` of the whitened truncation on the data (0 when dense)."""
        return 0.0 if rank is None else float(self.curve[min(rank, len(self.curve) - 1)])

    def weight_at(self, rank: int) -> Tensor:
        """``W_r = U_r U_r^T W`` (the rank-``rank`` weight with the least output error on the data), or
        ``B_r D_r^T W`` with a ``dual``."""
        u = self.basis[:, :rank]
        v = u if self.dual is None else self.dual[:, :rank]
        return u @ (v.t() @ self.weight)

    def output_weighted(self, moment: Tensor, damping: float = 1e-2) -> LayerCandidate:
        """The candidate whose rank-``r`` weight minimizes ``tr(G (W - W_r) C (W - W_r)^T)`` instead of the
        layer's own output error: ``G`` (``(out, out)``) is the second moment of the model-output gradient
        at this layer's output (:meth:`~lightning_rank.compress.probe.Probe.weighted_damage`), damped by ``damping``
        times its mean eigenvalue, so output directions the model amplifies are kept first. With
        ``R^T R = G`` and ``R W S = U' s' V'^T``: ``W_r = R^-1 U'_r U'_r^T R W``. Returns ``self`` when ``G`` is 0."""
        if self.dual is not None:
            raise ValueError(f"layer {self.name!r} is already output-weighted")
        moment = moment.to(self.basis).double()
        out = moment.shape[0]
        trace = float(moment.diagonal().sum())
        if not trace > 0 or not torch.isfinite(moment).all():
            return self
        damped = moment + (damping * trace / out) * torch.eye(out, dtype=moment.dtype, device=moment.device)
        lower = torch.linalg.cholesky(damped)  # R = L^T: R^T R = G, and any such R gives the same W_r
        u, s, _ = torch.linalg.svd(lower.t() @ (self.basis * self.singular_values), full_matrices=False)
        basis = torch.linalg.solve_triangular(lower.t(), u, upper=True)
        return LayerCandidate(self.name, self.weight, basis, s, self.bias_params, self.positions, self.target,
                              dual=lower @ u)
