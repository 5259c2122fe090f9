"""``analyze`` against brute-force ranks of the empirical input and output moments."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lightning_rank as lr
from lightning_rank.spectral.analysis import UnanalyzableError
from tests.helpers import brute_energy_rank


def subspace_data(batches: int, rows: int, d: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, d, generator=g)
    return [torch.randn(rows, k, generator=g) @ basis for _ in range(batches)]


def brute_ranks(layer: nn.Linear, x: torch.Tensor, t: float) -> tuple[int, int]:
    x = x.double()
    y = x @ layer.weight.double().t() + layer.bias.double()
    values_in = torch.linalg.eigvalsh(x.t() @ x / len(x))
    values_out = torch.linalg.eigvalsh(y.t() @ y / len(y))
    return brute_energy_rank(values_in.tolist(), t), brute_energy_rank(values_out.tolist(), t)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.widen = nn.Linear(12, 40)  # out > fan_in: spectrum from the small side
        self.narrow = nn.Linear(40, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.narrow(torch.tanh(self.widen(x)))


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_ranks_match_brute_force_on_both_sides(threshold: float) -> None:
    torch.manual_seed(0)
    net = Net()
    data = subspace_data(4, 64, 12, 5)
    report = lr.analyze(net, lr.collect(net, data), threshold=threshold)
    x = torch.cat(data)
    hidden = torch.tanh(net.widen(x)).detach()
    for name, inputs in (("widen", x), ("narrow", hidden)):
        layer = report.layers[name]
        want_in, want_out = brute_ranks(getattr(net, name), inputs, threshold)
        assert (layer.in_rank, layer.out_rank) == (want_in, want_out), name
        assert layer.rank == min(want_in, want_out)
        assert layer.utilization == layer.rank / min(layer.out_features, layer.in_features)
        assert layer.rows == len(x)
    assert report.layers["widen"].in_rank <= 5
    assert report.mlu == pytest.approx((report.layers["widen"].utilization + report.layers["narrow"].utilization) / 2)
    p = {n: l.parameters for n, l in report.layers.items()}
    assert p == {"widen": 12 * 40 + 40, "narrow": 40 * 6 + 6}
    weighted = sum(report.layers[n].utilization * p[n] for n in p) / sum(p.values())
    assert report.weighted_mlu == pytest.approx(weighted)


def test_effective_ranks_match_brute_force() -> None:
    torch.manual_seed(0)
    net = Net()
    data = subspace_data(2, 100, 12, 12)
    report = lr.analyze(net, lr.collect(net, data, dtype=torch.float64))
    x = torch.cat(data).double()
    y = x @ net.widen.weight.double().t() + net.widen.bias.double()
    for matrix, got in ((x.t() @ x / len(x), report.layers["widen"].in_effective_rank),
                        (y.t() @ y / len(y), report.layers["widen"].out_effective_rank)):
        p = torch.linalg.eigvalsh(matrix).clamp(min=0)
        p = p / p.sum()
        p = p[p > 1e-12]
        assert got == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)


def test_threshold_one_gives_the_numerical_rank_of_a_subspace() -> None:
    layer = nn.Linear(16, 32)
    report = lr.analyze(layer, lr.collect(layer, subspace_data(3, 50, 16, 4)), threshold=1.0)
    entry = report.layers[""]
    assert entry.in_rank == 4
    assert entry.out_rank == 5  # an affine image of a 4-dim subspace spans 5 dims of second moment
    assert entry.rank == 4 and entry.utilization == 4 / 16


def test_zero_layer_has_rank_zero() -> None:
    layer = nn.Linear(8, 4)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    entry = lr.analyze(layer, lr.collect(layer, subspace_data(1, 20, 8, 8))).layers[""]
    assert (entry.out_rank, entry.rank, entry.utilization) == (0, 0, 0.0)
    assert entry.in_rank > 0


def test_single_row_has_rank_one() -> None:
    layer = nn.Linear(8, 4, bias=False)
    entry = lr.analyze(layer, lr.collect(layer, [torch.randn(1, 8)]), threshold=1.0).layers[""]
    assert (entry.in_rank, entry.out_rank, entry.rank, entry.rows) == (1, 1, 1, 1)


def test_centered_removes_the_mean_direction() -> None:
    layer = nn.Linear(10, 10, bias=False)
    data = [x + 5.0 for x in subspace_data(2, 60, 10, 3)]  # a 3-dim subspace shifted off the origin
    plain = lr.analyze(layer, lr.collect(layer, data), threshold=1.0).layers[""]
    centered = lr.analyze(layer, lr.collect(layer, data), threshold=1.0, centered=True).layers[""]
    assert plain.in_rank == 4 and centered.in_rank == 3


def test_conv_utilization_uses_fan_in_and_float32_eigenproblems_agree() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 3)  # fan_in 27 < out 64
    stats = lr.collect(conv, [torch.randn(4, 3, 8, 8)])
    report = lr.analyze(conv, stats)
    entry = report.layers[""]
    assert (entry.in_features, entry.out_features) == (27, 64)
    assert entry.utilization == entry.rank / 27
    fast = lr.analyze(conv, stats, eig_dtype=torch.float32).layers[""]
    assert (fast.in_rank, fast.out_rank) == (entry.in_rank, entry.out_rank)


def test_shared_inputs_are_decomposed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q(x) * self.k(x) + self.v(x)

    model = Attention()
    stats = lr.collect(model, subspace_data(2, 30, 8, 3))
    sizes = []
    original = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda m: sizes.append(tuple(m.shape)) or original(m))
    report = lr.analyze(model, stats)
    assert sizes[0] == (8, 8)  # one input moment for q, k and v (solved alone, its zero rows deflated)
    assert sizes[1] == (3, 8, 8)  # three output moments, batched
    assert {report.layers[n].in_rank for n in "qkv"} == {3}


def test_skipped_and_nonfinite_rows_are_reported() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 3)
            self.grouped = nn.Conv2d(4, 4, 1, groups=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        stats = lr.collect(Net(), [x])
    report = lr.analyze(Net(), stats)
    assert report.layers["used"].nonfinite_rows == 1 and report.layers["used"].rows == 9
    assert not math.isnan(report.mlu)
    unused = report.layers["unused"]
    assert unused.skipped.startswith("never called") and (unused.out_features, unused.in_features) == (3, 4)
    assert "grouped" in report.layers["grouped"].skipped
    assert set(report.skipped) == {"unused", "grouped"} and set(report.analyzed) == {"used"}


def test_bad_input() -> None:
    layer = nn.Linear(4, 2)
    stats = lr.collect(layer, [torch.randn(3, 4)])
    for bad in (0, 1.5, -1):
        with pytest.raises(ValueError, match="`threshold`"):
            lr.analyze(layer, stats, threshold=bad)
    with pytest.raises(ValueError, match="model the statistics were collected on"):
        lr.analyze(nn.Sequential(nn.Linear(4, 2)), stats)
    with pytest.raises(ValueError, match="eig_dtype"):
        lr.analyze(layer, stats, eig_dtype=torch.float16)


def test_report_carries_descending_spectra_that_give_its_ranks() -> None:
    torch.manual_seed(0)
    net = Net()
    data = subspace_data(2, 50, 12, 4)
    report = lr.analyze(net, lr.collect(net, data), threshold=0.9)
    x = torch.cat(data).double()
    spectrum_in, spectrum_out = report.spectra["widen"]
    assert spectrum_in.shape == (12,) and spectrum_out.shape[0] == 13  # the widening layer's small side
    assert torch.all(spectrum_in[:-1] >= spectrum_in[1:])
    torch.testing.assert_close(spectrum_in, torch.linalg.eigvalsh(x.t() @ x / len(x)).flip(0).clamp(min=0),
                               rtol=1e-4, atol=1e-4 * spectrum_in[0].item())
    for spectrum, rank in ((spectrum_in, report.layers["widen"].in_rank), (spectrum_out, report.layers["widen"].out_rank)):
        cumulative = spectrum.cumsum(0) / spectrum.sum()
        assert cumulative[rank - 1] >= 0.9 - 1e-9 and (rank == 1 or cumulative[rank - 2] < 0.9)
    assert lr.RankReport.from_dict(report.to_dict()) == report  # spectra are not part of the JSON form


def test_rows_limited_layers_are_flagged_and_named_in_one_warning() -> None:
    net = Net()  # widen: fan_in 12, narrow: fan_in 40
    with pytest.warns(UserWarning, match=r"Fewer rows than inputs.*\['narrow'\]") as record:
        report = lr.analyze(net, lr.collect(net, subspace_data(1, 20, 12, 12)))
    assert len([w for w in record if "Fewer rows" in str(w.message)]) == 1
    assert (report.layers["widen"].rows_limited, report.layers["narrow"].rows_limited) == (False, True)
    assert report.to_dict()["layers"]["narrow"]["rows_limited"] is True
    assert "20 (limited)" in report.to_markdown()
    assert lr.RankReport.from_dict(report.to_dict()).layers["narrow"].rows_limited is True


def test_a_factorized_layer_is_one_layer_under_its_original_name_and_shape() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 48), nn.Identity(), nn.Linear(48, 16), nn.Identity(), nn.Conv1d(16, 20, 3))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.net[3](self.net[2](self.net[1](self.net[0](x))))  # (B, L, 16)
            return self.net[4](h.transpose(1, 2))

    model = Model()
    basis = torch.randn(6, 24)
    data = [torch.randn(8, 10, 6) @ basis for _ in range(6)]  # inputs in a 6-dim subspace
    dense = lr.analyze(model, lr.collect(model, data))
    result = lr.factorize_(model, lr.collect(model, data), method="whiten")
    assert set(result.layers) == {"net.0", "net.2", "net.4"}
    after = lr.analyze(model, lr.collect(model, data))
    assert list(after.layers) == list(dense.layers) == ["net.0", "net.2", "net.4"]
    for name, layer in after.layers.items():
        before = dense.layers[name]
        assert layer.factorized and not before.factorized
        assert (layer.kind, layer.out_features, layer.in_features) == (before.kind, before.out_features, before.in_features)
        assert abs(layer.rank - before.rank) <= 1, name
        assert layer.parameters == sum(p.numel() for p in model.get_submodule(name).parameters())
        assert layer.parameters < before.parameters
    assert abs(after.mlu - dense.mlu) <= 1 / 16
    assert "(factorized)" in after.to_markdown()


def test_statistics_of_another_model_name_the_layer_and_both_widths() -> None:
    stats = lr.collect(nn.Sequential(nn.Linear(6, 4)), [torch.randn(10, 6)])
    with pytest.raises(ValueError, match=r"'0' hold inputs of length 6.*fan_in 8.*another model"):
        lr.analyze(nn.Sequential(nn.Linear(8, 4)), stats)


def test_a_layer_whose_every_row_was_nonfinite_is_reported_as_such() -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    x = torch.full((5, 4), float("nan"))
    with pytest.warns(UserWarning, match="NaN or Inf"):
        stats = lr.collect(net, [x])
    report = lr.analyze(net, stats)
    assert report.layers["0"].skipped == "every row of its input held NaN or Inf (5 rows dropped)"
    assert not report.analyzed


def test_a_compiled_model_reports_the_names_of_the_original() -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    net[2] = torch.compile(net[2])  # a compiled submodule, too
    compiled = torch.compile(net)
    stats = lr.collect(net, [torch.randn(20, 6)])
    assert stats.layers == ["0", "2"]
    report = lr.analyze(compiled, stats)
    assert list(report.layers) == ["0", "2"]
    assert lr.StatisticsCollector(compiled).targets.keys() == {"0", "2"}


def test_long_analyses_and_factorizations_show_progress_unless_turned_off(monkeypatch, capsys) -> None:
    """A bar on stderr once the work takes longer than ``DELAY_SECONDS`` (0 here); nothing with ``progress=False``."""
    import lightning_rank.spectral.progress

    monkeypatch.setattr(lightning_rank.spectral.progress, "DELAY_SECONDS", 0.0)
    net = Net()
    stats = lr.collect(net, subspace_data(2, 64, 12, 5))
    capsys.readouterr()
    lr.analyze(net, stats, progress=False)
    lr.factorize_(copy.deepcopy(net), stats, progress=False)
    assert capsys.readouterr().err == ""
    lr.analyze(net, stats)
    assert "lightning_rank: analyze" in capsys.readouterr().err
    lr.factorize_(copy.deepcopy(net), stats)
    err = capsys.readouterr().err
    assert "lightning_rank: analyze" in err and "lightning_rank: factors" in err


class Widening(nn.Module):
    """A 256-wide input (float32 eigenproblems from FLOAT32_FROM on) into a widening and a narrowing layer."""

    def __init__(self, d: int = 256) -> None:
        super().__init__()
        self.wide, self.narrow = nn.Linear(d, 2 * d + 88), nn.Linear(d, d // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.wide(x), self.narrow(x)], dim=-1)


def ranks_of(report: lr.RankReport) -> dict[str, tuple[int, int]]:
    return {name: (layer.in_rank, layer.out_rank) for name, layer in report.analyzed.items()}


@pytest.mark.parametrize(("scale", "dtype"), [(1e20, torch.float64), (1e-22, torch.float32), (1.0, torch.float32)])
def test_float32_eigenproblems_fall_back_to_float64_beyond_their_range(scale: float, dtype: torch.dtype) -> None:
    """Moments beyond float32's range (float64 sums of 1e40) are solved in float64, with the ranks of eig_dtype=float64;
    ordinary ones too. Float32 sums whose squares fell into the subnormal range have lost the moment (float64 sums
    of the same data give another rank): an error naming the layer, never a rank."""
    from lightning_rank.spectral.analysis import FLOAT32_FROM

    torch.manual_seed(0)
    model = Widening().to(dtype)
    assert model.wide.in_features >= FLOAT32_FROM
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -9, 256, dtype=torch.float64)
    x = (torch.randn(1024, 256, generator=g, dtype=torch.float64) * spectrum.sqrt()) @ basis.t()
    x[0, :2] *= 1000  # a few huge channels on one row
    stats = lr.collect(model, [(x * scale).to(dtype)], dtype=dtype, max_rows_per_batch=None)
    if scale < 1e-19:  # float32 sums of squares this small are subnormal: the moment is lost, and analyze says so
        with pytest.raises(UnanalyzableError, match=r"layer 'wide'.*dtype=torch.float64"):
            lr.analyze(model, stats, progress=False)
        return
    want = ranks_of(lr.analyze(model, stats, eig_dtype=torch.float64, progress=False))
    assert want["wide"][0] > 30  # a real spectrum, not one lost to the scale
    assert ranks_of(lr.analyze(model, stats, progress=False)) == want


def test_kept_float32_eigenvectors_give_the_ranks_of_the_report() -> None:
    """decompose(..., vectors=True, output_vectors=True) in float32 (what factorization could ask for) works on a
    widening layer, whose output directions come from its factor, and gives the values-only ranks."""
    from lightning_rank.spectral.analysis import decompose

    torch.manual_seed(0)
    model = Widening()
    stats = lr.collect(model, [torch.randn(1024, 256) for _ in range(2)], max_rows_per_batch=None)
    report = lr.analyze(model, stats, progress=False)
    kept = decompose(model, stats, eig_dtype=torch.float32, vectors=True, output_vectors=True)
    assert ranks_of(kept.report) == ranks_of(report)
    wide = kept.layers["wide"].outputs
    assert wide.vectors is not None and wide.vectors.shape[0] == model.wide.out_features
