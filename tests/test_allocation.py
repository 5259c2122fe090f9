"""Rank allocation: the pure budget rules against brute-force references, and the probe on real models."""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_rank as lr
from lightning_rank.compress.allocation import allocate, allocate_on_curves, uniform_tolerance
from lightning_rank.compress.candidates import LayerCandidate
from lightning_rank.compress.probe import Probe
from lightning_rank.stats.collect import CALIBRATION_BATCHES
from tests.helpers import layer_candidates
from tests.tiny_models import Conv1D


# -- pure rules on synthetic candidates ---------------------------------------------------------
@st.composite
def candidate_sets(draw: st.DrawFn) -> dict[str, LayerCandidate]:
    """2-5 layers of random shapes, spectra (some exactly zero) and output positions."""
    layers = {}
    for i in range(draw(st.integers(2, 5))):
        out, fan_in = draw(st.integers(2, 24)), draw(st.integers(2, 24))
        size = min(out, fan_in)
        values = draw(st.lists(st.floats(0.0, 10.0, allow_subnormal=False), min_size=size, max_size=size))
        s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
        candidate = LayerCandidate(
            name=f"layer{i}",
            weight=torch.zeros(out, fan_in, dtype=torch.float64),
            basis=torch.eye(out, size, dtype=torch.float64),
            singular_values=s,
            bias_params=draw(st.sampled_from([0, out])),
            positions=float(draw(st.sampled_from([1, 4, 16, 64]))),
        )
        if candidate.max_rank >= 1:
            layers[candidate.name] = candidate
    return layers


def total_cost(candidates: dict[str, LayerCandidate], ranks: dict, unit: str) -> float:
    return sum(c.params(ranks[n]) if unit == "params" else c.macs(ranks[n]) for n, c in candidates.items())


def floor_cost(candidates: dict[str, LayerCandidate], unit: str) -> float:
    return total_cost(candidates, {n: 1 for n in candidates}, unit)


def dense_cost(candidates: dict[str, LayerCandidate], unit: str) -> float:
    return total_cost(candidates, {n: None for n in candidates}, unit)


def check_ranks(candidates: dict[str, LayerCandidate], ranks: dict) -> None:
    assert set(ranks) == set(candidates)
    for name, rank in ranks.items():
        assert rank is None or 1 <= rank <= candidates[name].max_rank
        if rank is not None:  # below break-even: the factors are smaller than the dense weight
            out, fan_in = candidates[name].shape
            assert rank * (out + fan_in) < out * fan_in


@settings(max_examples=60, deadline=None)
@given(candidates=candidate_sets(), fraction=st.floats(0.0, 1.0), unit=st.sampled_from(["params", "macs"]))
def test_uniform_tolerance_meets_budget_with_the_smallest_tolerance(candidates, fraction, unit) -> None:
    if not candidates:
        return
    low, high = floor_cost(candidates, unit), dense_cost(candidates, unit)
    allowed = low + fraction * (high - low)
    ranks, tolerance = uniform_tolerance(candidates, allowed, unit)
    check_ranks(candidates, ranks)
    assert total_cost(candidates, ranks, unit) <= allowed + 1e-9
    # every layer is at the least rank whose error is within the tolerance (or dense when that does not save)
    for name, c in candidates.items():
        fits = [r for r in range(1, len(c.curve)) if float(c.curve[r]) <= tolerance]
        least = fits[0] if fits else len(c.curve) - 1
        assert ranks[name] == (least if least <= c.max_rank else None)
    # exact bisection: any smaller level the curves take breaks the budget
    levels = sorted({float(v) for c in candidates.values() for v in c.curve[1 : c.max_rank + 1]} | {0.0})
    smaller = [v for v in levels if v < tolerance]
    if smaller:
        tighter, _ = uniform_tolerance(candidates, float("inf"), unit)  # dense-most allocation as a sanity anchor
        assert total_cost(candidates, tighter, unit) >= total_cost(candidates, ranks, unit)
        at = {n: _least_rank(c, smaller[-1]) for n, c in candidates.items()}
        assert total_cost(candidates, at, unit) > allowed


def _least_rank(c: LayerCandidate, tolerance: float) -> int | None:
    fits = [r for r in range(1, len(c.curve)) if float(c.curve[r]) <= tolerance]
    least = fits[0] if fits else len(c.curve) - 1
    return least if least <= c.max_rank else None


