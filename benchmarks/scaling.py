"""What owning each layer's statistics saves per process when several processes validate (DDP, FSDP2).

A ViT-B/16-shaped encoder (d=768, MLP 3072, 12 pre-norm blocks of benchmarks/vit.py: separate q/k/v reading one
LayerNorm output, attention out proj, fc1, fc2; tokens as input, no patch embedding) and one LLaMA-shaped block
scaled to fit this machine (d=1024, 16 heads, RMSNorm, q/k/v/o without bias, SwiGLU gate/up/down with 2816 hidden,
causal attention, no RoPE), run on 1, 2 and 4 gloo processes (``torch.multiprocessing`` spawn, one thread each; one
spawn per process count runs both models). Process ``p`` of ``w`` validates samples ``i`` with ``i % w == p`` (as
``DistributedSampler`` does) through the monitor's statistics path: a ``StatisticsCollector`` at the row budget
"auto" (float32 sums) told this process's number of batches, with a ``ProcessShare`` from ``assign_owners`` under
2 and 4 processes (none with 1, as ``RankMonitor`` on one device), then ``reduce_to_owners`` + ``analyze_shared``
(float32 eigenvalues, threshold 0.99). Per process, all in CPU time (``time.process_time``):
  stats MB     bytes the statistics hold at the end of the epoch, before the reduce (``collector.nbytes``)
  hook ms      CPU time inside the collector's layer hooks per batch: the collector's own timer
               (``collector.seconds``) with its clock switched from ``perf_counter`` to ``process_time``;
               "hook s" is the process's total over its batches
  fwd s        CPU time per batch of the observed forward passes, hooks excluded (for scale)
  analysis s   ``collector.compute`` + ``reduce_to_owners`` + ``analyze_shared``, collectives included
Each column is the largest value over the processes; bytes and analysis also as a ratio to one process. Each run's
report is compared with one process's exact statistics (every row of the whole validation set, float64 sums and
eigenvalues, computed in the parent beside the 1-process run): the MLU difference and the largest |difference| of
in_rank, out_rank or rank over layers. "pooled": layers counted on every process (their owner's share held fewer
rows than the budget). "same": every process ended with the same report. Goals at 4 processes (issue 21): stats
bytes <= 0.30x and analysis CPU <= 0.35x of one process (max over processes), MLU within 0.005, ranks within +-1.

SCALED TO FIT A 2-CORE MACHINE. The row budget "auto" counts ``max(AUTO_MIN_ROWS, AUTO_ROWS_PER_FEATURE * fan_in)``
rows of a layer's input, 64 a feature by default: ~197K rows for a 3072-wide input, which under owners each owner
must find in its own quarter of the data, ~800K ViT-B tokens, some 20 CPU minutes of forwards per process count
here before the exact reference. Every process patches the budget to ``--rows-per-feature`` (default 2) and
``--min-rows`` (128), and the data are sized so that each owner's share at 4 processes holds more rows than its
largest budget (no layer pooled). So few rows pin a 99% energy rank to +-1 only where the spectrum has a gap at the
cut, so data and init are chosen to make one: tokens are a flat Gaussian signal in a random 32-dimensional subspace
(8 for the LLaMA block, whose SwiGLU product makes the down_proj input quadratic in it: 36 directions) plus
isotropic noise holding ~0.25% of the energy; Linear weights have std 0.02 (biases zero) and every norm's gain is
0.05, which keeps attention near uniform and GELU/SiLU near linear, so every layer input stays a low-dimensional
signal plus a small tail. With unit gains (a plain random init) the deeper fc2 inputs spread smoothly over some
1500-1900 of 3072 directions: their ranks then move by hundreds at 1-2 rows a feature.
Near-uniform attention makes the ViT's attention output (the out proj's input) nearly constant within a sample, so
its rank is estimated from samples, not rows, and an owner sees a quarter of them: the ViT gets 17 tokens a sample
(ViT-B/16 on 64x64 images) and 1536 samples (384 an owner). With 197 tokens and 160 samples (``--vit 160,197,8``,
40 an owner) those ranks come out 27 instead of 32 at 4 processes. The LLaMA block has three owner groups (q/k/v/o,
gate/up, down) and the down_proj input alone holds 72% of the statistics' bytes: no assignment gets one block below
0.72x; ``--llama-blocks 4`` shows several.

Run: .venv/bin/python benchmarks/scaling.py [--worlds 1,2,4] [--models vit,llama] [--rows-per-feature 2]
[--min-rows 128] [--vit 1536,17,32] [--llama 160,256,8] [--llama-blocks 1]
(``--vit``/``--llama``: samples, tokens a sample, samples a batch; about 6 minutes on 2 cores at the defaults, the
exact references the longest part)
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import socket
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning_rank as lr  # noqa: E402
from benchmarks.vit import Block as ViTBlock  # noqa: E402

NORM_GAIN = 0.05
NOISE = 0.05  # per coordinate, against a signal of unit variance per coordinate: ~0.25% of the energy
SEED = 0


# -- models ---------------------------------------------------------------------------------------------------------
class TokenViT(nn.Module):
    """ViT-B/16's encoder on tokens: ``depth`` blocks of benchmarks/vit.py and a final LayerNorm."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(tokens))


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.v_proj, self.o_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    """One LLaMA decoder layer (Hugging Face's module names), without rotary embeddings."""

    def __init__(self, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.self_attn, self.mlp = LlamaAttention(dim, heads), LlamaMLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TokenLlama(nn.Module):
    def __init__(self, dim: int = 1024, hidden: int = 2816, heads: int = 16, depth: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(LlamaLayer(dim, hidden, heads) for _ in range(depth)))
        self.norm = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(tokens))


