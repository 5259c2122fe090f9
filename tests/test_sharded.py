"""Several processes and sharded models: who owns each layer's statistics, and FSDP2 runs of the callbacks.

The two-process runs use ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard``
(FSDP2) on CPU with gloo; its launcher re-runs the script, so each runs ``tests/ddp_scripts/run_sharded.py`` in a
subprocess and reads what every process wrote.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Subset

import lightning_rank as lr
from lightning_rank.compress.sharing import PlanOwners
from lightning_rank.stats.collector import ELSEWHERE, StatisticsCollector
from lightning_rank.stats.ownership import ProcessShare, assign_owners
from lightning_rank.stats.rows import AUTO_MIN_ROWS
from lightning_rank.targets import select_targets
from tests import helpers
from tests.helpers import assert_same_report, pooled
from tests.test_allocation import ThreadProcesses
from tests.test_ddp import assert_planned_on_owners

SCRIPT = Path(__file__).parent / "ddp_scripts" / "run_sharded.py"

needs_distributed = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def load_script():
    return helpers.load_script(SCRIPT)


def run(mode: str, out: Path) -> list[dict]:
    """Run the script on 2 processes; what each wrote as ``<mode>_rank{R}.json``."""
    helpers.launch(SCRIPT, mode, out, timeout=400)
    return [json.loads((out / f"{mode}_rank{rank}.json").read_text()) for rank in (0, 1)]


# -- owners --------------------------------------------------------------------------------------
class VitShapes(nn.Module):
    """The layers of ViT-B/16 blocks (q, k, v read one input; the MLP widens to 4x), on the meta device."""

    def __init__(self, blocks: int = 12, width: int = 768) -> None:
        super().__init__()
        def block() -> nn.Module:
            attention = nn.ModuleDict({n: nn.Linear(width, width, device="meta") for n in ("q", "k", "v", "proj")})
            mlp = nn.ModuleDict({"fc1": nn.Linear(width, 4 * width, device="meta"),
                                 "fc2": nn.Linear(4 * width, width, device="meta")})
            return nn.ModuleDict({"attn": attention, "mlp": mlp})
        self.blocks = nn.ModuleList(block() for _ in range(blocks))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_owners_balance_the_eigenproblems_and_keep_siblings_together(world_size):
    targets, _ = select_targets(VitShapes())
    owners = assign_owners(targets, world_size)
    assert set(owners) == set(targets) and set(owners.values()) == set(range(world_size))
    assert owners == assign_owners(targets, world_size)  # a pure function: every process computes the same
    for block in range(12):  # q, k, v (and proj, same parent and width) share one owner, so they share one sum
        assert len({owners[f"blocks.{block}.attn.{n}"] for n in ("q", "k", "v", "proj")}) == 1
    wide = [sum(owners[f"blocks.{b}.mlp.fc2"] == p for b in range(12)) for p in range(world_size)]
    assert max(wide) - min(wide) <= 1  # the 3072-wide inputs, the costliest, are spread evenly
    if world_size == 4:  # 12 of 3072 and 36 of 768 in all: 3 and 9 a process, a quarter of the memory each
        assert wide == [3, 3, 3, 3]
        narrow = [sum(owners[n] == p for n in owners if not n.endswith("fc2")) for p in range(4)]
        assert narrow == [15, 15, 15, 15]  # 3 blocks: q, k, v and proj (one owner) and fc1


def test_a_layer_owned_elsewhere_is_left_to_its_owner_unless_the_share_is_too_small():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    owners = {"0": 0, "2": 1}
    batches = [torch.randn(100, 8) for _ in range(3)]

    def collect_on(rank: int, batches_per_process: int) -> tuple[StatisticsCollector, lr.ActivationStatistics]:
        collector = StatisticsCollector(model, batches=batches_per_process, share=ProcessShare(rank, 2, owners))
        with collector.attached():
            for batch in batches:
                with collector.observe(batch):
                    model(batch)
        return collector, collector.compute()

    # 100 rows a batch and 1000 batches a process: far more than the budget, so each owner counts alone
    collector, stats = collect_on(1, 1000)
    assert collector.pooled == {"0": False, "2": False}
    assert stats.layers == ["2"] and stats.skipped["0"] == ELSEWHERE and collector.elsewhere == {"0"}
    expected_rows = 3 * -(-AUTO_MIN_ROWS // 1000)  # the budget over this process's batches only
    assert int(stats["2"].count) == expected_rows
    # 3 batches of 100 rows hold fewer than the budget: every process counts every row, to be summed to the owner
    collector, stats = collect_on(1, 3)
    assert collector.pooled == {"0": True, "2": True} and stats.layers == ["0", "2"]
    assert int(stats["0"].count) == 300 and not collector.elsewhere


# -- planning on the owners ------------------------------------------------------------------------
class ThreadOwners(ThreadProcesses):
    """:class:`ThreadProcesses` with the two collectives of :class:`~lightning_rank.compress.sharing.PlanOwners`."""

    def owners(self, rank: int, owners: dict[str, int]) -> PlanOwners:
        def broadcast(tensor: torch.Tensor, src: int) -> None:
            if rank == src:
                self.slots[src] = tensor.detach().clone()
            self.barrier.wait()
            if rank != src:
                tensor.copy_(self.slots[src])
            self.barrier.wait()

        def gather(obj):
            self.slots[rank] = copy.deepcopy(obj)
            self.barrier.wait()
            parts = list(self.slots)
            self.barrier.wait()
            return parts

        return PlanOwners(rank, owners, broadcast, gather)


class SmallBlocks(nn.Module):
    """Blocks whose q, k and v read one input (one sum, one owner), an MLP that widens, and a head."""

    def __init__(self, width: int = 12, blocks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "q": nn.Linear(width, width), "k": nn.Linear(width, width), "v": nn.Linear(width, width),
            "fc1": nn.Linear(width, 3 * width), "fc2": nn.Linear(3 * width, width)}) for _ in range(blocks))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + torch.tanh(b["q"](x)) * b["k"](x) + b["v"](x)
            x = x + b["fc2"](torch.relu(b["fc1"](x)))
        return self.head(x.mean(dim=1))


def owned_view(stats: lr.ActivationStatistics, owners: dict[str, int], rank: int) -> lr.ActivationStatistics:
    """What a process holds after the sums went to the owners: every layer's name, only its own layers' sums."""
    inputs = {key: s for key, s in stats.inputs.items() if owners[key] == rank}
    return lr.ActivationStatistics(inputs, dict(stats.sources), dict(stats.skipped), list(stats.unmasked))


@pytest.mark.parametrize(("world", "options"), [
    (2, {"param_budget": 0.5}),  # the probe on each process's batches, whitened factors on its truncations
    (3, {"param_budget": 0.5, "allocation": "uniform", "method": "projection"}),
    (2, {"threshold": 0.95, "method": "projection"}),
    (2, {"ranks": {"fc1": 2}, "threshold": 0.9}),
])
def test_owners_plan_exactly_what_every_process_planning_alone_plans_and_send_everyone_the_same_factors(world, options):
    model = SmallBlocks()
    generator = torch.Generator().manual_seed(3)
    basis = torch.randn(4, 12, generator=generator)
    batches = [torch.randn(8, 6, 4, generator=generator) @ basis + 0.05 * torch.randn(8, 6, 12, generator=generator)
               for _ in range(2 * world)]
    stats = lr.collect(model, batches, max_rows_per_batch=None, dtype=torch.float64)
    shares = [batches[rank::world] for rank in range(world)]
    owners = {name: owner for name, owner in assign_owners(select_targets(model)[0], world).items()
              if name in stats.sources}
    assert len(set(owners.values())) == world  # every process owns some layers
    copies = [copy.deepcopy(model) for _ in range(2 * world)]

    def plan(rank, reduce, sharing=None, view=stats):
        return lr.plan_factorization(copies[rank + (world if sharing else 0)], view, calibration=shares[rank],
                                     reduce=reduce, owners=sharing, progress=False, **options)

    alone = ThreadProcesses(world).run(plan)  # every process holds every sum and plans every layer itself
    processes = ThreadOwners(world)
    views = [owned_view(stats, owners, rank) for rank in range(world)]
    owned = processes.run(lambda rank, reduce: plan(rank, reduce, processes.owners(rank, owners), views[rank]))
    for rank in range(world):
        assert owned[rank].result.to_dict() == alone[rank].result.to_dict()  # ranks, rule, every error, bit for bit
        assert list(owned[rank].modules) == list(alone[0].modules)
        for name, module in owned[rank].modules.items():  # the owner's factors, on every process
            for key, tensor in module.state_dict().items():
                assert torch.equal(tensor, alone[0].modules[name].state_dict()[key]), (rank, name, key)
        # each process held only its own layers' sums: fewer bytes than all of them
        assert sum(s.nbytes for s in views[rank].inputs.values()) < sum(s.nbytes for s in stats.inputs.values())
    assert alone[0].modules and (options.get("param_budget") is None or alone[0].result.allocation)


def test_owners_calibrate_on_as_many_batches_on_every_process_when_given_unequal_numbers():
    """The probe meets each layer's owner once a batch, so a process with more calibration batches than another would
    wait for it forever: with owners every process calibrates on as many as the one with fewest."""
    model = SmallBlocks()
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 6, 12, generator=generator) for _ in range(4)]
    stats = lr.collect(model, batches, max_rows_per_batch=None, dtype=torch.float64)
    owners = {name: owner for name, owner in assign_owners(select_targets(model)[0], 2).items() if name in stats.sources}
    shares, copies = [batches[:3], batches[3:]], [copy.deepcopy(model) for _ in range(4)]
    processes = ThreadOwners(2)
    owned = processes.run(lambda rank, reduce: lr.plan_factorization(
        copies[rank], owned_view(stats, owners, rank), param_budget=0.5, calibration=shares[rank], reduce=reduce,
        owners=processes.owners(rank, owners), progress=False))
    alone = ThreadProcesses(2).run(lambda rank, reduce: lr.plan_factorization(
        copies[2 + rank], stats, param_budget=0.5, calibration=shares[rank][:1], reduce=reduce, progress=False))
    assert owned[0].result.allocation == "probe"
    for rank in (0, 1):
        assert owned[rank].result.to_dict() == alone[0].result.to_dict()


def test_a_holder_sends_its_owners_tensors_in_their_layout_and_its_failures_to_every_process():
    processes = ThreadOwners(3)
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 5, generator=generator, dtype=torch.float64).t().contiguous().t()  # column-major
    outcomes: list = [None] * 3

    def work(rank, reduce):
        holder = processes.owners(rank, {"fc": 1}).holder("fc")
        assert holder.here == (rank == 1)
        # the owner's tensors there, meta stand-ins elsewhere
        made, values = holder.stand_ins(lambda: (basis, basis.sum(0)), 2)
        assert made.is_meta == (rank != 1) and made.stride() == basis.stride() and values.shape == (5,)
        head = holder.send(made[:, :3])  # a slice of the owner's basis, as laid out there
        failure = None
        try:
            holder.stand_ins(lambda: (torch.linalg.cholesky(-torch.eye(3, dtype=torch.float64)),), 1)
        except Exception as error:  # noqa: BLE001 - what each process raises
            failure = f"{type(error).__name__}: {error}"
        outcomes[rank] = (head, failure)

    processes.run(work)
    for rank, (head, failure) in enumerate(outcomes):
        assert torch.equal(head, basis[:, :3]) and head.stride() == basis[:, :3].stride(), rank
        if rank == 1:  # the owner raises its own error; the others say which process failed
            assert "positive-definite" in failure, failure
        else:
            assert failure == "RuntimeError: process 1, which holds the layer, failed (see its error)", failure


def test_a_failure_on_one_owner_is_raised_on_every_process():
    model = SmallBlocks()
    stats = lr.collect(model, [torch.randn(4, 6, 12) for _ in range(2)], max_rows_per_batch=None)
    owners = {name: owner for name, owner in assign_owners(select_targets(model)[0], 2).items()}
    with torch.no_grad():  # a diverged weight on a layer process 1 owns: only its owner can tell
        model.blocks[0]["fc2"].weight[0, 0] = float("nan")
    processes = ThreadOwners(2)
    copies = [copy.deepcopy(model) for _ in range(2)]
    failures: list[str] = [""] * 2

    def plan(rank, reduce):
        try:
            lr.plan_factorization(copies[rank], owned_view(stats, owners, rank), threshold=0.9, progress=False,
                                  owners=processes.owners(rank, owners))
        except Exception as error:  # noqa: BLE001 - what each process raises
            failures[rank] = f"{type(error).__name__}: {error}"

    processes.run(plan)
    owner = owners["blocks.0.fc2"]
    assert "NaN or Inf" in failures[owner] and "blocks.0.fc2" in failures[owner]
    assert failures[1 - owner].startswith(f"RuntimeError: planning failed on process(es) {{{owner}:")


def test_fsdp1_and_tensor_parallel_are_rejected_naming_what_is_supported():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    class Fake:  # Lightning refuses FSDP without a GPU, so the trainer is a stand-in
        fast_dev_run = False

    Fake.strategy = FSDPStrategy()
    with pytest.raises(MisconfigurationException, match=r"FSDPStrategy .* `ModelParallelStrategy\(data_parallel_size"):
        lr.RankMonitor().setup(Fake(), nn.Linear(2, 2), "fit")
    Fake.strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    with pytest.raises(MisconfigurationException, match="tensor_parallel_size=1 only .* got tensor_parallel_size=2"):
        lr.RankMonitor().setup(Fake(), nn.Linear(2, 2), "fit")


# -- FSDP2 runs ----------------------------------------------------------------------------------
@needs_distributed
@pytest.mark.timeout(420)
def test_rank_monitor_under_fsdp2_reports_as_one_process(tmp_path: Path) -> None:
    written = run("monitor", tmp_path)
    assert written[0] == written[1]  # every process ends with the same report
    script = load_script()
    model = script.ShardedBlocks()  # the same seeded weights, unsharded
    batches = list(DataLoader(script.token_data(), batch_size=32))
    expected = lr.analyze(model, lr.collect(model, batches, max_rows_per_batch=None, dtype=torch.float64)).to_dict()

    exact, auto = written[0]["exact"], written[0]["auto"]
    assert_same_report(exact["report"], pooled(expected))  # every row counted: the exact sum over processes
    blocks = [name for name in expected["layers"] if name.startswith("blocks.")]
    for name, layer in expected["layers"].items():
        sharded = auto["report"]["layers"][name]
        assert abs(sharded["rank"] - layer["rank"]) <= 1 and abs(sharded["in_rank"] - layer["in_rank"]) <= 1, name
        if name in blocks:  # 8192 rows a process, twice the budget: the owner's share alone, 4096 rows of it (fewer
            # summed, each weighing more, once its spectrum settled)
            assert sharded["pooled"] is False and sharded["rows_reason"] in ("budget", "settled")
            assert (sharded["rows"] == AUTO_MIN_ROWS) == (sharded["rows_reason"] == "budget"), name
            assert sharded["rows"] <= AUTO_MIN_ROWS
        else:  # the head gets one row a sequence, 128 a process: fewer than the budget, so every row is summed
            assert sharded["pooled"] is True and sharded["rows"] == layer["rows"]
    assert auto["report"]["mlu"] == pytest.approx(expected["mlu"], abs=0.005)
    # each process held only its own layers' sums: a quarter of what every process held when every row was summed
    assert max(auto["bytes"]) <= 0.3 * max(exact["bytes"])


@needs_distributed
@pytest.mark.timeout(600)
def test_rank_compression_under_fsdp2_shards_the_new_layers_and_resumes_exactly(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    written = run("compression", tmp_path)
    for run_name in ("full", "first", "resumed"):  # every process holds the same full parameters, in every run
        assert written[0][run_name]["parameters"] == written[1][run_name]["parameters"], run_name
        assert written[0][run_name]["ranks"] == written[1][run_name]["ranks"], run_name
    full, resumed = written[0]["full"], written[0]["resumed"]
    # each layer planned by the one process holding its sums; every process swapped in its factors
    assert_planned_on_owners([written[rank]["full"]["plan"] for rank in (0, 1)])
    assert_planned_sharded([written[rank]["full"]["plan"]["held"] for rank in (0, 1)])
    assert set(full["types"].values()) == {"FSDPLowRankLinear"}  # swapped, then sharded as FSDP2 units of their own
    assert {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"} <= set(full["ranks"])
    assert full["sharded"] == sorted(full["parameters"])  # every parameter is a shard; no dense weight is left over
    for name, shape in full["local"].items():  # each process holds half of each factor's rows
        assert shape[0] == -(-len_rows(full, name) // 2), name
    # the dense epoch, the swap (MLU measured on the factorized layers as the layers they replace), fine-tuning
    assert len(full["reports"]) == 3 and full["factorized"][0] == {} and full["factorized"][1] == full["ranks"]
    assert full["metrics"]["compressed"] != full["metrics"]["before"] != full["metrics"]["finetuned"]
    # resumed from the distributed checkpoint written after the swap: exactly where the uninterrupted run ends
    assert resumed["parameters"] == full["parameters"] and resumed["metrics"] == full["metrics"]
    # its rebuild gathered each factorized layer's full weight in turn, never two at once
    assert resumed["gathered"] and all(len(kept) == 1 for kept in resumed["gathered"]), resumed["gathered"]
    assert sorted(kept[0] for kept in resumed["gathered"]) == sorted(full["ranks"])
    assert resumed["reports"] == full["reports"]

    # The budget was shared out by the probe, on the full weights, over both processes' batches: as one process that
    # probes each process's batches in a thread and sums over both (tests/test_allocation.py) allocates it, from the
    # dense weights of the planning validation (its checkpoint, consolidated) and the samples each process got.
    script = load_script()
    assert full["allocation"] == "probe"
    dense_checkpoint = tmp_path / "dense.pt"
    dcp_to_torch_save(tmp_path / "full" / "checkpoints" / "epoch=0-step=4.ckpt", dense_checkpoint)
    model = script.ShardedBlocks()
    model.load_state_dict(torch.load(dense_checkpoint, weights_only=True)["state_dict"])
    data = script.validation_data()
    shares = [list(DataLoader(Subset(data, range(rank, len(data), 2)), batch_size=script.BATCH)) for rank in (0, 1)]
    stats = lr.collect(model, shares[0] + shares[1], max_rows_per_batch=None, dtype=torch.float64)
    copies = [copy.deepcopy(model) for _ in shares]
    reference = ThreadProcesses(2).run(lambda rank, reduce: lr.plan_factorization(
        copies[rank], stats, param_budget=script.BUDGET, calibration=shares[rank], reduce=reduce, progress=False).result)
    assert reference[0].allocation == "probe" and reference[0].layers == full["ranks"]

    # a consolidated checkpoint loads into a freshly built model with lr.load_factorized
    consolidated = tmp_path / "consolidated.pt"
    dcp_to_torch_save(tmp_path / "full" / "checkpoints" / "last.ckpt", consolidated)
    from lightning_rank.callbacks.checkpoints import checkpoint_shapes

    folder_shapes = checkpoint_shapes(tmp_path / "full" / "checkpoints" / "last.ckpt")  # what a resume rebuilds from
    file_shapes = checkpoint_shapes(consolidated)
    assert {k: v.shape for k, v in folder_shapes.items()} == {k: v.shape for k, v in file_shapes.items()}
    assert folder_shapes["blocks.0.fc1.first.weight"].shape == (full["ranks"]["blocks.0.fc1"], script.WIDTH)
    model = lr.load_factorized(script.ShardedBlocks(), consolidated)
    for name, parameter in model.named_parameters():
        assert parameter.detach().double().flatten().tolist() == full["parameters"][name], name


def assert_planned_sharded(steps: list[list[dict]]) -> None:
    """Planning kept the model sharded: each process gathered and kept the full weights of its own layers only, then of
    one layer at a time (to build the new modules); and the whitened basis of each layer was in memory on its owner
    alone, a ``meta`` stand-in on the other process."""
    for step in zip(*steps):
        owned = []
        for held in step:
            mine = {name for name, key in held["sources"].items() if key in held["keys"]}
            decomposed, *built = held["kept"]
            assert decomposed and set(decomposed) <= mine, (decomposed, mine)
            assert built and all(len(kept) == 1 for kept in built), built
            assert set(held["bases"]) == set(decomposed) and not set(held["stand_ins"]) & mine
            owned.append(set(held["bases"]))
        assert not owned[0] & owned[1] and owned[0] | owned[1] == set(step[0]["bases"]) | set(step[0]["stand_ins"])


def len_rows(written: dict, name: str) -> int:
    """The rows (first dimension) of parameter ``name`` in full, from its flattened values and its shard's shape."""
    local = written["local"][name]
    per_row = 1 if len(local) == 1 else local[1]
    return len(written["parameters"][name]) // per_row


