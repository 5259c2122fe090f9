"""Float32 statistics give the ranks of float64 ones on spectra that span many orders of magnitude.

Trained transformers have a few "massive activation" channels that hold most of the energy; a round-off
cut relative to the largest eigenvalue deletes real spectrum there. These tests build such activations
(a power-law spectrum over 8-10 decades plus a few channels 1000x the rest on some rows) and compare
the ranks of float32 and float64 statistics with a one-shot float64 reference written here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_rank as lr
from lightning_rank.spectral.spectrum import energy_rank, energy_rank_interval
from lightning_rank.stats.sums import sum_roundoff


def outlier_activations(
    d: int, decades: float, outliers: int, every: int, batches: int = 8, rows: int = 1024, mean: float = 0.0, seed: int = 0
) -> list[torch.Tensor]:
    """Rows with a power-law spectrum over ``decades`` and ``outliers`` channels x1000 on every ``every``-th row."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -decades, d, dtype=torch.float64)
    out = []
    for _ in range(batches):
        x = (torch.randn(rows, d, generator=g, dtype=torch.float64) * spectrum.sqrt()) @ basis.t() + mean
        x[::every, :outliers] *= 1000
        out.append(x.float())
    return out


def reference_ranks(xs: list[torch.Tensor], layer: nn.Linear, t: float, centered: bool) -> tuple[int, int]:
    """Energy ranks of the input and output moments, one shot in float64 from the very rows collected."""
    x = torch.cat(xs).double()
    y = x @ layer.weight.double().t() + layer.bias.double()

    def moment(z: torch.Tensor) -> torch.Tensor:
        c = z.t() @ z / len(z)
        return c - torch.outer(z.mean(0), z.mean(0)) if centered else c

    return tuple(int(energy_rank(torch.linalg.eigvalsh(moment(z)).clamp(min=0), t)) for z in (x, y))


CASES = [  # d, decades, outlier channels, every, centered, mean
    (256, 8, 0, 1, False, 0.0),
    (256, 8, 2, 2048, False, 0.0),
    (256, 9, 3, 1024, True, 0.5),
    (192, 10, 2, 4096, False, 0.0),
]