@settings(max_examples=40, deadline=None)
@given(candidates=candidate_sets(), fractions=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)))
def test_uniform_tolerance_is_monotone_in_the_budget(candidates, fractions) -> None:
    if not candidates:
        return
    low, high = floor_cost(candidates, "params"), dense_cost(candidates, "params")
    small, large = sorted(low + f * (high - low) for f in fractions)
    ranks_small, t_small = uniform_tolerance(candidates, small)
    ranks_large, t_large = uniform_tolerance(candidates, large)
    assert t_large <= t_small
    for name in candidates:  # dense (None) counts as the highest rank
        big = ranks_large[name] if ranks_large[name] is not None else 10**9
        assert big >= (ranks_small[name] if ranks_small[name] is not None else 10**9) or ranks_large[name] is None


@settings(max_examples=60, deadline=None)
@given(
    candidates=candidate_sets(),
    fractions=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
    unit=st.sampled_from(["params", "macs"]),
)
def test_greedy_meets_budget_and_more_budget_never_costs_output(candidates, fractions, unit) -> None:
    if not candidates:
        return
    damage = {n: c.curve * (1.0 + i) for i, (n, c) in enumerate(candidates.items())}  # unequal sensitivities
    low, high = floor_cost(candidates, unit), dense_cost(candidates, unit)
    small, large = sorted(low + f * (high - low) for f in fractions)
    results = []
    for allowed in (small, large):
        ranks = allocate_on_curves(candidates, damage, allowed, unit)
        check_ranks(candidates, ranks)
        assert total_cost(candidates, ranks, unit) <= allowed + 1e-9
        results.append(sum(0.0 if r is None else float(damage[n][r]) for n, r in ranks.items()))
    assert results[1] <= results[0] + 1e-12


@settings(max_examples=30, deadline=None)
@given(candidates=candidate_sets(), fraction=st.floats(0.0, 1.0))
def test_greedy_is_close_to_the_brute_force_optimum(candidates, fraction) -> None:
    names = list(candidates)[:3]
    candidates = {n: candidates[n] for n in names}
    if not candidates:
        return
    damage = {n: c.curve * (1.0 + 3 * i) for i, (n, c) in enumerate(candidates.items())}
    low, high = floor_cost(candidates, "params"), dense_cost(candidates, "params")
    allowed = low + fraction * (high - low)
    ranks = allocate_on_curves(candidates, damage, allowed)
    got = sum(0.0 if r is None else float(damage[n][r]) for n, r in ranks.items())
    best = _brute_force(candidates, damage, allowed)
    # hull greedy is optimal up to the one hull step it cannot split: bounded by the largest single-layer loss
    worst_step = max(float(d[1]) for d in damage.values())
    assert best - 1e-12 <= got <= best + worst_step + 1e-12


def _brute_force(candidates, damage, allowed) -> float:
    import itertools

    options = [[None, *range(1, c.max_rank + 1)] for c in candidates.values()]
    best = float("inf")
    for combo in itertools.product(*options):
        ranks = dict(zip(candidates, combo))
        if total_cost(candidates, ranks, "params") <= allowed:
            best = min(best, sum(0.0 if r is None else float(damage[n][r]) for n, r in ranks.items()))
    return best


