"""Float32 vs float64 statistics: rank disagreement on generated spectra, and the cost of the accumulation.

For each spectrum (flat, power-law over 8-10 decades, and power-law with a few channels 1000x the rest
on some rows, as trained transformers' "massive activations"), a layer's inputs are collected in
float32 and in float64 and analyzed at thresholds 0.9, 0.99 and 0.999. Printed per spectrum: the largest
and mean |rank(float32) - rank(float64)| over in/out ranks and thresholds, for the package's round-off
rule and for the former blanket cut (``dim * eps * largest``), against a one-shot float64 reference.
Then the collection time of the current accumulation against the former one (no update counter), side
by side in one run. Goal: no disagreement beyond +-1; cost ratio <= 1.05.

    .venv/bin/python benchmarks/fidelity.py
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import nn

import lightning_rank as lr
from lightning_rank.spectral.spectrum import energy_rank
from lightning_rank.stats.precision import symmetric_gram_update_
from lightning_rank.stats.sums import InputStatistics

THRESHOLDS = (0.9, 0.99, 0.999)
SPECTRA = {  # name: (d, decades, outlier channels, outliers on every n-th row)
    "flat": (256, 0, 0, 1),
    "power-law 8 decades": (256, 8, 0, 1),
    "power-law 10 decades": (192, 10, 0, 1),
    "outliers x1000, 8 decades": (256, 8, 2, 2048),
    "outliers x1000, 10 decades": (192, 10, 3, 4096),
}


def activations(d: int, decades: float, outliers: int, every: int, batches: int = 8, rows: int = 1024) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -decades, d, dtype=torch.float64)
    out = []
    for _ in range(batches):
        x = (torch.randn(rows, d, generator=g, dtype=torch.float64) * spectrum.sqrt()) @ basis.t()
        if outliers:
            x[::every, :outliers] *= 1000
        out.append(x.float())
    return out


def former_ranks(layer: nn.Linear, stats: InputStatistics, t: float) -> tuple[int, int]:
    """The former rule: eigenvalues below ``dim * eps(stats dtype) * max(largest, diag scale)`` set to 0."""
    rtol = stats.dim * torch.finfo(stats.dtype).eps
    moment = stats.gram.double() / int(stats.count)
    w, b = layer.weight.double().detach(), layer.bias.double().detach()
    mu = stats.total.double() / int(stats.count)
    u = w @ mu
    out = w @ moment @ w.t() + torch.outer(u, b) + torch.outer(b, u) + torch.outer(b, b)
    ranks = []
    for matrix, scale in ((moment, float(moment.diagonal().max())), (out, 0.0)):
        values = torch.linalg.eigvalsh((matrix + matrix.t()) / 2).clamp(min=0)
        values = torch.where(values > rtol * max(float(values.max()), scale), values, 0.0)
        ranks.append(int(energy_rank(values, t)))
    return ranks[0], ranks[1]


def disagreement() -> None:
    print("rank disagreement |float32 - float64| over in/out ranks at thresholds", THRESHOLDS)
    print(f"{'spectrum':<28} {'now max':>8} {'now mean':>9} {'former max':>11} {'former mean':>12}")
    for name, (d, decades, outliers, every) in SPECTRA.items():
        layer = nn.Linear(d, d // 2)
        with torch.no_grad():
            layer.weight[:, :max(outliers, 1)] *= 10
        xs = activations(d, decades, outliers, every)
        stats32 = lr.collect(layer, xs)
        stats64 = lr.collect(layer.double(), [x.double() for x in xs], dtype=torch.float64)
        layer.float()
        now, former = [], []
        for t in THRESHOLDS:
            r32 = lr.analyze(layer, stats32, threshold=t).layers[""]
            r64 = lr.analyze(layer, stats64, threshold=t).layers[""]
            now += [abs(r32.in_rank - r64.in_rank), abs(r32.out_rank - r64.out_rank)]
            f32, f64 = former_ranks(layer, stats32[""], t), former_ranks(layer, stats64[""], t)
            former += [abs(f32[0] - f64[0]), abs(f32[1] - f64[1])]
        print(f"{name:<28} {max(now):>8} {sum(now) / len(now):>9.2f} {max(former):>11} {sum(former) / len(former):>12.2f}")


def _former_update(self: InputStatistics, rows: torch.Tensor, order: torch.Tensor | None = None) -> None:
    """The accumulation before the update counter, for the cost comparison (linear layers: ``order`` is None)."""
    rows = rows.to(self.dtype)
    column_sums = rows.sum(dim=0)
    if not bool(torch.isfinite(column_sums).all()):
        finite = torch.isfinite(rows).all(dim=1)
        self.nonfinite.add_((~finite).sum())
        rows = rows[finite]
        column_sums = rows.sum(dim=0)
    symmetric_gram_update_(self._gram, rows)
    self._mirrored = False
    self.total.add_(column_sums)
    self.count.add_(rows.shape[0])


def cost(repeats: int = 7) -> None:
    model = nn.Sequential(*(nn.Linear(512, 512) for _ in range(4)))
    batches = [torch.randn(256, 512) for _ in range(16)]
    current = InputStatistics.update
    times = {"current": [], "former": []}
    for _ in range(repeats):
        for label, update in (("former", _former_update), ("current", current)):
            InputStatistics.update = update
            start = time.perf_counter()
            lr.collect(model, batches)
            times[label].append(time.perf_counter() - start)
    InputStatistics.update = current
    best = {label: sorted(values)[len(values) // 2] for label, values in times.items()}
    print(f"collection cost, current / former accumulation (median of {repeats}): {best['current'] / best['former']:.3f}")
    # The only change to accumulation is one 0-d counter add per update: timed alone, it is noise-free.
    stats, rows = InputStatistics.zeros(512, torch.float32, torch.device("cpu")), batches[0]
    start = time.perf_counter()
    for _ in range(200):
        stats.update(rows)
    per_update = (time.perf_counter() - start) / 200
    start = time.perf_counter()
    for _ in range(20000):
        stats.updates.add_(1)
    per_counter = (time.perf_counter() - start) / 20000
    print(f"the counter alone: {per_counter * 1e6:.1f} us per update of {per_update * 1e3:.2f} ms "
          f"(256 x 512 rows): cost ratio {1 + per_counter / per_update:.4f}")


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    torch.use_deterministic_algorithms(True)
    disagreement()
    cost()
