"""What planning on the owners saves per process when ``RankCompression`` plans under several processes.

The ViT-B/16-shaped encoder of benchmarks/scaling.py (d=768, MLP 3072; ``--blocks`` of its 12 blocks, same data:
a 32-dimensional signal plus noise, 17 tokens a sample) on 1, 2 and 4 gloo processes (spawned, one thread each).
Each process counts every row of its interleaved share of the validation samples (``RankCompression``'s default
row policy, float32 sums), then plans ``param_budget`` (default 0.5) with the default allocation (the probe on its
first 4 batches, sums over processes) by one of two paths, each in processes of its own:

  owners   what ``RankCompression`` does now: each input's sums go to its owner (``dist.reduce``), the owner alone
           decomposes and factorizes its layers and sends the rest what they need
           (``plan_factorization(owners=...)``, lightning_rank.compress.sharing)
  pooled   the path before it, kept here only as the baseline: every input's sums go to every process
           (``all_reduce``) and every process decomposes and factorizes every layer

``--fsdp2`` plans a model sharded with FSDP2 instead (``fully_shard`` on each block and on the model, over a 1-D mesh
of the processes, as ``ModelParallelStrategy`` does), always on the owners, by one of two paths:

  sharded    what ``RankCompression`` does now: the model stays sharded; each owner gathers its own layers' weights,
             the probe runs the sharded model and writes its truncations into the local shards, and each whitened
             basis stays on its owner
  unsharded  the path before it, kept here only as the baseline: every unit unsharded for the whole planning step
             (``every_unit_unsharded`` below), so every process holds every full weight

With ``--fsdp2`` the processes run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then returns every freed block over
64 KiB to the system, so the peak resident set measures the tensors alive at once rather than the heap's history
(without it, the two paths differed by up to +-10% from run to run, in either direction).

Per process: "stats MB" the statistics held while planning (the sums after the reduce: one process's own, or
every one), "peak MB" the rise of the resident set over planning (VmHWM after /proc/self/clear_refs minus VmRSS
before it: the sums, the float64 moments and eigenvectors, the candidates and factors), and "plan s" CPU seconds
(``time.process_time``) of the reduce plus ``plan_factorization``. Columns show the largest value over the processes.
"same plan" checks that both paths give every process the same ranks and rule, and that the owners path gives
every process the same factors (bit for bit).

Run: .venv/bin/python benchmarks/planning_scaling.py [--worlds 1,2,4] [--blocks 4] [--samples 256] [--budget 0.5]
     .venv/bin/python benchmarks/planning_scaling.py --fsdp2 [--worlds 2,4] ...
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning_rank as lr  # noqa: E402
from benchmarks.scaling import Setup, free_port  # noqa: E402

CALIBRATION = 4  # RankCompression's calibration batches per process


def memory(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@contextlib.contextmanager
def every_unit_unsharded(model: torch.nn.Module):
    """The baseline: every FSDP2 unit of ``model`` holds its full parameters while open, through forwards and backwards
    too (each unit unsharded, resharding after forward and backward off; FSDP2 internals read back on leaving)."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    saved = []
    for unit in units:
        state = unit._get_fsdp_state()
        groups = [(g, g.post_forward_mesh_info, g.reshard_after_backward) for g in state._fsdp_param_groups]
        saved.append((state, state._auto_reshard_after_forward, groups))
    try:
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.set_reshard_after_backward(False, recurse=False)
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for group, post_forward, after_backward in groups:
                group.post_forward_mesh_info, group.reshard_after_backward = post_forward, after_backward