def test_budgets_that_cannot_be_met_or_are_malformed_fail_with_the_argument_named() -> None:
    c = LayerCandidate("fc", torch.zeros(8, 8, dtype=torch.float64), torch.eye(8, dtype=torch.float64),
                       torch.linspace(2, 1, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="`param_budget`.*rank 1"):
        allocate({"fc": c}, param_budget=0.1)
    with pytest.raises(ValueError, match="`macs_budget`"):
        allocate({"fc": c}, macs_budget=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        allocate({"fc": c}, param_budget=0.5, macs_budget=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        allocate({"fc": c})
    with pytest.raises(ValueError, match="`param_budget` must be a fraction"):
        allocate({"fc": c}, param_budget=1.5)
    with pytest.raises(ValueError, match="`rule`"):
        allocate({"fc": c}, param_budget=0.5, rule="fisher")
    with pytest.raises(ValueError, match="needs a `probe`"):
        allocate({"fc": c}, param_budget=0.5, rule="probe")
    allocation = allocate({"fc": c}, param_budget=0.5)
    assert allocation.rule == "uniform" and allocation.ranks == {"fc": 2}  # 2 * 16 = 32 of 64 parameters


# -- candidates from a real model ---------------------------------------------------------------
class Mixed(nn.Module):
    """A Conv2d, a Linear, a Hugging Face style Conv1D, an attention module and a tied pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(6, 12)
        self.hf = Conv1D(10, 12)
        self.attn = nn.MultiheadAttention(10, 2, batch_first=True)
        self.tied_a, self.tied_b = nn.Linear(10, 10), nn.Linear(10, 10)
        self.tied_b.weight = self.tied_a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)  # (B, 16, 6)
        h = self.hf(torch.tanh(self.fc(h)))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.tied_b(torch.relu(self.tied_a(h)))


def mixed_data(seed: int = 0, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 2, 4, 4, generator=g) for _ in range(n)]


def mixed_candidates(dtype: torch.dtype = torch.float32) -> tuple[Mixed, list[torch.Tensor], dict, dict]:
    """A seeded ``Mixed`` in eval mode, its data, and its layer candidates and the layers left out."""
    torch.manual_seed(0)
    model = Mixed().eval()
    batches = mixed_data()
    candidates, left_out = layer_candidates(model, lr.collect(model, batches, dtype=dtype))
    return model, batches, candidates, left_out


def test_candidates_leave_out_what_cannot_be_factorized_and_hold_the_whitened_curve() -> None:
    model, batches, candidates, left_out = mixed_candidates(torch.float64)
    assert set(candidates) == {"conv", "fc", "hf"}
    assert {"attn.in_proj", "attn.out_proj", "tied_a", "tied_b"} <= set(left_out)
    assert "tied" in left_out["tied_a"] and "MultiheadAttention" in left_out["attn.in_proj"]
    # reference: the relative output error of W_r measured by running the layer on its recorded inputs
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=n: inputs.setdefault(name, []).append(a[0]))
             for n, m in (("fc", model.fc), ("hf", model.hf))]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    for name in ("fc", "hf"):
        c = candidates[name]
        x = torch.cat(inputs[name]).reshape(-1, c.shape[1]).double()
        y = x @ c.weight.t()
        for rank in (1, 3, c.max_rank):
            error = float((x @ (c.weight - c.weight_at(rank)).t()).square().sum() / y.square().sum())
            # W_r is float32: its rounding, against a difference W - W_r of a few percent of W, moves this error by
            # about 1e-5 of itself, and by more or less with the BLAS kernels the thread count picks
            assert error == pytest.approx(c.error(rank), rel=5e-5, abs=1e-9)
            rows = torch.linalg.svdvals(x @ c.weight.t())  # the least error of any rank-r map on these rows
            assert c.error(rank) == pytest.approx(float(rows[rank:].square().sum() / rows.square().sum()), abs=1e-6)


def test_probe_restores_every_weight_bit_exactly_even_when_the_forward_raises() -> None:
    model, batches, candidates, _ = mixed_candidates()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    allocation = allocate(candidates, param_budget=0.5, probe=Probe(model, batches))
    assert allocation.probe_passes > 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.conv.weight.data_ptr() == model.conv.weight.data_ptr()  # same parameters, nothing swapped
    assert not model.training

    calls = {"n": 0}

    def failing(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > len(batches) + 1:
            raise RuntimeError("boom")
        return module(batch)

    probe = Probe(model, batches, forward=failing)
    probe.reference()
    with pytest.raises(RuntimeError, match="boom"):
        probe.error({c.target: c.weight_at(1) for c in candidates.values()})
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_linearized_damage_matches_real_truncation_where_the_model_is_linear() -> None:
    """On a linear model the first-order damage is exact: it must equal the measured error at every rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 8)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 12, generator=g) * torch.linspace(3, 0.1, 12) for _ in range(2)]
    stats = lr.collect(model, batches)
    candidates, _ = layer_candidates(model, stats)
    probe = Probe(model, batches)
    curves = probe.linear_damage(candidates, samples=64)
    for name, c in candidates.items():
        for rank in (1, 2, 4, c.max_rank):
            truth = probe.error({c.target: c.weight_at(rank)})
            assert float(curves[name][rank]) == pytest.approx(truth, rel=0.25), (name, rank)


