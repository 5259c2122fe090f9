"""Both callbacks under ``strategy="ddp"``: Lightning's subprocess launcher, 2 processes on CPU with gloo.

The launcher re-executes the running script for the other processes, so each test runs
``tests/ddp_scripts/run_ddp.py`` in a subprocess and reads what every process wrote.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import lightning_rank as lr
from tests import helpers
from tests.helpers import assert_same_report, pooled
from tests.test_allocation import ThreadProcesses
from tests.tiny_models import SUBSPACE

SCRIPT = Path(__file__).parent / "ddp_scripts" / "run_ddp.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def load_script():
    return helpers.load_script(SCRIPT)


def assert_planned_on_owners(plans: list[dict]) -> None:
    """While planning, each layer input's sums were on exactly one process (its owner), and fewer bytes on each than
    every process counted; every process swapped in the very same factors (those its owners sent)."""
    assert plans[0]["factors"] and plans[0]["factors"] == plans[1]["factors"]
    assert len(plans[0]["held"]) == len(plans[1]["held"]) >= 1
    for step in zip(*(plan["held"] for plan in plans)):
        keys = [set(held["keys"]) for held in step]
        assert all(keys) and not keys[0] & keys[1]  # each process holds some sums, and none holds another's
        assert keys[0] | keys[1] == set(step[0]["sources"].values())  # every sum is held by its owner
        for held in step:
            assert held["bytes"] < min(held["counted"])  # below the pooled total each process counted


def run(mode: str, out: Path) -> None:
    done = helpers.launch(SCRIPT, mode, out, timeout=240)
    assert json.loads((out / "exit_codes.json").read_text()) == [0], done.stderr[-5000:]  # rank 1 exited cleanly
    for rank in (0, 1):  # the process group was destroyed before the interpreter finalized (no SIGABRT at exit)
        assert json.loads((out / f"exit_rank{rank}.json").read_text()) == {"initialized": False}


@pytest.mark.timeout(300)
def test_rank_monitor_two_processes_report_as_one(tmp_path: Path) -> None:
    run("monitor", tmp_path)
    script = load_script()
    model = script.Branchy()
    model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    batches = list(DataLoader(script.split_subspaces(), batch_size=4))
    stats = lr.collect(model, batches, forward=lambda m, b: m(b[0]), dtype=torch.float64)
    expected = lr.analyze(model, stats).to_dict()
    assert expected["layers"]["inp"]["in_rank"] == 7  # each rank alone sees 3 or 4 dims
    assert expected["layers"]["extra"]["rows"] == script.MONITOR_SAMPLES // 2  # all on rank 1
    for rank in (0, 1):  # each process's share holds fewer rows than the row budget: every row is summed
        assert_same_report(json.loads((tmp_path / f"report_rank{rank}.json").read_text()), pooled(expected))


@pytest.mark.timeout(300)
def test_rank_compression_two_processes_identical_after_finetuning(tmp_path: Path) -> None:
    run("compression", tmp_path)
    results = [json.loads((tmp_path / f"params_rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["equal"], "ranks disagree: the new layers' gradients were not synchronized"
        assert result["epoch"] == 2  # 1 planned + 1 fine-tuning
        assert result["types"] == {"0": "LowRankLinear", "1": "ReLU", "2": "LowRankLinear", "3": "ReLU",
                                   "4": "LowRankLinear"}
        assert result["ranks"]["net.0"] == SUBSPACE  # its inputs span the 3-dim subspace
    assert results[0]["ranks"] == results[1]["ranks"] and results[0]["numel"] == results[1]["numel"]
    assert results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["metrics"]["finetuned"] > 0.8
    assert_planned_on_owners([json.loads((tmp_path / f"plan_rank{rank}.json").read_text()) for rank in (0, 1)])


@pytest.mark.timeout(300)
def test_two_processes_share_a_budget_out_by_the_probe_on_all_their_calibration_batches(tmp_path: Path) -> None:
    """The default allocation under DDP: each process probes its own validation batches, the sums run over both, and
    both processes choose what one process allocating on the two processes' batches chooses."""
    run("allocation", tmp_path)
    script = load_script()
    results = [json.loads((tmp_path / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1]  # ranks, rule, and every layer's errors and sensitivities, bit for bit
    assert_planned_on_owners([json.loads((tmp_path / f"plan_rank{rank}.json").read_text()) for rank in (0, 1)])
    summary = json.loads((tmp_path / "rank_reports" / "compression.json").read_text())
    assert summary["allocation"] == "probe" and summary["param_budget"] == script.ALLOCATION_BUDGET
    assert summary["layers"] == results[0]["layers"] and summary["details"] == results[0]["details"]
    assert all(d["sensitivity"] is not None for d in summary["details"].values())  # probed
    for rank in (0, 1):
        params = json.loads((tmp_path / f"params_rank{rank}.json").read_text())
        assert params["equal"] and params["ranks"] == summary["layers"]

    # The reference, in this process: the dense weights the plan was made from, the samples the DistributedSampler
    # gave each rank (r, r + 2, ...), statistics over all of them, and the probe of each rank's batches summed over
    # two threads standing in for the processes.
    model = script.PlainClassifier()
    model.load_state_dict(torch.load(tmp_path / "dense.pt", weights_only=True))
    data = script.allocation_validation()
    shares = [list(DataLoader(Subset(data, range(rank, len(data), 2)), batch_size=script.VALIDATION_BATCH))
              for rank in (0, 1)]
    for rank, share in enumerate(shares):  # what each process kept (at most 4 batches) is what it was given
        seen = torch.load(tmp_path / f"calibration_rank{rank}.pt", weights_only=True)
        assert len(seen) == len(share) == 2 and all(torch.equal(a, b) for s, t in zip(seen, share) for a, b in zip(s, t))
    stats = lr.collect(model, shares[0] + shares[1], max_rows_per_batch=None)
    copies = [copy.deepcopy(model) for _ in shares]

    def plan(rank, reduce):
        return lr.plan_factorization(copies[rank], stats, param_budget=script.ALLOCATION_BUDGET,
                                     calibration=shares[rank], reduce=reduce, progress=False).result

    reference = ThreadProcesses(2).run(plan)
    assert reference[0].to_dict() == reference[1].to_dict()
    expected = reference[0]
    assert expected.allocation == summary["allocation"] and expected.layers == summary["layers"]
    # the plain single-process sums differ from the processes' in the last bits only
    for name, entry in summary["details"].items():
        assert entry["energy_kept"] == pytest.approx(expected.details[name].energy_kept, rel=1e-4, abs=1e-6)

