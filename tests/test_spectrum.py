"""The pure spectral math against brute-force references and constructed spectra."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lightning_rank.checks import check_threshold
from lightning_rank.spectral.spectrum import (
    cholesky_output_factor,
    clean_spectrum,
    effective_rank,
    energy_rank,
    output_factor,
    output_moment,
    rounding_error,
)
from tests.helpers import acceptable_energy_ranks


def test_energy_rank_on_a_known_spectrum() -> None:
    values = torch.tensor([1.0, 4.0, 2.0, 3.0], dtype=torch.float64)  # any order
    assert int(energy_rank(values, 0.4)) == 1
    assert int(energy_rank(values, 0.41)) == 2
    assert int(energy_rank(values, 0.7)) == 2
    assert int(energy_rank(values, 0.9)) == 3
    assert int(energy_rank(values, 1.0)) == 4
    assert int(energy_rank(torch.zeros(5), 0.99)) == 0
    assert int(energy_rank(torch.tensor([0.0, 2.0, 0.0]), 1.0)) == 1


def test_energy_rank_is_batched() -> None:
    values = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert energy_rank(values, 0.95).tolist() == [4, 1, 0]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=40),
    st.floats(min_value=0.01, max_value=1.0),
)
@example(values=[5e-324, 5e-324], t=0.625)  # subnormal: t * total rounds down to one of them
@example(values=[35.0, 3.5e-11, 1.2e-38], t=1.0)  # the small ones are within the slack
def test_energy_rank_matches_brute_force(values: list[float], t: float) -> None:
    assert int(energy_rank(torch.tensor(values, dtype=torch.float64), t)) in acceptable_energy_ranks(values, t)


def test_effective_rank() -> None:
    assert float(effective_rank(torch.ones(7))) == pytest.approx(7)
    assert float(effective_rank(torch.tensor([5.0, 0.0, 0.0]))) == pytest.approx(1)
    assert float(effective_rank(torch.zeros(3))) == 0
    p = torch.tensor([0.5, 0.25, 0.25])
    assert float(effective_rank(p * 10)) == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_clean_spectrum_removes_round_off_only() -> None:
    values = torch.tensor([-1e-12, 1e-14, 0.5, 1.0], dtype=torch.float64)
    assert clean_spectrum(values, 1e-10).tolist() == [0.0, 0.0, 0.5, 1.0]


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, float("nan"), "0.9", True])
def test_threshold_is_checked(bad: object) -> None:
    with pytest.raises(ValueError, match="`threshold` must be a number in \\(0, 1\\]"):
        check_threshold(bad)


def low_rank_data(n: int, d: int, k: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, d, generator=g, dtype=torch.float64) + offset


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_output_moment_matches_empirical_outputs(centered: bool, bias: bool) -> None:
    x = low_rank_data(500, 6, 3, seed=1, offset=0.7)
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 6, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64) if bias else None
    y = x @ weight.t() + (b if b is not None else 0)
    mu = x.mean(0)
    moment = x.t() @ x / len(x)
    if centered:
        moment = moment - torch.outer(mu, mu)
        want = (y - y.mean(0)).t() @ (y - y.mean(0)) / len(y)
    else:
        want = y.t() @ y / len(y)
    torch.testing.assert_close(output_moment(weight, b, moment, mu, centered), want)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 7), st.integers(1, 7), st.integers(0, 7), st.booleans(), st.booleans(), st.integers(0, 10**6)
)
@example(2, 1, 1, False, True, 52)  # a positive definite C whose covariance is singular: no Cholesky factor
def test_output_factors_reproduce_the_output_moment(
    d: int, extra_out: int, k: int, centered: bool, bias: bool, seed: int
) -> None:
    """A A^T equals the direct formula: for the eigen factor also with singular input moments (k < d); for the
    Cholesky factor whenever it is given, which it must be when the matrix it factors is positive definite: the
    moment, or with a bias and uncentered ``[[C, mu], [mu^T, 1]]``, singular exactly when the covariance is."""
    out = d + extra_out
    x = low_rank_data(50, d, min(k, d), seed, offset=0.3) if k else torch.zeros(50, d, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(out, d, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    mu = x.mean(0)
    moment = x.t() @ x / len(x)
    if centered:
        moment = moment - torch.outer(mu, mu)
    want = output_moment(weight, b, moment, mu, centered)
    scale = want.abs().max().item() + 1e-12
    values, vectors = torch.linalg.eigh(moment)
    factor = output_factor(weight, b, clean_spectrum(values, 1e-12), vectors, mu, centered)
    torch.testing.assert_close(factor @ factor.t(), want, rtol=1e-7, atol=1e-7 * scale)

    factor = cholesky_output_factor(weight, b, moment, mu, centered)
    factored = moment - torch.outer(mu, mu) if b is not None and not centered else moment
    if factor is None:
        assert not bool(torch.linalg.eigvalsh(factored).min() > 1e-8 * max(float(moment.abs().max()), 1e-300))
    else:
        torch.testing.assert_close(factor @ factor.t(), want, rtol=1e-7, atol=1e-7 * scale)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(0, 10**6), st.floats(1e-30, 1e30))
def test_rounding_error_bounds_a_float32_moment_and_is_tight(n: int, seed: int, scale: float) -> None:
    """``||M32 - C||_F <= rounding_error(M32)`` for a float32 moment made as the statistics make it (float32 sums
    divided by the count), and the bound is within a small factor of the truth when entries do round."""
    from lightning_rank.stats.sums import InputStatistics

    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(3 * n, n, generator=g, dtype=torch.float64) * scale**0.5
    gram32 = (rows.t() @ rows).float()
    stats = InputStatistics(gram32, rows.sum(0).float(), torch.tensor(3 * n), torch.tensor(0), torch.tensor(1))
    exact = gram32.double() / (3 * n)  # the moment of the sums as stored, in float64
    moment = stats.second_moment(dtype=torch.float32)
    truth = float((moment.double() - exact).norm())
    bound = rounding_error(moment)
    assert truth <= bound
    assert bound <= 3 * (torch.finfo(torch.float32).eps / 2) * float(exact.norm()) * 1.001