class TwoBranches(nn.Module):
    """Two layers with the same input and the same weights; the model's output amplifies one of them."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.loud, self.quiet = nn.Linear(d, d), nn.Linear(d, d)
        self.quiet.load_state_dict(self.loud.state_dict())
        self.mix = nn.Linear(2 * d, 4)
        with torch.no_grad():
            self.mix.weight[:, d:] *= 0.02

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.cat([torch.tanh(self.loud(x)), torch.tanh(self.quiet(x))], dim=-1))


SCALES = torch.logspace(0, -1.5, 16)


def two_branches_with_data() -> tuple[TwoBranches, list[torch.Tensor], lr.ActivationStatistics, torch.Generator]:
    """A seeded :class:`TwoBranches`, three calibration batches with a decaying spectrum, their statistics, and the
    generator that drew them (for fresh data from the same distribution)."""
    torch.manual_seed(0)
    model = TwoBranches().eval()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(128, 16, generator=g) * SCALES for _ in range(3)]
    return model, batches, lr.collect(model, batches), g


def test_probe_gives_the_sensitive_layer_more_rank_and_the_model_less_error() -> None:
    model, batches, stats, g = two_branches_with_data()
    candidates, _ = layer_candidates(model, stats, exclude_modules=["mix"])
    assert set(candidates) == {"loud", "quiet"}
    uniform = allocate(candidates, param_budget=0.45, rule="uniform")
    assert uniform.ranks["loud"] == uniform.ranks["quiet"]  # same curves, same rank
    probed = allocate(candidates, param_budget=0.45, probe=Probe(model, batches))
    assert probed.rule == "probe"
    assert probed.ranks["loud"] > uniform.ranks["loud"] and probed.ranks.get("quiet", 0) < uniform.ranks["quiet"]
    assert probed.layers["loud"].sensitivity > 10 * probed.layers["quiet"].sensitivity
    assert probed.calibration_error["probe"] < 0.5 * probed.calibration_error["uniform"]
    # judged on fresh data with the real factorized layers
    fresh = torch.randn(512, 16, generator=g) * SCALES
    with torch.no_grad():
        reference = model(fresh)
    errors = {}
    for label, allocation in (("uniform", uniform), ("probe", probed)):
        compressed = copy.deepcopy(model)
        lr.factorize_(compressed, stats, ranks=allocation.ranks, method="whiten", exclude_modules=["mix"])
        with torch.no_grad():
            errors[label] = float((compressed(fresh) - reference).square().sum() / reference.square().sum())
    assert errors["probe"] < 0.5 * errors["uniform"]


def test_the_result_is_never_worse_than_uniform_tolerance_on_the_calibration_batches() -> None:
    model, batches, candidates, _ = mixed_candidates()
    for budget in (0.3, 0.6):
        allocation = allocate(candidates, param_budget=budget, probe=Probe(model, batches))
        errors = allocation.calibration_error
        assert set(errors) == {"probe", "uniform"}
        assert errors[allocation.rule] == min(errors.values())
        assert allocation.kept <= budget * allocation.base
        d = allocation.layers["fc"]
        assert d.energy_kept == pytest.approx(1 - d.relative_error)
        assert d.sensitivity is not None and d.output_error is not None


# -- multiply-adds ------------------------------------------------------------------------------
class WideConvNet(nn.Module):
    """Two 3x3 convolutions on 8x8 maps (many positions, few parameters), then a large linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(nn.functional.avg_pool2d(x, 2).flatten(1))


def wide_conv_net() -> tuple[WideConvNet, list[torch.Tensor], lr.ActivationStatistics]:
    """A seeded ``WideConvNet`` in eval mode, two batches of images, and its statistics on them."""
    torch.manual_seed(0)
    model = WideConvNet().eval()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(2)]
    return model, batches, lr.collect(model, batches)


def test_halving_parameters_leaves_multiply_adds_almost_unchanged_but_a_macs_budget_halves_them() -> None:
    model, batches, stats = wide_conv_net()
    candidates, _ = layer_candidates(model, stats)
    probe = Probe(model, batches)
    positions = probe.positions({n: c.target for n, c in candidates.items()})
    assert positions == {"conv1": 64.0, "conv2": 64.0, "fc": 1.0}
    for name, c in candidates.items():
        c.positions = positions[name]

    def kept(allocation, unit: str) -> float:
        layers = allocation.layers.values()
        if unit == "params":
            return sum(d.params for d in layers) / sum(d.dense_params for d in layers)
        return sum(d.macs for d in layers) / sum(d.dense_macs for d in layers)

    by_params = allocate(candidates, param_budget=0.5, probe=probe)
    assert kept(by_params, "params") <= 0.5
    assert kept(by_params, "macs") > 0.85  # the convolutions hardly change
    by_macs = allocate(candidates, macs_budget=0.5, probe=probe)
    assert kept(by_macs, "macs") <= 0.5
    assert by_macs.ranks.keys() & {"conv1", "conv2"}