@pytest.mark.parametrize(("d", "decades", "outliers", "every", "centered", "mean"), CASES)
def test_float32_and_float64_statistics_agree_with_a_float64_reference(d, decades, outliers, every, centered, mean):
    torch.manual_seed(0)
    layer = nn.Linear(d, d // 2)
    with torch.no_grad():
        layer.weight[:, :max(outliers, 1)] *= 10  # the weight maps the outlier channels strongly: output ranks too
    xs = outlier_activations(d, decades, outliers, every, mean=mean)
    stats32 = lr.collect(layer, xs, max_rows_per_batch=None)
    stats64 = lr.collect(layer.double(), [x.double() for x in xs], dtype=torch.float64, max_rows_per_batch=None)
    layer.float()
    for t in (0.9, 0.99, 0.999):
        want_in, want_out = reference_ranks(xs, layer, t, centered)
        for stats in (stats32, stats64):
            got = lr.analyze(layer, stats, threshold=t, centered=centered).layers[""]
            assert abs(got.in_rank - want_in) <= 1, (t, stats.inputs[""].dtype, got.in_rank, want_in)
            assert abs(got.out_rank - want_out) <= 1, (t, stats.inputs[""].dtype, got.out_rank, want_out)


def test_a_widening_layer_reads_its_output_ranks_through_outlier_channels():
    torch.manual_seed(1)
    layer = nn.Linear(96, 384)  # out > fan_in: the output spectrum comes from the small side
    with torch.no_grad():
        layer.weight[:, :2] *= 10
    xs = outlier_activations(96, 9, 2, 2048)
    stats = lr.collect(layer, xs, max_rows_per_batch=None)
    for t in (0.9, 0.99, 0.999):
        want_in, want_out = reference_ranks(xs, layer, t, centered=False)
        got = lr.analyze(layer, stats, threshold=t).layers[""]
        assert abs(got.in_rank - want_in) <= 1 and abs(got.out_rank - want_out) <= 1, (t, got, want_in, want_out)


def test_exactly_low_rank_data_keeps_its_exact_rank_at_threshold_one():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(5, 64, generator=g)
    xs = [torch.randn(300, 5, generator=g) @ basis for _ in range(4)]
    layer = nn.Linear(64, 32, bias=False)  # with a bias the output moment gains one direction
    report = lr.analyze(layer, lr.collect(layer, xs), threshold=1.0)
    assert (report.layers[""].in_rank, report.layers[""].out_rank) == (5, 5)  # round-off directions are removed


def test_float32_gram_errors_stay_inside_the_roundoff_bound():
    """The per-entry bound ``r sqrt(C_ii C_jj)`` holds for real float32 accumulation, also with huge channels."""
    xs = outlier_activations(128, 8, 2, 64, batches=16, rows=512)
    stats = lr.collect(nn.Linear(128, 8), xs, max_rows_per_batch=None)[""]
    exact = sum(x.double().t() @ x.double() for x in xs)
    error = (stats.gram.double() - exact).abs()
    scale = exact.diagonal().sqrt()
    bound = stats.roundoff() * torch.outer(scale, scale)
    assert (error <= bound).all()
    assert stats.roundoff() == sum_roundoff(torch.float32, 16 * 512, 16)
    assert (error > bound / 1e4).any()  # the bound is not vacuous: errors come within 4 decades of it


def allowed_errors(n: int, error: float, g: torch.Generator) -> torch.Tensor:
    """An error pattern the model of ``energy_rank_interval`` allows: each entry at most ``error``, a sum of the
    first or the last ``m`` at most ``sqrt(m) error`` (a mixture of the extreme patterns and small noise)."""
    i = torch.arange(1, n + 1, dtype=torch.float64)
    rising = i.sqrt() - (i - 1).sqrt()  # every prefix sums to sqrt(m); every suffix to at most sqrt(m)
    weights = torch.rand(3, generator=g, dtype=torch.float64)
    weights = weights / weights.sum() * torch.rand((), generator=g, dtype=torch.float64)
    signs = torch.randint(0, 2, (2,), generator=g) * 2 - 1
    noise = (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) / n**0.5
    return error * (weights[0] * signs[0] * rising + weights[1] * signs[1] * rising.flip(0) + weights[2] * noise)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=30),
    st.floats(min_value=0, max_value=10),
    st.floats(min_value=0.05, max_value=1.0),
    st.floats(min_value=0, max_value=1e3),
    st.floats(min_value=1, max_value=4),
    st.booleans(),
    st.integers(min_value=0, max_value=2**31),
)
def test_energy_rank_interval_contains_the_rank_of_every_spectrum_it_allows(
    values, error, t, zero_below, spread, with_trace, seed
):
    """Exact spectra within the error model, each eigenvalue removed against its own bound in
    ``[zero_below, keep_above]``: the rank of every one lies in the interval (removal capped in total)."""
    computed = torch.tensor(values, dtype=torch.float64).sort(descending=True).values
    n, keep_above = len(computed), zero_below * spread
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(8):
        exact = (computed - allowed_errors(n, error, g)).clamp(min=0).sort(descending=True).values
        bounds = zero_below + (keep_above - zero_below) * torch.rand(n, generator=g, dtype=torch.float64)
        removed = exact <= bounds
        samples.append((exact, bounds, removed))
    cap = max(float(bounds[removed].sum()) for _, bounds, removed in samples)  # a cap every sample respects
    exact_trace = float(samples[0][0].sum())
    low, high = energy_rank_interval(computed, t, error=error, trace=exact_trace if with_trace else None,
                                     zero_below=zero_below, keep_above=keep_above, zeroed_at_most=cap)
    for index, (exact, bounds, removed) in enumerate(samples):
        if with_trace and index > 0:
            continue  # the trace is that of the first sample
        cleaned = torch.where(removed, 0.0, exact)
        assert low <= int(energy_rank(cleaned, t)) <= high, (exact, cleaned, low, high)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=30),
       st.floats(min_value=0.05, max_value=1.0))
def test_energy_rank_interval_is_the_rank_itself_without_errors_or_removal(values, t):
    values = torch.tensor(values, dtype=torch.float64)
    rank = int(energy_rank(values, t))
    assert energy_rank_interval(values, t) == (rank, rank)
    assert energy_rank_interval(values, t, trace=float(values.sum())) == (rank, rank)


