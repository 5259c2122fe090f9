"""Measuring what truncating layers does to the model's own output: :class:`Probe` and :meth:`Probe.linear_damage`.

The probe overwrites weights in place under ``no_grad`` and restores them bit-exactly (no module is
swapped, so it works for Linear, Conv and Hugging Face Conv1D alike); :meth:`Probe.linear_damage` gives every
layer's end-to-end damage at every rank from one forward and backward pass per calibration batch.
:mod:`~lightning_rank.compress.allocation` allocates ranks on those curves. With ``reduce`` (an in-place sum over
processes) each process probes its own calibration batches and every sum over batches is taken over all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rank.compress.candidates import LayerCandidate
from lightning_rank.stats.collect import default_forward, eval_mode
from lightning_rank.targets import Target, parameter_layout, weight_matrix

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch without these: nothing is sharded
    FSDPModule = DTensor = distribute_tensor = None


# -- the probe ---------------------------------------------------------------------------------
class Probe:
    """The model's own output on a few calibration batches, to measure what truncating layers does to it.

    ``forward(model, batch)`` defaults to :func:`~lightning_rank.collect`'s; ``output`` picks the tensor
    to compare from what it returns (default: the tensor itself, ``.logits``, ``["logits"]`` or the
    first element of a tuple). The error of a set of truncated layers is the relative squared error
    ``sum ||f' - f||^2 / sum ||f||^2`` over all batches. Weights are overwritten in place under
    ``no_grad`` and restored bit-exactly, even when the forward raises; no module is swapped.

    ``reduce``: an in-place sum over processes (e.g. ``torch.distributed.all_reduce``) when each process holds
    its own calibration batches (at least one): every sum over batches that a decision depends on (output
    energies and errors, damage curves, gradient moments, output positions) is then summed over all processes'
    batches before it is used, so every process gets the same numbers. Every process must make the same calls
    in the same order; :meth:`error`'s ``batches`` then counts the first batches of each process.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        *,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        output: Callable[[Any], Tensor] | None = None,
        seed: int = 0,
        reduce: Callable[[Tensor], None] | None = None,
    ) -> None:
        self.model = model
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("`batches` of the Probe yielded no batch: pass at least one calibration batch")
        self.forward = forward or default_forward
        self.output = output or _output_tensor
        self.seed = seed
        self.reduce = reduce
        self.passes = 0
        self._reference: list[Tensor] | None = None
        self.energies: list[float] = []

    def _run(self, batch: Any) -> Tensor:
        self.passes += 1
        return self.output(self.forward(self.model, batch))

    def reference(self) -> list[Tensor]:
        """The dense model's outputs, one per batch (computed once)."""
        if self._reference is None:
            with eval_mode(self.model), torch.no_grad():
                self._set_reference([self._run(b).detach().double() for b in self.batches])
        return self._reference

    def _set_reference(self, outputs: list[Tensor]) -> None:
        self._reference = outputs
        self.energies = [float(r.square().sum()) for r in outputs]

    def error(self, weights: Mapping[Target, Tensor | Callable[[], Tensor]], batches: int | None = None) -> float:
        """The model's relative output error with each target's weight (as ``(out, fan_in)``, or a function giving
        it) replaced, over all calibration batches or the first ``batches``. A sharded weight gets its shard of the
        matrix written (see :class:`overwritten`)."""
        reference = self.reference()[:batches]
        with eval_mode(self.model), torch.no_grad(), overwritten(weights, self.model):
            diff = sum(float((self._run(b).double() - r).square().sum()) for b, r in zip(self.batches, reference))
        energy = sum(self.energies[: len(reference)])
        diff, energy = self._summed(diff, energy)
        return diff / energy if energy > 0 else 0.0

    def _summed(self, *values: float) -> list[float]:
        """``values`` summed over processes with ``reduce`` (as they are without it)."""
        if self.reduce is None:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        self.reduce(total)
        return total.tolist()

    def positions(self, targets: Mapping[str, Target], batch_size: Callable[[Any], int] | None = None) -> dict[str, float]:
        """Output positions per example of each target, from hooks on one forward pass (rows / batch size)."""
        rows: dict[str, int] = {name: 0 for name in targets}
        handles = []
        for name, target in targets.items():
            def hook(module: nn.Module, args: tuple, out: Tensor, name: str = name, target: Target = target) -> None:
                out = out[0] if isinstance(out, tuple) else out
                channels = 1 if target.kind in ("conv1d", "conv2d") else -1
                rows[name] += out.numel() // out.shape[channels]
            handles.append(target.module.register_forward_hook(hook))
        batch = self.batches[0]
        try:
            with eval_mode(self.model), torch.no_grad():
                self._run(batch)
        finally:
            for handle in handles:
                handle.remove()
        size = batch_size(batch) if batch_size is not None else _batch_size(batch)
        if self.reduce is not None:  # over every process's first batch
            *counts, size = self._summed(*rows.values(), size)
            rows = dict(zip(rows, counts))
        return {name: count / size for name, count in rows.items()}

    def linear_damage(self, candidates: Mapping[str, LayerCandidate], samples: int = 1) -> dict[str, Tensor]:
        """Linearized relative output error of truncating each layer alone, at every rank: ``{name: D[r]}``.

        With ``g_p`` the gradient of ``z . f`` (``z`` a standard normal direction over the output) w.r.t.
        the layer's output at position ``p``, and ``y_p = W x_p``, the first-order change of ``z . f`` when
        ``W`` becomes ``U_r U_r^T W`` is ``-sum_{i >= r} c_i`` with ``c_i = sum_p (u_i . g_p)(u_i . y_p)``
        (``(b_i . g_p)(d_i . y_p)`` for a candidate with a dual: ``W_r = B_r D_r^T W``).
        Its square, averaged over examples (grouped by the leading dim) and ``z``, estimates ``E||f' - f||^2``
        for every ``r`` from one backward pass. ``samples`` directions ``z`` are drawn per batch. Entries
        above a layer's ``max_rank`` are not computed (0). The forward passes also give the probe its dense
        reference outputs when it has none yet.
        """
        return self._damage(dict(candidates), samples)

    def weighted_damage(
        self, candidates: Mapping[str, LayerCandidate], samples: int = 1, damping: float = 1e-2
    ) -> tuple[dict[str, LayerCandidate], dict[str, Tensor]]:
        """Output-weighted candidates and their :meth:`linear_damage` curves, from the same passes: on the first
        calibration batch one more backward pass gives each layer's gradient moment ``G = sum_p g_p g_p^T`` (``g_p``
        as in :meth:`linear_damage`, for a direction ``z`` of its own), and
        :meth:`~lightning_rank.compress.candidates.LayerCandidate.output_weighted` turns it into truncations that keep the
        output directions the model amplifies; their curves then come from the usual backward passes. Cost: one
        forward and ``samples`` backward passes per batch, plus one backward pass. With ``reduce``, ``G`` is summed over
        the first calibration batch of every process."""
        weighted = dict(candidates)

        def prepare(captured: dict[str, list[Tensor]], grads: dict[str, list[Tensor | None]]) -> None:
            reached = [any(g is not None for g in grads[name]) for name in candidates]
            if self.reduce is not None:  # a layer reached on any process gets its moment summed over all of them
                reached = [count > 0 for count in self._summed(*map(float, reached))]
            for (name, c), seen in zip(candidates.items(), reached):
                if seen:
                    moment = _gradient_moment(c, grads[name])
                    if self.reduce is not None:
                        self.reduce(moment)
                    weighted[name] = c.output_weighted(moment, damping)

        curves = self._damage(weighted, samples, prepare)
        return weighted, curves


    def _damage(
        self,
        candidates: dict[str, LayerCandidate],
        samples: int,
        prepare: Callable[[dict[str, list[Tensor]], dict[str, list[Tensor | None]]], None] | None = None,
    ) -> dict[str, Tensor]:
        """The passes of :meth:`linear_damage` over ``candidates`` (which ``prepare``, called after the extra
        backward pass on the first batch, may still replace)."""
        per_batch: list[dict[str, Tensor]] = []

        def accumulate(index: int, captured: dict[str, list[Tensor]], grads: dict[str, list[Tensor | None]]) -> None:
            if len(per_batch) < index + 1:
                per_batch.append({name: torch.zeros(len(c.curve), dtype=torch.float64) for name, c in candidates.items()})
            sums = per_batch[-1]
            for name, c in candidates.items():
                directions = _directions(c)  # from the layer's owner, one layer at a time
                coefficients = 0
                for y, g in zip(captured[name], grads[name]):
                    if g is not None:
                        coefficients = coefficients + _coefficients(c, y.detach(), g, *directions)
                if isinstance(coefficients, Tensor):  # (examples, max_rank + 2): tails sum_{i >= r} c_i
                    tails = coefficients.flip(1).cumsum(1).flip(1)[:, : c.max_rank + 1]
                    sums[name][: tails.shape[1]] += tails.square().sum(0) / samples

        self._backward_passes(candidates, accumulate, samples, prepare)
        totals = {name: sum(batch[name] for batch in per_batch) for name in candidates}
        energy = sum(self.energies)
        if self.reduce is not None:  # one collective: every curve, then the energy
            flat = torch.cat([*totals.values(), torch.tensor([energy], dtype=torch.float64)])
            self.reduce(flat)
            *curves, energy = flat.split([len(t) for t in totals.values()] + [1])
            totals, energy = dict(zip(totals, curves)), float(energy)
        return {name: totals[name] / (energy if energy > 0 else 1.0) for name in candidates}


    def _backward_passes(
        self,
        candidates: Mapping[str, LayerCandidate],
        accumulate: Callable[[int, dict[str, list[Tensor]], dict[str, list[Tensor | None]]], None],
        samples: int,
        prepare: Callable[[dict[str, list[Tensor]], dict[str, list[Tensor | None]]], None] | None = None,
    ) -> None:
        """One forward pass per calibration batch with every candidate's output captured, and ``samples`` backward
        passes of ``z . f`` (``z`` standard normal, drawn from the probe's seed) to those outputs; ``accumulate``
        gets the batch index, the captured outputs and their gradients (``None`` where an output does not reach
        ``f``) after each backward pass. ``prepare`` gets the same from one more backward pass on the first batch,
        before any ``accumulate``.
        Sets the probe's dense reference when it has none."""
        reference: list[Tensor] = []
        generator = torch.Generator().manual_seed(self.seed)
        captured: dict[str, list[Tensor]] = {name: [] for name in candidates}
        handles = []
        for name, c in candidates.items():
            def hook(module: nn.Module, args: tuple, out: Tensor, name: str = name) -> Tensor:
                if not out.requires_grad:
                    out = out.detach().requires_grad_(True)
                captured[name].append(out)
                return out
            handles.append(c.target.module.register_forward_hook(hook))
        try:
            with eval_mode(self.model), torch.enable_grad():
                for index, batch in enumerate(self.batches):
                    for values in captured.values():
                        values.clear()
                    out = self._run(batch)
                    reference.append(out.detach().double())
                    outputs = [t for name in candidates for t in captured[name]]
                    first = prepare is not None and index == 0
                    for draw in range(samples + first):
                        z = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out)
                        flat = torch.autograd.grad((out * z).sum(), outputs, retain_graph=True, allow_unused=True)
                        self.passes += 2
                        grads, k = {}, 0
                        for name in candidates:
                            grads[name] = list(flat[k : k + len(captured[name])])
                            k += len(captured[name])
                        if first and draw == 0:
                            prepare(captured, grads)
                        else:
                            accumulate(index, captured, grads)
        finally:
            for handle in handles:
                handle.remove()
        if self._reference is None:
            self._set_reference(reference)