def test_distillation_is_refused_on_fsdp2_by_name():
    from lightning_rank.callbacks.steps import check_sharded

    check_sharded(lr.RankCompression(param_budget=0.5, allocation="probe"))  # the probe and budgets are supported
    with pytest.raises(ValueError, match="distill is not supported on a model sharded with FSDP2"):
        check_sharded(lr.RankCompression(param_budget=0.5, distill=0.5))


@needs_distributed
@pytest.mark.timeout(300)
def test_rank_compression_under_fsdp2_with_a_root_per_block(tmp_path: Path) -> None:
    """Blocks sharded one by one and the model not at all: every block is an FSDP2 root of its own, and each must be
    initialized again after the swap (a shared state context would see its parameters twice)."""
    written = run("noroot", tmp_path)
    assert written[0] == written[1]  # ranks, metrics and every block parameter, on both processes
    assert set(written[0]["ranks"]) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"}
    assert any(name.endswith("first.weight") for name in written[0]["blocks"])  # fine-tuned as low-rank pairs
    assert written[0]["metrics"]["finetuned"] != written[0]["metrics"]["compressed"]


@needs_distributed
@pytest.mark.timeout(300)
def test_progressive_compression_under_fsdp2_plans_every_step_sharded(tmp_path):
    """Two steps on FSDP2 under a bfloat16 mixed-precision policy: the second re-plans the low-rank pairs from dense
    stand-ins that are FSDP2 units themselves, lowers their ranks, and, like the first, keeps each full weight and
    whitened basis on its owner; the pairs it swaps in keep the policy, over float32 master weights."""
    written = run("progressive", tmp_path)
    assert written[0]["parameters"] == written[1]["parameters"] and written[0]["ranks"] == written[1]["ranks"]
    assert written[0]["failure"] is None
    first, second = written[0]["ranks"]
    assert first and second and all(second[name] < first[name] for name in second if name in first)
    assert any(name in first for name in second)  # a pair was re-factorized
    assert written[0]["dtypes"] == ["torch.float32"] and written[0]["policies"] == ["torch.bfloat16"]
    steps = [written[rank]["held"] for rank in (0, 1)]
    assert [held["stood_in"] for held in steps[0]] == [[], sorted(first)]  # the second step stood in for every pair
    assert_planned_sharded(steps)