def test_energy_rank_interval_opens_near_the_crossing_and_when_the_trace_disagrees():
    values = torch.tensor([5.0, 4.0, 1.0])  # the top two hold 90% of the trace
    assert energy_rank_interval(values, 0.9) == (2, 2)  # an exact tie is reached, as in energy_rank
    assert energy_rank_interval(values, 0.9, error=1e-9) == (2, 3)  # but not with any error
    assert energy_rank_interval(values, 0.89) == (2, 2)
    assert energy_rank_interval(values, 0.89, error=0.05) == (2, 2)
    assert energy_rank_interval(values, 0.89, error=0.2) == (2, 3)
    removal = {"zero_below": 0.0, "keep_above": 2.0, "zeroed_at_most": 1.0}  # the 1 may go, the 4 and 5 stay
    assert energy_rank_interval(values, 0.89, **removal) == (2, 2)
    assert energy_rank_interval(values, 0.95, **removal) == (2, 3)
    assert energy_rank_interval(values, 0.89, error=1e-3, trace=12.0) == (0, 3)  # 10 computed against 12


class NarrowAndWide(nn.Module):
    """Two layers on one input: a narrowing one (output moment formed directly) and a widening one (through a factor)."""

    def __init__(self, d: int, outliers: int) -> None:
        super().__init__()
        self.narrow, self.wide = nn.Linear(d, d // 2), nn.Linear(d, 2 * d)
        with torch.no_grad():
            self.narrow.weight[:, :max(outliers, 1)] *= 10
            self.wide.weight[:, :max(outliers, 1)] *= 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.narrow(x).sum() + self.wide(x).sum()


def test_float32_eigenvalues_give_exactly_the_float64_ranks_and_fall_back_where_needed():
    """The default ``eig_dtype=float32`` of ``analyze`` gives exactly the ranks of float64 eigenproblems on every
    outlier spectrum: moments whose rank the float32 bounds leave open are solved again in float64 (counted)."""
    from lightning_rank.spectral.analysis import decompose

    refined = solved = 0
    for d, decades, outliers, every, centered, mean in CASES:
        torch.manual_seed(0)
        model = NarrowAndWide(d, outliers)
        xs = outlier_activations(d, decades, outliers, every, mean=mean, batches=4)
        for dtype in (torch.float32, torch.float64):
            stats = lr.collect(model.to(dtype), [x.to(dtype) for x in xs], dtype=dtype, max_rows_per_batch=None)
            for t in (0.9, 0.99, 0.999):
                want = decompose(model, stats, threshold=t, centered=centered, eig_dtype=torch.float64)
                got = decompose(model, stats, threshold=t, centered=centered, eig_dtype=torch.float32)
                default = lr.analyze(model, stats, threshold=t, centered=centered)
                for name in ("narrow", "wide"):
                    ranks = [(r.layers[name].in_rank, r.layers[name].out_rank) for r in (want.report, got.report, default)]
                    assert ranks[0] == ranks[1] == ranks[2], (d, decades, dtype, t, name, ranks)
                refined += len(got.refined)
                solved += 3  # one input moment, two output moments
        model.float()
    assert 0 < refined < solved, (refined, solved)  # float32 settles most moments, float64 the rest


@pytest.mark.parametrize("n", [1, 7, 300])
def test_stand_in_error_bounds_the_frobenius_error_of_a_float32_matrix_without_being_vacuous(n):
    from lightning_rank.spectral.spectrum import largest_eigenvalue, stand_in_error

    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    exact = a @ a.t()
    stand_in = exact.float()
    truth = float((stand_in.double() - exact).norm())
    bound = stand_in_error(stand_in, lambda x: exact @ x, n)
    assert truth <= bound <= 16 * truth
    assert stand_in_error(lambda x: exact @ x, lambda x: exact @ x, n) == 0.0
    largest = float(torch.linalg.eigvalsh(exact)[-1])
    assert 0.5 * largest <= float(largest_eigenvalue(exact)) <= largest * (1 + 1e-12)
