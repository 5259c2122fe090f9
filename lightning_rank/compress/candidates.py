"""One replaceable layer as rank allocation sees it: :class:`LayerCandidate`.

A candidate holds the layer's ``(out, fan_in)`` weight ``W`` and the SVD of its whitened weight ``W S``
(``S S^T = C``, the input second moment). The best rank-``r`` weight on the data is ``W_r = U_r U_r^T W``,
whose relative output error ``E||(W - W_r) x||^2 / E||W x||^2`` is the tail of the squared singular
values (:func:`~lightning_rank.compress.factors.tail_curve`). Rank ``r`` costs ``r (out + fan_in)`` weight
parameters and ``r (out + fan_in) positions`` multiply-adds per example; a layer is only ever given a
rank up to break-even (:func:`~lightning_rank.compress.factors.break_even_rank`) or left dense.

Planned over several processes, a candidate's matrices stay on the process that owns the layer: the others hold
them as ``meta`` tensors (shapes and memory layouts, no data) and a :class:`Holder`, and get a slice or product of
them, one at a time, only while they use it (:meth:`LayerCandidate.shared`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lightning_rank.compress.factors import break_even_rank, tail_curve
from lightning_rank.targets import Target


@dataclass(frozen=True)
class Holder:
    """Where a candidate's matrices are when one process owns them: that process (``src``), whether it is this one
    (``here``), ``broadcast(tensor, src)`` (in place, called on every process in the same order) and the device
    tensors are received on."""

    src: int
    here: bool
    broadcast: Callable[[Tensor, int], None]
    device: torch.device

    def send(self, tensor: Tensor) -> Tensor:
        """``tensor`` as the owner computed it, on every process: elsewhere ``tensor`` is its ``meta`` stand-in (the
        same expression on the ``meta`` stand-ins), whose layout the received copy takes, so that products of it
        round as the owner's do."""
        if self.here:
            self.broadcast(tensor.contiguous(), self.src)
            return tensor
        buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        self.broadcast(buffer, self.src)
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=self.device).copy_(buffer)

    def stand_ins(self, make: Callable[[], tuple[Tensor, ...]], count: int) -> tuple[Tensor, ...]:
        """``make()`` (``count`` float64 matrices or vectors) on the owner; elsewhere their ``meta`` stand-ins, of the
        owner's shapes and layouts. Raises on every process when ``make`` raised on the owner."""
        layouts = torch.zeros(1 + 5 * count, dtype=torch.int64, device=self.device)  # ok, then ndim, shape, stride
        made, failure = None, None
        if self.here:
            try:
                made = make()
                for i, t in enumerate(made):
                    shape, stride = list(t.shape) + [1] * (2 - t.dim()), list(t.stride()) + [1] * (2 - t.dim())
                    layouts[1 + 5 * i : 6 + 5 * i] = torch.tensor([t.dim(), *shape, *stride])
                layouts[0] = 1
            except Exception as error:  # told to the others, or they would wait for this process
                failure = error
        self.broadcast(layouts, self.src)
        if failure is not None:
            raise failure
        if not layouts[0]:
            raise RuntimeError(f"process {self.src}, which holds the layer, failed (see its error)")
        if made is not None:
            return made
        out = []
        for ndim, *sizes in layouts[1:].view(count, 5).tolist():
            shape, stride = sizes[:ndim], sizes[2 : 2 + ndim]
            out.append(torch.empty_strided(shape, stride, dtype=torch.float64, device="meta"))
        return tuple(out)


