"""What a factorization did: :class:`FactorizationResult` and one :class:`LayerFactorization` per selected layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lightning_rank.targets import LayerKind


@dataclass(frozen=True)
class LayerFactorization:
    """What happened to one selected layer.

    ``rank`` is the rank planned for it (``None`` when none was), ``relative_error`` the output error
    ``E||(W - W') x||^2 / E||W x||^2`` of the layer as it now is, from the statistics (0.0 when left
    dense, ``None`` without statistics), ``reason`` why it was not replaced. Under a budget,
    ``energy_kept`` is the share of the layer's output energy its rank keeps, and ``sensitivity``
    (``allocation="probe"``) the model's relative output error per unit of this layer's relative error.

    >>> import torch, lightning_rank as lr
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> data = torch.randn(256, 4) @ torch.randn(4, 16)  # 256 rows spanning 4 of the 16 input directions
    >>> result = lr.factorize_(model, lr.collect(model, data.split(64)))
    >>> first = result.details["0"]
    >>> first.replaced, first.rank, first.params_before, first.params_after, first.relative_error < 1e-6
    (True, 4, 544, 224, True)
    """

    name: str
    kind: LayerKind | None
    out_features: int | None
    in_features: int | None
    replaced: bool
    rank: int | None = None
    relative_error: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    reason: str | None = None
    energy_kept: float | None = None
    sensitivity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["name"]
        return out


@dataclass
class FactorizationResult:
    """What :func:`factorize_` did: whole-model parameter counts and one :class:`LayerFactorization` per layer.

    ``layer_params_before`` / ``layer_params_after`` count the selected layers only; a budget is a
    fraction of the replaceable ones among them. ``allocation`` is the rule that decided the ranks under
    a budget (``"probe"`` or ``"uniform"``).

    >>> import torch, lightning_rank as lr
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> data = torch.randn(256, 4) @ torch.randn(4, 16)  # 256 rows spanning 4 of the 16 input directions
    >>> result = lr.factorize_(model, lr.collect(model, data.split(64)))
    >>> result.params_before, result.params_after, result.layers  # layers: {name: kept rank} of the replaced
    (676, 356, {'0': 4})
    >>> print(result.not_replaced["2"])
    rank 4 (utilized rank at threshold 0.99) needs 144 weight parameters as factors, not fewer than the 128 ...
    """

    method: str
    threshold: float
    param_budget: float | None
    params_before: int
    params_after: int
    layer_params_before: int
    layer_params_after: int
    details: dict[str, LayerFactorization] = field(default_factory=dict)
    macs_budget: float | None = None
    allocation: str | None = None

    @property
    def layers(self) -> dict[str, int]:
        """``{name: rank}`` of the replaced layers."""
        return {name: d.rank for name, d in self.details.items() if d.replaced}

    @property
    def not_replaced(self) -> dict[str, str]:
        """``{name: reason}`` of the selected layers left as they were."""
        return {name: d.reason for name, d in self.details.items() if not d.replaced}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "param_budget": self.param_budget,
            "macs_budget": self.macs_budget,
            "allocation": self.allocation,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layer_params_before": self.layer_params_before,
            "layer_params_after": self.layer_params_after,
            "layers": self.layers,
            "details": {name: d.to_dict() for name, d in self.details.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactorizationResult:
        """The result :meth:`to_dict` wrote (``layers`` follows from ``details``)."""
        details = {name: LayerFactorization(name=name, **entry) for name, entry in data["details"].items()}
        known = {f.name for f in fields(cls)} - {"details"}
        return cls(**{key: value for key, value in data.items() if key in known}, details=details)

    def to_markdown(self) -> str:
        """A table of every selected layer, headed by the parameter counts."""
        lines = [
            f"**{self.method}**: parameters {self.params_before:,} -> {self.params_after:,} "
            f"({100 * self.params_after / max(self.params_before, 1):.1f}%), {len(self.layers)} layers replaced",
            "",
            "| layer | out x in | kept rank | rel. output error | params | replaced |",
            "|---|---|---:|---:|---:|---|",
        ]
        for name, d in self.details.items():
            error = "n/a" if d.relative_error is None else f"{d.relative_error:.4f}"
            params = "" if d.params_before is None else f"{d.params_before:,} -> {d.params_after:,}"
            lines.append(
                f"| {name} | {d.out_features} x {d.in_features} | {d.rank if d.rank is not None else ''} | {error} | "
                f"{params} | {'yes' if d.replaced else 'no: ' + str(d.reason)} |"
            )
        return "\n".join(lines) + "\n"
