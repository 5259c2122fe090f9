"""What ``lr.collect`` adds to a forward pass, against the bare minimum of Gram updates.

In one run, interleaved, medians over repetitions, on a ViT-like model (6 blocks, d=256, separate
q/k/v, 64 tokens):
  T0    forward passes alone (eval, no_grad)
  T1    the same passes through ``lr.collect(max_rows_per_batch=None)`` (exact statistics)
  Tmin  fp32 ``addmm_`` Gram updates of the distinct layer inputs alone (captured beforehand)
  T1/8  ``lr.collect`` with rows subsampled to 1/8 (``max_rows_per_batch=rows // 8``)
  Tauto ``lr.collect`` with its default row policy ("auto")
Goals: (T1 - T0) / Tmin <= 1.0 and (T1/8 - T0) / (Tmin / 8) <= 1.2 (subsampled collection at the Gram floor of
the rows it keeps). Medians and the range over repetitions are printed. Peak memory growth of ``collect`` over
the forward alone (malloc's bytes in use, sampled at every module boundary and statistics update) is
compared with the size of the statistics.

Run: .venv/bin/python benchmarks/collect_overhead.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning_rank as lr  # noqa: E402
from benchmarks.vit import ViT  # noqa: E402

BATCH, BATCHES = 32, 4


def setup() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = ViT(dim=256, depth=6, heads=8, image=32, patch=4).eval()
    batches = [torch.randn(BATCH, 3, 32, 32) for _ in range(BATCHES)]
    return model, batches


def forward_only(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for b in batches:
            model(b)


def distinct_inputs(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The rows ``collect`` accumulates, per batch, one entry per distinct input (captured once)."""
    captured: list[list[torch.Tensor]] = []
    collector = lr.StatisticsCollector(model, max_rows_per_batch=None)
    original = lr.InputStatistics.update

    def keep(self: lr.InputStatistics, rows: torch.Tensor, order: torch.Tensor | None = None) -> None:
        captured[-1].append(rows.clone())

    lr.InputStatistics.update = keep
    try:
        with collector.attached(), torch.no_grad():
            for b in batches:
                captured.append([])
                with collector.observe(b):
                    model(b)
    finally:
        lr.InputStatistics.update = original
    return captured


def gram_minimum(inputs: list[list[torch.Tensor]]) -> None:
    grams = [torch.zeros(x.shape[1], x.shape[1], device=x.device) for x in inputs[0]]
    for batch in inputs:
        for gram, x in zip(grams, batch):
            gram.addmm_(x.t(), x)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _in_use_bytes() -> int:
    """Bytes malloc has handed out and not taken back (heap plus mmapped chunks); torch's CPU tensors use malloc."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


_LIBC = ctypes.CDLL(None)
_LIBC.mallinfo2.restype = _MallInfo2


def peak_memory(model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Peak bytes in use during the forward passes alone and through ``collect``, sampled at every module
    boundary and at every statistics update (when the rows of a layer are alive)."""
    peak = [0]

    def sample(*_: object) -> None:
        peak[0] = max(peak[0], _in_use_bytes())

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(sample), m.register_forward_hook(sample))]
    original = lr.InputStatistics.update

    def sampled_update(self: lr.InputStatistics, rows: torch.Tensor, order: torch.Tensor | None = None) -> None:
        sample()
        original(self, rows, order)
        sample()

    try:
        gc.collect()
        base = _in_use_bytes()
        peak[0] = base
        forward_only(model, batches)
        forward_peak = peak[0] - base
        lr.InputStatistics.update = sampled_update
        gc.collect()
        base = _in_use_bytes()
        peak[0] = base
        stats = lr.collect(model, batches, max_rows_per_batch=None)
        collect_peak = peak[0] - base
    finally:
        lr.InputStatistics.update = original
        for h in handles:
            h.remove()
    stats_bytes = sum(t.numel() * t.element_size() for s in stats.inputs.values() for t in s.tensors())
    return (collect_peak - forward_peak) / 2**20, stats_bytes / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is steadier when other processes share the cores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, batches = setup()
    inputs = distinct_inputs(model, batches)
    rows = BATCH * 64
    runs = {
        "T0 forward": lambda: forward_only(model, batches),
        "T1 collect": lambda: lr.collect(model, batches, max_rows_per_batch=None),
        "Tmin gram": lambda: gram_minimum(inputs),
        "T1/8 collect": lambda: lr.collect(model, batches, max_rows_per_batch=rows // 8),
        "Tauto collect": lambda: lr.collect(model, batches),
    }
    for fn in runs.values():
        fn()  # warm up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(values) for name, values in times.items()}
    t0, t1, tmin, t8 = med["T0 forward"], med["T1 collect"], med["Tmin gram"], med["T1/8 collect"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {BATCHES} batches x {BATCH} images x 64 tokens")
    print(f"distinct inputs per batch: {len(inputs[0])} (dims {sorted({x.shape[1] for x in inputs[0]})})")
    for name, value in med.items():
        print(f"  {name:<14} {1000 * value:8.1f} ms  (median of {args.repeats}, range {1000 * min(times[name]):.1f}-"
              f"{1000 * max(times[name]):.1f})")

    def ratios(numerator: str, floor: float) -> str:
        values = [(t - f) / (g * floor) for t, f, g in zip(times[numerator], times["T0 forward"], times["Tmin gram"])]
        return f"{statistics.median(values):.2f} (range over runs {min(values):.2f}-{max(values):.2f})"

    exact = (t1 - t0) / tmin
    sub = (t8 - t0) / (tmin / 8)
    print(f"(T1 - T0) / Tmin         = {exact:.2f}   goal <= 1.00  {'ok' if exact <= 1.0 else 'MISSED'}; per run {ratios('T1 collect', 1)}")
    print(f"(T1/8 - T0) / (Tmin / 8) = {sub:.2f}   goal <= 1.20  {'ok' if sub <= 1.2 else 'MISSED'}; per run {ratios('T1/8 collect', 1 / 8)}")
    print(f"(T1/8 - T0) / T0         = {(t8 - t0) / t0:.3f}; (Tauto - T0) / T0 = {(med['Tauto collect'] - t0) / t0:.3f}")
    growth, stats_mib = peak_memory(model, batches)
    print(f"peak memory growth {growth:.1f} MiB for {stats_mib:.1f} MiB of statistics "
          f"(ratio {growth / stats_mib:.2f}, goal <= 1.10)")


if __name__ == "__main__":
    main()
