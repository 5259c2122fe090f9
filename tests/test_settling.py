"""Settling under the row policy "auto": a layer whose spectrum stopped moving is counted from 1 row in 4, each
weighing what it stands for, so the sums still estimate the whole data's moment; the report says why."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_rank as lr
from lightning_rank.stats import settling
from lightning_rank.stats.settling import THIN, energy_ranks
from tests.helpers import brute_energy_rank
from tests.tiny_models import PlainClassifier, make_trainer

WIDTH, BATCHES, ROWS = 64, 20, 2048


def subspace_rows(n: int, dims: range, seed: int) -> torch.Tensor:
    """``n`` rows of width ``WIDTH`` living in the coordinates ``dims``, with a decaying spectrum there."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, WIDTH)
    x[:, list(dims)] = torch.randn(n, len(dims), generator=g) * torch.logspace(0, -1, len(dims))
    return x


def moment(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    return rows.t() @ rows / rows.shape[0]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_energy_ranks_of_the_running_sums_are_those_of_their_eigenvalues(dim, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(3 * dim, dim, generator=g, dtype=torch.float64) * torch.logspace(0, -3, dim, dtype=torch.float64)
    stats = lr.InputStatistics.zeros(dim, torch.float64, torch.device("cpu"))
    stats.update(rows)
    values = torch.linalg.eigvalsh(rows.t() @ rows).clamp(min=0).tolist()
    assert energy_ranks(stats, (0.5, 0.9, 0.99)) == [brute_energy_rank(values, t) for t in (0.5, 0.9, 0.99)]


def test_a_settled_layer_is_thinned_and_weighted_so_its_moment_and_ranks_stay_those_of_all_rows() -> None:
    assert THIN == 4
    model = nn.Linear(WIDTH, 32)
    batches = [subspace_rows(ROWS, range(6), seed) for seed in range(BATCHES)]
    stats = lr.collect(model, batches)
    inputs = stats[""]
    # The budget, max(4096, 64 * 64) rows, is 205 rows of each batch; checks at 1024 and 2048 rows agree.
    assert (inputs.rows_reason, inputs.settled_at) == ("settled", 10 * 205)
    assert int(inputs.count) == BATCHES * 205  # the rows the sums stand for: the whole budget
    assert int(inputs.summed) == 10 * 205 + 10 * 52  # then 52 rows of each batch, each weighing 205 / 52
    exact = moment(torch.cat(batches))
    # about 2500 rows in 6 dims: a sampling error near 0.07 of the moment
    assert torch.linalg.matrix_norm(inputs.second_moment() - exact) < 0.1 * torch.linalg.matrix_norm(exact)
    report = lr.analyze(model, stats, progress=False)
    reference = lr.analyze(model, lr.collect(model, batches, max_rows_per_batch=None), eig_dtype=torch.float64)
    for key in ("in_rank", "out_rank", "rank"):
        assert abs(getattr(report.layers[""], key) - getattr(reference.layers[""], key)) <= 1
    layer = report.layers[""]
    assert (layer.rows, layer.rows_reason, layer.settled_at) == (int(inputs.summed), "settled", 2050)
    assert "2570 (settled)" in report.to_markdown()


def test_data_in_class_order_after_settling_still_weighs_what_it_weighs_in_the_data() -> None:
    """The first half of the batches lives in coordinates 0-5, the second in 6-11: the layer settles on the first
    half, and the second still holds half the energy, as in the data (stopping there would leave it none)."""
    model = nn.Linear(WIDTH, 32)
    batches = [subspace_rows(ROWS, range(6) if seed < BATCHES // 2 else range(6, 12), seed) for seed in range(BATCHES)]
    stats = lr.collect(model, batches)
    assert stats[""].rows_reason == "settled" and stats[""].settled_at <= BATCHES // 2 * 205
    estimate, exact = stats[""].second_moment(), moment(torch.cat(batches))
    second_half = estimate.diagonal()[6:12].sum() / estimate.trace()
    assert second_half == pytest.approx(float(exact.diagonal()[6:12].sum() / exact.trace()), abs=0.08)
    report = lr.analyze(model, stats, progress=False)
    reference = lr.analyze(model, lr.collect(model, batches, max_rows_per_batch=None), eig_dtype=torch.float64)
    assert reference.layers[""].in_rank >= 10  # both halves needed
    assert abs(report.layers[""].in_rank - reference.layers[""].in_rank) <= 1


def test_rows_that_keep_moving_the_spectrum_are_counted_to_the_budget(monkeypatch) -> None:
    """Checks that never agree leave the budget as it was (every check is a doubling of the rows)."""
    monkeypatch.setattr(settling, "SETTLE_TOLERANCE", -1)  # no two checks can agree
    model = nn.Linear(WIDTH, 32)
    batches = [subspace_rows(ROWS, range(6), seed) for seed in range(BATCHES)]
    inputs = lr.collect(model, batches)[""]
    assert (inputs.rows_reason, inputs.settled_at) == ("budget", None)
    assert int(inputs.summed) == int(inputs.count) == BATCHES * 205


def test_exact_counting_and_a_cap_never_settle_and_say_so() -> None:
    model = nn.Linear(WIDTH, 32)
    batches = [subspace_rows(ROWS, range(6), seed) for seed in range(4)]
    every = lr.collect(model, batches, max_rows_per_batch=None)[""]
    assert (every.rows_reason, int(every.summed), int(every.count)) == ("all", 4 * ROWS, 4 * ROWS)
    capped = lr.collect(model, batches, max_rows_per_batch=1500)[""]
    assert (capped.rows_reason, int(capped.summed)) == ("cap", 4 * 1500)
    few = lr.collect(model, [b[:100] for b in batches])[""]  # under the budget: every row, never checked
    assert (few.rows_reason, few.settled_at, int(few.summed)) == ("all", None, 400)


def test_thinned_rows_weigh_what_they_stand_for_in_the_sums() -> None:
    """One batch added with weight w equals w copies of it: the sums, and the count of rows they stand for."""
    rows = subspace_rows(64, range(8), 0)
    weighted = lr.InputStatistics.zeros(WIDTH, torch.float64, torch.device("cpu"))
    weighted.update(rows.double(), weight=THIN)
    copies = lr.InputStatistics.zeros(WIDTH, torch.float64, torch.device("cpu"))
    copies.update(rows.double().repeat(THIN, 1))
    assert torch.allclose(weighted.gram, copies.gram, rtol=1e-12) and torch.allclose(weighted.total, copies.total)
    assert (int(weighted.count), int(weighted.summed)) == (THIN * 64, 64)
    assert weighted.roundoff() < copies.roundoff()  # the bound follows the rows really added
    rows[::8, 0] = float("nan")  # dropped rows stand for as many rows of the data as the rows kept
    weighted.update(rows.double(), weight=THIN)
    assert (int(weighted.nonfinite), int(weighted.count), int(weighted.summed)) == (THIN * 8, THIN * 120, 120)


def test_monitor_reports_settled_rows_in_its_json_and_they_load_back(tmp_path) -> None:
    """A real validation: the report on disk says how many rows each layer summed and why."""
    torch.manual_seed(0)
    model = PlainClassifier()  # 32 -> 64 -> 64 -> 4 on inputs in a 3-dim subspace
    x = torch.randn(16384, 3) @ torch.randn(3, 32)
    loader = DataLoader(TensorDataset(x, torch.zeros(16384, dtype=torch.long)), batch_size=1024)
    monitor = lr.RankMonitor(tensorboard=False)
    with pytest.warns(UserWarning, match="no logger"):
        make_trainer(tmp_path, callbacks=[monitor], logger=False).validate(model, loader)
    saved = json.loads(next((tmp_path / "rank_reports").glob("*.json")).read_text())["layers"]
    first = saved["net.0"]
    assert first["rows_reason"] == "settled" and first["settled_at"] <= first["rows"] < 4096
    assert lr.RankReport.load(next((tmp_path / "rank_reports").glob("*.json"))).layers["net.0"].settled_at == \
        first["settled_at"]
    assert monitor.report.layers["net.0"].in_rank == 3


def test_checks_are_made_only_while_enough_rows_are_still_to_come(monkeypatch) -> None:
    """A check costs an eigenproblem: none where too few batches remain for settling to save anything."""
    calls = []
    monkeypatch.setattr(settling, "energy_ranks", lambda stats: calls.append(int(stats.summed)) or [1, 2, 3])
    model = nn.Linear(WIDTH, 32)
    short = lr.collect(model, [subspace_rows(8192, range(6), seed) for seed in range(2)])[""]
    assert (calls, short.rows_reason) == ([], "budget")  # 2048 rows a batch: after the first, too few to come
    long = lr.collect(model, [subspace_rows(ROWS, range(6), seed) for seed in range(BATCHES)])[""]
    assert calls == [1025, 2050] and long.settled_at == 2050  # 205 rows a batch: checks at batches 5 and 10


def test_sums_that_overflow_float32_never_settle_and_the_analysis_says_why() -> None:
    """Finite rows whose float32 Gram overflows (diverged training) leave the check unsolvable: the layer is counted
    to its budget and the analysis names the overflow, as without settling."""
    model = nn.Linear(WIDTH, 32)
    batches = [subspace_rows(ROWS, range(6), seed) * 1e20 for seed in range(BATCHES)]
    stats = lr.collect(model, batches)
    assert (stats[""].rows_reason, not torch.isfinite(stats[""].gram).all()) == ("budget", True)
    with pytest.raises(ValueError, match="overflowed.*dtype=torch.float64"):
        lr.analyze(model, stats)