def plan(setup: Setup, blocks: int, rank: int, world: int, path: str, budget: float) -> dict:
    """Count this process's share, then plan by ``path``; what it held and spent."""
    from lightning_rank.callbacks.owners import PooledShare, plan_owners, reduce_to_owners
    from lightning_rank.stats.collector import StatisticsCollector
    from lightning_rank.stats.ownership import assign_owners

    model = setup.model()
    model.blocks = model.blocks[:blocks]
    sharded = path in ("sharded", "unsharded")
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    batches = setup.batches(rank, world)
    collector = StatisticsCollector(model, max_rows_per_batch=None)
    if world > 1 and path != "pooled":
        collector.share = PooledShare(rank, world, assign_owners(collector.targets, world))
    with torch.no_grad(), collector.attached():
        for batch in batches:
            with collector.observe(batch):
                model(batch)
    counted = collector.nbytes
    stats = collector.compute()
    reduce = dist.all_reduce if world > 1 else None
    before = memory("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from VmRSS
    start = time.process_time()
    owners = None
    if world > 1 and path != "pooled":
        shared = reduce_to_owners(collector, stats, collector.share, torch.device("cpu"))
        collector.drop_sums()
        del stats
        stats, owners = shared.planning_view(), plan_owners(model, shared, rank, torch.device("cpu"))
        held = sum(s.nbytes for s in shared.stats.inputs.values())
    else:
        if reduce is not None:
            stats.all_reduce_(reduce)
        held = sum(s.nbytes for s in stats.inputs.values())
    with every_unit_unsharded(model) if path == "unsharded" else contextlib.nullcontext():
        planned = lr.plan_factorization(model, stats, param_budget=budget, calibration=batches[:CALIBRATION],
                                        reduce=reduce, owners=owners, progress=False)
    seconds = time.process_time() - start
    peak = memory("VmHWM") - before
    factors = {name: hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in m.state_dict().values())).hexdigest()
               for name, m in planned.modules.items()}  # bit for bit
    return {"rank": rank, "counted": counted, "held": held, "peak": peak, "seconds": seconds,
            "ranks": planned.result.layers, "rule": planned.result.allocation, "factors": factors}


def run(setup: Setup, blocks: int, world: int, path: str, budget: float) -> list[dict]:
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_entry, args=(world, free_port(), (setup, blocks, path, budget), queue), nprocs=world,
                       start_method="spawn")
    return sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"])


def _entry(rank: int, world: int, port: int, args: tuple, queue) -> None:
    setup, blocks, path, budget = args
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        queue.put(plan(setup, blocks, rank, world, path, budget))
    finally:
        if world > 1:
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", default=None, help="default 1,2,4 (2,4 with --fsdp2)")
    parser.add_argument("--blocks", type=int, default=4, help="ViT-B/16 blocks (of 12)")
    parser.add_argument("--samples", type=int, default=256, help="validation samples of 17 tokens")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--fsdp2", action="store_true", help="a model sharded with FSDP2: sharded against unsharded")
    args = parser.parse_args()
    args.worlds = args.worlds or ("2,4" if args.fsdp2 else "1,2,4")
    if args.fsdp2:  # large blocks go back to the system when freed, so the resident set follows the live tensors
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    setup = Setup("vit", args.samples, 17, 16, dim=768, latent=32)
    began = time.perf_counter()
    print(f"torch {torch.__version__}, 1 thread a process, gloo; load average {os.getloadavg()[0]:.2f}")
    print(f"ViT-B/16 shape (d=768, MLP 3072), {args.blocks} blocks, {args.samples} samples x 17 tokens, every row "
          f"counted (float32 sums); param_budget={args.budget}, allocation 'auto'; max over processes\n")
    baseline = "unsharded" if args.fsdp2 else "pooled"
    print(f"| processes | path | stats MB/proc | x {baseline} | peak MB/proc | x {baseline} | plan s/proc | x {baseline} "
          "| same plan |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for world in [int(w) for w in args.worlds.split(",")]:
        if args.fsdp2:
            paths = ("unsharded", "sharded")
        else:
            paths = ("pooled", "owners") if world > 1 else ("pooled",)
        found = {path: run(setup, args.blocks, world, path, args.budget) for path in paths}
        base = found[baseline]
        same = all((r["ranks"], r["rule"]) == (base[0]["ranks"], base[0]["rule"]) for rs in found.values() for r in rs)
        owned = found[paths[-1]]
        same = same and all(r["factors"] == owned[0]["factors"] for r in owned)
        for path in paths:
            rows = found[path]
            held, peak, seconds = (max(r[key] for r in rows) for key in ("held", "peak", "seconds"))
            ref = [max(r[key] for r in base) for key in ("held", "peak", "seconds")]
            print(f"| {world} | {path if world > 1 or args.fsdp2 else 'one process'} | {held / 2**20:.1f} | {held / ref[0]:.2f} | "
                  f"{peak / 2**20:.0f} | {peak / ref[1]:.2f} | {seconds:.2f} | {seconds / ref[2]:.2f} | "
                  f"{'yes' if same else 'NO'} |")
    print(f"\nwall time {time.perf_counter() - began:.0f} s; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