@dataclass(frozen=True)
class Setup:
    """One model and its data: ``samples`` samples of ``tokens`` tokens (a flat ``latent``-dimensional signal plus
    noise), validated in batches of ``batch`` samples."""

    name: str
    samples: int
    tokens: int
    batch: int
    dim: int
    latent: int
    blocks: int = 1

    def model(self) -> nn.Module:
        L.seed_everything(SEED, verbose=False)
        model = TokenViT(self.dim) if self.name == "vit" else TokenLlama(self.dim, depth=self.blocks)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.constant_(module.weight, NORM_GAIN)
        return model.eval()

    @functools.cached_property
    def basis(self) -> torch.Tensor:
        """An orthonormal basis of the signal's subspace."""
        return torch.linalg.qr(torch.randn(self.dim, self.latent, generator=torch.Generator().manual_seed(SEED)))[0]

    def sample(self, index: int) -> torch.Tensor:
        """Sample ``index``: the same tensor whichever process draws it."""
        generator = torch.Generator().manual_seed(SEED + 1 + index)
        signal = torch.randn(self.tokens, self.latent, generator=generator) * math.sqrt(self.dim / self.latent)
        return signal @ self.basis.t() + NOISE * torch.randn(self.tokens, self.dim, generator=generator)

    def batches(self, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
        """This process's interleaved share of the samples (``DistributedSampler`` without shuffling), batched."""
        mine = [self.sample(i) for i in range(rank, self.samples, world)]
        return [torch.stack(mine[i : i + self.batch]) for i in range(0, len(mine), self.batch)]

    @property
    def label(self) -> str:
        if self.name == "vit":
            return f"ViT-B/16 shape (d=768, MLP 3072, 12 blocks), {self.samples} samples x {self.tokens} tokens"
        blocks = "1 block" if self.blocks == 1 else f"{self.blocks} blocks"
        return (f"LLaMA shape (d={self.dim}, SwiGLU 2816), {blocks}, {self.samples} samples x {self.tokens} tokens, "
                f"causal")


# -- one run ----------------------------------------------------------------------------------------------------------
def use_budget(rows_per_feature: int, min_rows: int) -> None:
    from lightning_rank.stats import rows

    rows.AUTO_ROWS_PER_FEATURE, rows.AUTO_MIN_ROWS = rows_per_feature, min_rows


def summary(report: lr.RankReport) -> tuple[float, dict[str, tuple[int, int, int]]]:
    return report.mlu, {name: (layer.in_rank, layer.out_rank, layer.rank) for name, layer in report.analyzed.items()}


def measure(setup: Setup, rank: int, world: int) -> dict:
    """One validation epoch's statistics and report on this process, as ``RankMonitor`` makes them."""
    from lightning_rank.callbacks.owners import SharedStatistics, analyze_shared, reduce_to_owners
    from lightning_rank.stats.collector import StatisticsCollector
    from lightning_rank.stats.ownership import ProcessShare, assign_owners

    model = setup.model()
    batches = setup.batches(rank, world)
    collector = StatisticsCollector(model, batches=len(batches))  # row budget "auto", float32 sums
    share = None
    if world > 1:
        collector.share = share = ProcessShare(rank, world, assign_owners(collector.targets, world))
    with torch.no_grad(), collector.attached():
        start = time.process_time()
        for batch in batches:
            with collector.observe(batch):
                model(batch)
        forward = time.process_time() - start
    nbytes = collector.nbytes
    start = time.process_time()
    stats = collector.compute()
    if share is None:
        shared = SharedStatistics(stats, dict.fromkeys(stats.sources, 0), {}, [nbytes])
    else:
        shared = reduce_to_owners(collector, stats, share, torch.device("cpu"))
    report = analyze_shared(model, shared, share, list(collector.targets), threshold=0.99, eig_dtype=torch.float32,
                            progress=False)
    analysis = time.process_time() - start
    return {"rank": rank, "batches": len(batches), "rows": len(batches[0]) * setup.tokens, "nbytes": nbytes,
            "hooks": collector.seconds, "forward": forward - collector.seconds, "analysis": analysis,
            "report": summary(report), "pooled": sum(bool(p) for p in shared.pooled.values())}


def worker(rank: int, world: int, port: int, setups: list[Setup], budget: tuple[int, int], queue) -> None:
    from lightning_rank.stats import collector as collector_module

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    use_budget(*budget)
    # the collector times its hooks with time.perf_counter: make that clock this process's CPU time
    collector_module.time = types.SimpleNamespace(perf_counter=time.process_time)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for setup in setups:
            queue.put((setup.name, measure(setup, rank, world)))
    finally:
        if world > 1:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(setups: list[Setup], world: int, budget: tuple[int, int], meanwhile=None):
    """Every process's results of each setup on ``world`` processes, and ``meanwhile()``'s, run here meanwhile."""
    queue = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(worker, args=(world, free_port(), setups, budget, queue), nprocs=world, join=False,
                                 start_method="spawn")
    extra = meanwhile() if meanwhile else None
    while not context.join():
        pass
    results: dict[str, list[dict]] = {setup.name: [] for setup in setups}
    for _ in range(world * len(setups)):
        name, result = queue.get()
        results[name].append(result)
    return {name: sorted(found, key=lambda r: r["rank"]) for name, found in results.items()}, extra


def exact(setup: Setup) -> tuple[float, dict[str, tuple[int, int, int]]]:
    """One process, every row of the whole validation set, float64 sums and eigenvalues."""
    model = setup.model()
    stats = lr.collect(model, setup.batches(), max_rows_per_batch=None, dtype=torch.float64)
    return summary(lr.analyze(model, stats, eig_dtype=torch.float64, progress=False))


def differences(got: tuple[float, dict], reference: tuple[float, dict]) -> tuple[float, int, list[str]]:
    """MLU difference, the largest rank difference and the layers that differ by more than 1 (exact -> got)."""
    mlu, ranks = got
    worst, far = 0, []
    for name, ref in reference[1].items():
        diff = max(abs(a - b) for a, b in zip(ranks[name], ref))
        worst = max(worst, diff)
        if diff > 1:
            far.append(f"{name} {ref[2]}->{ranks[name][2]}")
    return abs(mlu - reference[0]), worst, far


def verdict(value: float, goal: float) -> str:
    return "ok" if value <= goal else f"MISSED by {value - goal:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", default="1,2,4", help="process counts; the first must be 1")
    parser.add_argument("--models", default="vit,llama")
    parser.add_argument("--rows-per-feature", type=int, default=2,
                        help="AUTO_ROWS_PER_FEATURE in every process (the package's default: 64)")
    parser.add_argument("--min-rows", type=int, default=128, help="AUTO_MIN_ROWS in every process (package: 4096)")
    parser.add_argument("--vit", default="1536,17,32", help="ViT samples, tokens a sample, samples a batch")
    parser.add_argument("--llama", default="160,256,8", help="LLaMA samples, tokens a sample, samples a batch")
    parser.add_argument("--llama-blocks", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    worlds = [int(w) for w in args.worlds.split(",")]
    assert worlds[0] == 1, "the ratios are against one process: --worlds must start with 1"
    budget = (args.rows_per_feature, args.min_rows)
    use_budget(*budget)
    vit, llama = ([int(v) for v in text.split(",")] for text in (args.vit, args.llama))
    known = {"vit": Setup("vit", *vit, dim=768, latent=32),
             "llama": Setup("llama", *llama, dim=1024, latent=8, blocks=args.llama_blocks)}
    setups = [known[name] for name in args.models.split(",")]
    widest = {"vit": 3072, "llama": 2816}
    began = time.perf_counter()
    print(f"torch {torch.__version__}, lightning {L.__version__}, 1 thread a process, gloo; load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"row budget 'auto' SCALED TO FIT THIS MACHINE: max({args.min_rows}, {args.rows_per_feature} * fan_in) rows "
          f"a layer (the package's default: max(4096, 64 * fan_in)); CPU seconds; max over processes")
    runs, walls, truth = {}, {}, {}
    for world in worlds:
        start = time.perf_counter()
        meanwhile = (lambda: {setup.name: exact(setup) for setup in setups}) if world == 1 else None
        runs[world], reference = run(setups, world, budget, meanwhile)
        truth = reference or truth
        walls[world] = time.perf_counter() - start
    goals = []
    for setup in setups:
        share = setup.samples // max(worlds) * setup.tokens
        largest = max(args.min_rows, args.rows_per_feature * widest[setup.name])
        print(f"\n### {setup.label}\n")
        print(f"batches of {setup.batch} samples ({setup.batch * setup.tokens} rows); largest budget {largest} rows; "
              f"a process's share at {max(worlds)} processes: {share} rows; exact MLU {truth[setup.name][0]:.4f}, "
              f"{len(truth[setup.name][1])} layers\n")
        print("| processes | batches/proc | stats MB/proc | x 1 proc | hook ms/batch | hook s/proc | fwd s/batch "
              "| analysis s/proc | x 1 proc | pooled layers | MLU diff | max rank diff | same |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        base = None
        notes = []
        for world in worlds:
            results = runs[world][setup.name]
            nbytes = max(r["nbytes"] for r in results)
            analysis = max(r["analysis"] for r in results)
            if base is None:
                base = (nbytes, analysis)
            same = all(r["report"] == results[0]["report"] for r in results)
            mlu, worst, far = differences(results[0]["report"], truth[setup.name])
            print(f"| {world} | {results[0]['batches']} | {nbytes / 2**20:.1f} | {nbytes / base[0]:.2f} | "
                  f"{1000 * max(r['hooks'] / r['batches'] for r in results):.0f} | "
                  f"{max(r['hooks'] for r in results):.2f} | {max(r['forward'] / r['batches'] for r in results):.2f} | "
                  f"{analysis:.2f} | {analysis / base[1]:.2f} | {results[0]['pooled']} | {mlu:.4f} | {worst} | "
                  f"{'yes' if same else 'NO'} |")
            if far:
                notes.append(f"{world} processes, ranks off by more than 1 (exact -> got): {', '.join(far)}")
            if world == max(worlds) and world > 1:
                goals.append((setup.name, world, nbytes / base[0], analysis / base[1], mlu, worst))
        for note in notes:
            print(f"\n{note}")
    print()
    for name, world, memory, analysis, mlu, worst in goals:
        print(f"{name}, {world} processes: stats bytes {memory:.2f}x (goal <= 0.30: {verdict(memory, 0.30)}); "
              f"analysis CPU {analysis:.2f}x (goal <= 0.35: {verdict(analysis, 0.35)}); MLU diff {mlu:.4f} "
              f"(goal <= 0.005: {verdict(mlu, 0.005)}); max rank diff {worst} (goal <= 1: {verdict(worst, 1)})")
    stages = ", ".join(f"{world} processes {seconds:.0f} s" for world, seconds in walls.items())
    print(f"\nwall time {time.perf_counter() - began:.0f} s ({stages}; the exact references ran beside the "
          f"1-process run); load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