def test_factorize_with_calibration_batches_allocates_by_the_models_own_output() -> None:
    """``factorize_(param_budget=..., calibration=...)``: the probe rule, its details, and less error than the floor."""
    model, batches, stats, g = two_branches_with_data()
    fresh = torch.randn(512, 16, generator=g) * SCALES
    with torch.no_grad():
        reference = model(fresh)
    errors, results = {}, {}
    for label, kwargs in (("uniform", {"allocation": "uniform"}), ("probe", {"calibration": batches})):
        compressed = copy.deepcopy(model)
        results[label] = lr.factorize_(compressed, stats, method="whiten", param_budget=0.45, exclude_modules=["mix"],
                                       **kwargs)
        with torch.no_grad():
            errors[label] = float((compressed(fresh) - reference).square().sum() / reference.square().sum())
    assert (results["uniform"].allocation, results["probe"].allocation) == ("uniform", "probe")
    assert errors["probe"] < 0.5 * errors["uniform"]
    details = results["probe"].details
    assert details["loud"].sensitivity > 10 * details["quiet"].sensitivity
    assert 0 < details["loud"].energy_kept <= 1 and details["loud"].rank > results["uniform"].details["loud"].rank
    assert results["probe"].to_dict()["allocation"] == "probe"
    with pytest.raises(ValueError, match="`macs_budget` needs calibration batches"):
        lr.factorize_(copy.deepcopy(model), stats, macs_budget=0.5, calibration=[])
    with pytest.raises(ValueError, match="allocation='probe' needs calibration batches"):
        lr.factorize_(copy.deepcopy(model), stats, param_budget=0.5, allocation="probe", calibration=[])
    with pytest.raises(ValueError, match="either `param_budget` or `macs_budget`"):
        lr.factorize_(copy.deepcopy(model), stats, param_budget=0.5, macs_budget=0.5, calibration=batches)
    with pytest.raises(ValueError, match="`allocation` must be one of"):
        lr.factorize_(copy.deepcopy(model), stats, param_budget=0.5, allocation="best")


# -- output-weighted truncations ------------------------------------------------------------------
def test_the_plain_call_shares_a_budget_out_on_the_first_batches_collect_kept() -> None:
    """``factorize_(model, stats, param_budget=b)``: the probe rule on ``stats.calibration`` (the first batches collect
    ran, with its forward), exactly as the call given those batches; ``calibration=`` overrides; opting out is uniform."""
    model, _, _, g = two_branches_with_data()
    data = [{"x": torch.randn(128, 16, generator=g) * SCALES} for _ in range(6)]
    seen: list[Any] = []

    def forward(m: nn.Module, batch: dict) -> torch.Tensor:  # the default forward would call m(x=...) and fail
        seen.append(batch)
        return m(batch["x"])

    stats = lr.collect(model, (batch for batch in data), forward=forward)  # a generator: no length
    assert len(stats.calibration) == CALIBRATION_BATCHES == 4 and stats.forward is forward
    options = {"method": "whiten", "param_budget": 0.45, "exclude_modules": ["mix"], "progress": False}

    def factorized(**kwargs: Any) -> tuple[lr.FactorizationResult, list[Any]]:
        seen.clear()
        result = lr.factorize_(copy.deepcopy(model), stats, **options, **kwargs)
        return result, list(seen)

    plain, plain_seen = factorized()
    explicit, explicit_seen = factorized(calibration=data[:4], forward=forward)
    assert plain.allocation == explicit.allocation == "probe"
    assert plain.layers == explicit.layers and plain.details == explicit.details
    assert len(plain_seen) == len(explicit_seen) > 0  # each kept batch run as often as a given one: none twice over
    assert all(any(b is kept for kept in stats.calibration) for b in plain_seen)
    uniform, uniform_seen = factorized(allocation="uniform")
    assert uniform.allocation == "uniform" and not uniform_seen
    assert uniform.layers["loud"] < plain.layers["loud"]  # the probe gives the layer the output reads more rank
    no_batches, _ = factorized(calibration=[])
    assert no_batches.allocation == "uniform" and no_batches.layers == uniform.layers
    other = [{"x": torch.randn(128, 16, generator=g) * SCALES}]
    overridden, overridden_seen = factorized(calibration=other, forward=forward)
    assert overridden.allocation == "probe" and all(b is other[0] for b in overridden_seen)
    # statistics without kept batches (as a callback's, or collect(..., calibration_batches=0)): uniform
    bare = lr.collect(model, data, forward=forward, calibration_batches=0)
    assert bare.calibration == []
    assert lr.factorize_(copy.deepcopy(model), bare, **options).allocation == "uniform"