@needs_distributed
@pytest.mark.timeout(300)
def test_a_plan_that_fails_inside_a_forward_under_fsdp2_leaves_the_model_training(tmp_path):
    """Step 2's probe raises inside a block's forward, while the low-rank pairs are stood in for: the step fails with
    a warning, the pairs of step 1 stay, and every unit, the root included, trains on (a unit left mid-forward and
    then marked uninitialized kept its parameters gathered, and they never changed again)."""
    written = run("failing", tmp_path)
    assert written[0] == written[1]
    assert "a forward that fails" in written[0]["failure"] and written[0]["ranks"]  # the ranks of step 1
    head = written[0]["head"]
    assert set(head) == {"0", "1", "2", "3"} and head["2"] != head["3"]  # the root's head still learns after it


@needs_distributed
@pytest.mark.timeout(300)
def test_rank_compression_under_fsdp2_without_a_budget_swaps_a_layer_the_root_unit_holds(tmp_path):
    """Planning from thresholds runs no probe; the root unit, left gathered by the validation before it, is resharded
    for the swap, which then takes the replaced layer out of the root and keeps float32 master weights under a
    bfloat16 mixed-precision policy."""
    written = run("threshold", tmp_path)
    assert written[0] == written[1]
    assert written[0]["ranks"]["proj"] == 4
    assert written[0]["root"] and all(in_model for _, in_model in written[0]["root"])  # no replaced layer left behind
    assert set(written[0]["dtypes"].values()) == {"torch.float32"}
    assert {"proj.first.weight", "proj.second.weight"} <= set(written[0]["dtypes"])