def _channels_last(c: LayerCandidate, t: Tensor) -> Tensor:
    return t.movedim(1, -1) if c.target.kind in ("conv1d", "conv2d") else t


def _gradient_moment(c: LayerCandidate, grads: list[Tensor | None]) -> Tensor:
    """``sum_p g_p g_p^T`` (float32) over the output gradients of one layer (zeros where none reached it)."""
    moment = None
    for g in grads:
        if g is not None:
            g = _channels_last(c, g).reshape(-1, c.shape[0]).float()
            moment = g.t() @ g if moment is None else moment + g.t() @ g
    return moment if moment is not None else torch.zeros(c.shape[0], c.shape[0], dtype=torch.float32, device=c.device)


def _directions(c: LayerCandidate) -> tuple[Tensor, Tensor | None]:
    """The first ``max_rank + 1`` basis and dual vectors of ``c`` (the dual None without one), from its owner."""
    columns = c.max_rank + 1
    return c.shared(c.basis[:, :columns]), None if c.dual is None else c.shared(c.dual[:, :columns])


def _coefficients(c: LayerCandidate, y: Tensor, g: Tensor, basis: Tensor, dual: Tensor | None) -> Tensor:
    """``c[n, i] = sum_{p in example n} (b_i . g_p)(d_i . (y_p - b))`` for ``i <= max_rank`` (``b_i``, ``d_i``: the
    candidate's basis and dual vectors, both ``u_i`` without a dual), and in the last column the rest
    ``sum_{i > max_rank} c[n, i]`` (the full sum is ``sum_p g_p . (y_p - b)``: ``y_p - b`` lies in the span of the
    basis), so only ``max_rank + 1`` directions are projected."""
    bias = c.bias if c.bias is not None else weight_matrix(c.target)[1]
    y, g = _channels_last(c, y).float(), _channels_last(c, g).float()  # products in float32, sums in float64
    if bias is not None:
        y = y - bias.detach().float()
    y, g = y.reshape(y.shape[0], -1, y.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
    basis = basis.to(y)
    dual = basis if dual is None else dual.to(y)
    head = ((y @ dual) * (g @ basis)).double().sum(1)
    total = (y * g).double().sum((1, 2))
    return torch.cat([head, (total - head.sum(1))[:, None]], dim=1).cpu()


class overwritten:
    """Context manager: each target's weight temporarily holds the given ``(out, fan_in)`` matrix (a tensor, or a
    function giving it, called one target at a time so that only one full matrix exists at once).

    A sharded weight (a ``DTensor``, FSDP2) gets the part of the matrix its local shard holds, and every FSDP2 unit
    of ``model`` is resharded on entering and leaving, so the next forward gathers the shards written."""

    def __init__(self, weights: Mapping[Target, Tensor | Callable[[], Tensor]], model: nn.Module | None = None) -> None:
        self.weights = weights
        self.model = model
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> overwritten:
        reshard(self.model)
        with torch.no_grad():
            try:
                for target, value in self.weights.items():
                    param = target.module.in_proj_weight if target.kind == "mha_in_proj" else target.module.weight
                    matrix = value() if callable(value) else value
                    local, part = _local_part(param, parameter_layout(target, matrix))
                    self.saved.append((local, local.clone()))
                    local.copy_(part.to(device=local.device, dtype=local.dtype))
            except BaseException:
                self._restore()
                raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        reshard(self.model)
        with torch.no_grad():
            for local, value in reversed(self.saved):
                local.copy_(value)
        self.saved.clear()


def _local_part(param: Tensor, full: Tensor) -> tuple[Tensor, Tensor]:
    """The tensor this process holds of ``param`` (its local shard when sharded) and the part of ``full`` (a tensor
    of ``param``'s full shape) that goes there; no communication."""
    if DTensor is not None and isinstance(param, DTensor):
        return param.to_local(), distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                                   src_data_rank=None).to_local()
    return param, full


def whole(tensor: Tensor) -> Tensor:
    """``tensor`` in full: gathered from every process when it is sharded (a collective), else itself."""
    return tensor.full_tensor() if DTensor is not None and isinstance(tensor, DTensor) else tensor


def reshard(model: nn.Module | None) -> None:
    """Free every FSDP2 unit's gathered parameters (a unit left gathered after a forward would not see its shards
    written)."""
    if model is None or FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _output_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"]
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"the model returned {type(output).__name__}; pass `output=` to the Probe to pick the tensor to compare"
    )


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            if isinstance(item, Tensor):
                return item.shape[0]
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}: pass `batch_size=`")