def test_the_plain_call_counts_multiply_adds_on_the_kept_batches() -> None:
    model, batches, stats = wide_conv_net()
    plain = lr.factorize_(copy.deepcopy(model), stats, macs_budget=0.5, progress=False)
    explicit = lr.factorize_(copy.deepcopy(model), stats, macs_budget=0.5, calibration=batches, progress=False)
    assert plain.allocation == "probe" and plain.layers == explicit.layers
    assert plain.layers.keys() & {"conv1", "conv2"}


def test_output_weighted_truncation_is_the_least_weighted_error_of_its_rank_and_its_curve_the_layer_error() -> None:
    """Against the closed form ``W_r = R^-1 [R W S]_r S^-1`` (``R^T R = G + damping``), computed here independently."""
    g = torch.Generator().manual_seed(0)
    out, fan_in = 6, 9
    weight = torch.randn(out, fan_in, generator=g, dtype=torch.float64)
    s_in = torch.randn(fan_in, fan_in, generator=g, dtype=torch.float64)
    # s_in is S, with the input second moment C = S S^T
    j = torch.randn(3 * out, out, generator=g, dtype=torch.float64) * torch.logspace(1, -2, out, dtype=torch.float64)
    sensitivity = j.t() @ j  # output gradient moment G
    u, s, _ = torch.linalg.svd(weight @ s_in, full_matrices=False)
    plain = LayerCandidate("fc", weight, u, s)
    weighted = plain.output_weighted(sensitivity, damping=1e-2)
    damped = sensitivity + 1e-2 * sensitivity.trace() / out * torch.eye(out, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(damped)
    root, inverse_root = (vectors * values.sqrt()) @ vectors.t(), (vectors / values.sqrt()) @ vectors.t()

    def weighted_error(approx: torch.Tensor) -> float:
        return float((root @ (weight - approx) @ s_in).square().sum())

    def layer_error(approx: torch.Tensor) -> float:
        return float(((weight - approx) @ s_in).square().sum() / (weight @ s_in).square().sum())

    for rank in range(1, out):
        p, q, rh = torch.linalg.svd(root @ weight @ s_in)
        best = inverse_root @ (p[:, :rank] * q[:rank]) @ rh[:rank] @ torch.linalg.inv(s_in)
        assert torch.allclose(weighted.weight_at(rank), best, atol=1e-8)
        assert weighted_error(weighted.weight_at(rank)) <= weighted_error(plain.weight_at(rank)) + 1e-9
        assert weighted.error(rank) == pytest.approx(layer_error(best), rel=1e-9, abs=1e-12)
    assert plain.output_weighted(torch.zeros(out, out, dtype=torch.float64)) is plain  # no signal: unchanged
    with pytest.raises(ValueError, match="already output-weighted"):
        weighted.output_weighted(sensitivity)


class Amplified(nn.Module):
    """A layer whose loudest outputs barely reach the model's output: the head reads its quiet directions."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, 4, bias=False)
        with torch.no_grad():
            u, _, vh = torch.linalg.svd(torch.randn(d, d))
            self.fc.weight.copy_(u @ torch.diag(torch.logspace(0, -2, d)) @ vh)
            self.head.weight.copy_(torch.randn(4, d) @ u.t() * torch.logspace(-2, 1, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x)))


def test_output_weighted_probe_keeps_what_the_model_reads_and_the_planner_builds_exactly_what_was_probed() -> None:
    torch.manual_seed(0)
    model = Amplified().eval()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(128, 16, generator=g) for _ in range(2)]
    stats = lr.collect(model, batches)
    candidates, _ = layer_candidates(model, stats, exclude_modules=["head"])
    plain = allocate(candidates, param_budget=0.4, probe=Probe(model, batches), output_weighted=False)
    weighted = allocate(candidates, param_budget=0.4, probe=Probe(model, batches))
    assert weighted.probe_passes == plain.probe_passes + 2  # one more backward pass, on the first batch
    assert weighted.ranks == plain.ranks  # one layer: the budget decides its rank, the weighting its directions
    assert weighted.rule == "probe" and weighted.candidates["fc"].dual is not None
    assert weighted.calibration_error["probe"] < 0.2 * plain.calibration_error["probe"]
    # the linearized curve of the weighted truncation, where the model is near linear, matches the real error
    rank = weighted.ranks["fc"]
    assert weighted.layers["fc"].output_error == pytest.approx(weighted.calibration_error["probe"], rel=0.3)
    # factorize_ with calibration batches builds those very truncations: same error on the calibration batches
    compressed = copy.deepcopy(model)
    result = lr.factorize_(compressed, stats, method="whiten", param_budget=0.4, exclude_modules=["head"],
                           calibration=batches)
    assert result.layers == {"fc": rank} and result.allocation == "probe"
    assert torch.allclose(compressed.fc.dense_weight().double(), weighted.candidates["fc"].weight_at(rank), atol=1e-5)
    with torch.no_grad():
        diff = sum(float((compressed(b) - model(b)).square().sum()) for b in batches)
        energy = sum(float(model(b).square().sum()) for b in batches)
    assert diff / energy == pytest.approx(weighted.calibration_error["probe"], rel=1e-3)
    # method="projection" keeps its own factors: no weighted truncation is handed to it
    other = copy.deepcopy(model)
    lr.factorize_(other, stats, method="projection", param_budget=0.4, exclude_modules=["head"], calibration=batches)
    assert not torch.allclose(other.fc.dense_weight().double(), weighted.candidates["fc"].weight_at(rank), atol=1e-3)


def test_weighted_damage_matches_real_truncation_of_convolutions_and_linears_where_the_model_is_linear() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.Flatten(), nn.Linear(12 * 16, 10)).eval()
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(64, 3, 4, 4, generator=g) for _ in range(2)]
    stats = lr.collect(model, batches)
    candidates, _ = layer_candidates(model, stats)
    probe = Probe(model, batches)
    weighted, curves = probe.weighted_damage(candidates, samples=64)
    assert set(weighted) == {"0", "2"} and all(c.dual is not None for c in weighted.values())
    for name, c in weighted.items():
        for rank in (1, 2, c.max_rank):
            truth = probe.error({c.target: c.weight_at(rank)})
            assert float(curves[name][rank]) == pytest.approx(truth, rel=0.25), (name, rank)


# -- many processes: a probe whose sums run over every process's batches ---------------------------
class ThreadProcesses:
    """``world`` threads standing in for processes, each with ``reduce``, an in-place sum over all of them (what
    ``torch.distributed.all_reduce`` gives processes; no process group, no Lightning). ``calls[rank]`` records the
    shape and dtype of every tensor a rank reduced, in order."""

    def __init__(self, world: int = 2) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls: list[list[tuple]] = [[] for _ in range(world)]

    def reducer(self, rank: int) -> Callable[[torch.Tensor], None]:
        def reduce(tensor: torch.Tensor) -> None:
            self.calls[rank].append((tuple(tensor.shape), tensor.dtype))
            self.slots[rank] = tensor.detach().clone()
            self.barrier.wait()
            total = functools.reduce(torch.add, self.slots)  # in rank order, the same on every rank
            self.barrier.wait()  # every rank has read the slots before any writes them again
            tensor.copy_(total)

        return reduce

    def run(self, work: Callable[[int, Callable[[torch.Tensor], None]], Any]) -> list[Any]:
        """``work(rank, reduce)`` on every rank at once; the results in rank order (the first error is raised)."""
        results: list[Any] = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = work(rank, self.reducer(rank))
            except BaseException as error:  # the other ranks must not wait for this one
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return results


def assert_same_allocation(a, b) -> None:
    """Bit for bit: the ranks, the rule, the errors, every layer's record and the truncations the factors follow."""
    assert (a.rule, a.ranks, a.calibration_error, a.tolerance, a.kept) == (
        b.rule, b.ranks, b.calibration_error, b.tolerance, b.kept)
    assert a.layers == b.layers
    for name, c in a.candidates.items():
        other = b.candidates[name]
        assert torch.equal(c.basis, other.basis) and torch.equal(c.singular_values, other.singular_values)
        assert (c.dual is None and other.dual is None) or torch.equal(c.dual, other.dual)


def test_processes_with_uneven_batches_allocate_alike_on_the_sum_of_their_curves_and_errors() -> None:
    """Reference, from one-process probes: each process's curves and errors weighted by its output energy."""
    model, batches, stats, _ = two_branches_with_data()
    shares = [batches[:1], batches[1:]]  # 1 and 2 calibration batches
    copies = [copy.deepcopy(model) for _ in shares]

    def work(rank: int, reduce: Callable[[torch.Tensor], None]):
        candidates, _ = layer_candidates(copies[rank], stats)
        probe = Probe(copies[rank], shares[rank], reduce=reduce)
        return allocate(candidates, param_budget=0.4, probe=probe, output_weighted=False)

    processes = ThreadProcesses(2)
    results = processes.run(work)
    assert_same_allocation(*results)
    assert processes.calls[0] == processes.calls[1]

    candidates, _ = layer_candidates(model, stats)
    probes = [Probe(model, share) for share in shares]
    curves = [probe.linear_damage(candidates) for probe in probes]
    energies = [sum(probe.energies) for probe in probes]
    damage = {name: sum(c[name] * e for c, e in zip(curves, energies)) / sum(energies) for name in candidates}
    allowed = 0.4 * sum(c.params(None) for c in candidates.values())
    ranks = {"probe": allocate_on_curves(candidates, damage, allowed), "uniform": uniform_tolerance(candidates, allowed)[0]}

    def error(chosen: dict) -> float:
        weights = {candidates[n].target: candidates[n].weight_at(r) for n, r in chosen.items() if r is not None}
        return sum(probe.error(weights) * e for probe, e in zip(probes, energies)) / sum(energies)

    errors = {rule: error(chosen) for rule, chosen in ranks.items()}
    winner = "probe" if errors["probe"] <= errors["uniform"] else "uniform"
    result = results[0]
    assert result.rule == winner == "probe"
    assert result.ranks == {name: rank for name, rank in ranks[winner].items() if rank is not None}
    assert result.calibration_error == pytest.approx(errors, rel=1e-9)
    for name, layer in result.layers.items():
        expected = 0.0 if layer.rank is None else float(damage[name][layer.rank])
        assert layer.output_error == pytest.approx(expected, rel=1e-9, abs=1e-15)
    alone = allocate(candidates, param_budget=0.4, probe=Probe(model, shares[0]), output_weighted=False)
    assert alone.calibration_error != result.calibration_error  # the other process's batches count


def first_direction_moments(model: nn.Module, batch: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """``sum_p g_p g_p^T`` at each layer's output, ``g_p`` the gradient of ``z . f`` for the probe's first direction
    ``z`` (its seed 0) on ``batch``: the moment the output weighting starts from."""
    outputs = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: outputs.__setitem__(name, out)) for name in layers]
    try:
        f = model(batch)
    finally:
        for handle in handles:
            handle.remove()
    z = torch.randn(f.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(f)
    grads = torch.autograd.grad((f * z).sum(), [outputs[name] for name in layers])
    return {name: g.reshape(-1, g.shape[-1]).t() @ g.reshape(-1, g.shape[-1]) for name, g in zip(layers, grads)}


def test_output_weighted_truncations_follow_the_gradient_moment_summed_over_every_process() -> None:
    torch.manual_seed(0)
    model = Amplified().eval()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(128, 16, generator=g) for _ in range(3)]
    stats = lr.collect(model, batches)
    shares = [batches[:2], batches[2:]]
    copies = [copy.deepcopy(model) for _ in shares]

    def work(rank: int, reduce: Callable[[torch.Tensor], None]):
        candidates, _ = layer_candidates(copies[rank], stats)
        return allocate(candidates, param_budget=0.5, probe=Probe(copies[rank], shares[rank], reduce=reduce))

    processes = ThreadProcesses(2)
    results = processes.run(work)
    assert_same_allocation(*results)
    candidates, _ = layer_candidates(model, stats)
    moments = [first_direction_moments(model, share[0], list(candidates)) for share in shares]
    for name, c in candidates.items():
        expected = c.output_weighted(moments[0][name] + moments[1][name])
        chosen = results[0].candidates[name]
        for rank in (1, c.max_rank):
            assert torch.allclose(chosen.weight_at(rank), expected.weight_at(rank), atol=1e-5), (name, rank)
    alone = candidates["fc"].output_weighted(moments[0]["fc"])  # the other process's batch counts
    assert not torch.allclose(results[0].candidates["fc"].weight_at(1), alone.weight_at(1), atol=1e-3)
    assert results[0].rule == "probe"


def test_a_reduce_that_sums_identical_processes_changes_nothing() -> None:
    """Four processes holding the same batches (a reduce that multiplies by 4) decide exactly as one."""
    model, batches, candidates, _ = mixed_candidates()
    alone = allocate(candidates, param_budget=0.5, probe=Probe(model, batches))
    summed = allocate(candidates, param_budget=0.5, probe=Probe(model, batches, reduce=lambda t: t.mul_(4)))
    assert (summed.rule, summed.ranks) == (alone.rule, alone.ranks)
    assert summed.calibration_error == pytest.approx(alone.calibration_error, rel=1e-12)
    assert Probe(model, batches, reduce=lambda t: t.mul_(4)).positions({n: c.target for n, c in candidates.items()}) == (
        Probe(model, batches).positions({n: c.target for n, c in candidates.items()}))