@dataclass
class LayerCandidate:
    """One replaceable layer and what allocation needs of it (all tensors float64, on one device).

    ``basis`` (``(out, k)``) and ``singular_values`` (``(k,)``, largest first) are the SVD of the
    whitened weight ``W S``; ``weight`` is ``W`` as ``(out, fan_in)``. ``target`` says where a
    :class:`Probe` writes ``W_r`` (``None``: the layer cannot be probed). ``dual`` (``None`` for the plain
    whitened truncation) makes the rank-``r`` weight the oblique projection ``W_r = B_r D_r^T W`` with
    ``B = basis``, ``D = dual`` (``D^T B = I``); :meth:`output_weighted` builds one. ``bias``: the layer's
    bias (its full vector, when the layer is sharded), which the probe's damage curves subtract from outputs.
    ``holder``: the owner of the matrices when several processes plan (see the module docstring); without it
    every tensor is here. ``curve`` is computed from the singular values unless given.
    """

    name: str
    weight: Tensor
    basis: Tensor
    singular_values: Tensor
    bias_params: int = 0
    positions: float = 1.0
    target: Target | None = None
    dual: Tensor | None = None
    bias: Tensor | None = None
    holder: Holder | None = None
    curve: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.curve is not None:
            return
        squares = self.singular_values.detach().double().cpu().square()
        if self.dual is not None:  # W S = sum_i b_i s_i v_i^T with orthonormal v_i: ||b_i||^2 s_i^2 each
            squares = squares * self.basis.detach().double().cpu().square().sum(0)[: len(squares)]
        self.curve = tail_curve(squares, min(self.shape))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        """Where this process receives or computes what the probe needs of the candidate."""
        return self.holder.device if self.holder is not None else self.singular_values.device

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

    def shared(self, tensor: Tensor) -> Tensor:
        """``tensor``, computed from this candidate's matrices, as its owner has it (see :meth:`Holder.send`)."""
        return tensor if self.holder is None else self.holder.send(tensor)

    def weight_at(self, rank: int) -> Tensor:
        """``W_r = U_r U_r^T W`` (the rank-``rank`` weight with the least output error on the data), or
        ``B_r D_r^T W`` with a ``dual``; with a holder, ``U_r`` and ``U_r^T W`` come from the owner."""
        u = self.basis[:, :rank]
        v = u if self.dual is None else self.dual[:, :rank]
        return self.shared(u) @ self.shared(v.t() @ self.weight)

    def output_weighted(self, moment: Tensor, damping: float = 1e-2) -> LayerCandidate:
        """The candidate whose rank-``r`` weight minimizes ``tr(G (W - W_r) C (W - W_r)^T)`` instead of the
        layer's own output error: ``G`` (``(out, out)``) is the second moment of the model-output gradient
        at this layer's output (:meth:`~lightning_rank.compress.probe.Probe.weighted_damage`), damped by ``damping``
        times its mean eigenvalue, so output directions the model amplifies are kept first. With
        ``R^T R = G`` and ``R W S = U' s' V'^T``: ``W_r = R^-1 U'_r U'_r^T R W``. Returns ``self`` when ``G`` is 0."""
        if self.dual is not None:
            raise ValueError(f"layer {self.name!r} is already output-weighted")
        moment = moment.to(device=self.singular_values.device, dtype=torch.float64)
        out = moment.shape[0]
        trace = float(moment.diagonal().sum())
        if not trace > 0 or not torch.isfinite(moment).all():
            return self

        def weighted() -> tuple[Tensor, Tensor, Tensor]:
            damped = moment + (damping * trace / out) * torch.eye(out, dtype=moment.dtype, device=moment.device)
            lower = torch.linalg.cholesky(damped)  # R = L^T: R^T R = G, and any such R gives the same W_r
            u, s, _ = torch.linalg.svd(lower.t() @ (self.basis * self.singular_values), full_matrices=False)
            return torch.linalg.solve_triangular(lower.t(), u, upper=True), lower @ u, s

        if self.holder is None:
            basis, dual, s = weighted()
            return replace(self, basis=basis, singular_values=s, dual=dual, curve=None)
        basis, dual, s = self.holder.stand_ins(weighted, 3)
        made = replace(self, basis=basis, singular_values=s, dual=dual, curve=None if self.holder.here else
                       torch.empty(min(self.shape) + 1, dtype=torch.float64, device="meta"))
        made.curve = made.shared(made.curve).cpu()
        return made
