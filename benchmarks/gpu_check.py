"""The GPU checks of issue 14 as one short script: run it once when the `device` tool lends a GPU.

1. Collection on the device (ViT-like, d=768, 12 blocks, 196 tokens, batches of 32): forward alone (T0),
   through ``lr.collect`` with exact statistics (T1), with rows subsampled to 1/8 (T1/8), and the bare float32
   Gram updates of the same rows (Tmin), each timed between ``torch.cuda.synchronize()`` calls.
   Goals as in collect_overhead.py: (T1 - T0) / Tmin <= 1.0, (T1/8 - T0) / (Tmin / 8) <= 1.2.
2. No host synchronization per batch: the collector's batches after the first (without ``mask_fn``) under
   ``torch.cuda.set_sync_debug_mode("error")`` must not raise.
3. bf16 activations and ``torch.set_float32_matmul_precision("medium")``: the statistics of a bf16 model,
   accumulated in float32, agree with a float64 one-shot reference of the very same bf16 rows (TF32/bf16 Grams
   would err by about 1e-3 relative; full float32 by about 1e-6).
4. ``lr.analyze`` of the ViT-B/16-shaped layer set of analysis_time.py on the device: time, and ranks identical to
   the CPU's float64 analysis.

Run: python benchmarks/gpu_check.py [--device cuda] [--small]   (with no CUDA device and no --device it does nothing;
``--small``: tiny sizes, to try the script on a CPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning_rank as lr  # noqa: E402
from benchmarks import analysis_time  # noqa: E402
from benchmarks.collect_overhead import distinct_inputs, forward_only, gram_minimum  # noqa: E402
from benchmarks.vit import ViT  # noqa: E402


def synchronized(device: torch.device):
    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def collection(device: torch.device, small: bool, repeats: int) -> None:
    torch.manual_seed(0)
    dim, depth, image = (64, 2, 16) if small else (768, 12, 224)
    model = ViT(dim=dim, depth=depth, heads=8, image=image, patch=16 if not small else 4).eval().to(device)
    batches = [torch.randn(32, 3, image, image, device=device) for _ in range(4)]
    inputs = distinct_inputs(model, batches)
    rows = inputs[0][1].shape[0]

    runs = {"T0": lambda: forward_only(model, batches),
            "T1": lambda: lr.collect(model, batches, max_rows_per_batch=None), "Tmin": lambda: gram_minimum(inputs),
            "T1/8": lambda: lr.collect(model, batches, max_rows_per_batch=rows // 8)}
    timed = synchronized(device)
    for fn in runs.values():
        fn()
    times = {name: statistics.median(timed(fn) for _ in range(repeats)) for name, fn in runs.items()}
    print(f"1. collection on {device}: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in times.items()))
    exact = (times["T1"] - times["T0"]) / times["Tmin"]
    sub = (times["T1/8"] - times["T0"]) / (times["Tmin"] / 8)
    print(f"   (T1 - T0) / Tmin = {exact:.2f} (goal <= 1.0); (T1/8 - T0) / (Tmin / 8) = {sub:.2f} (goal <= 1.2)")

    if device.type == "cuda":
        for policy in (None, rows // 8):
            collector = lr.StatisticsCollector(model, max_rows_per_batch=policy)
            with collector.attached(), torch.no_grad():
                with collector.observe(batches[0]):
                    model(batches[0])  # the first batch draws and moves the row indices once
                torch.cuda.set_sync_debug_mode("error")  # only the batches: the summary at the end may synchronize
                try:
                    for b in batches[1:]:
                        with collector.observe(b):
                            model(b)
                    print(f"2. max_rows_per_batch={policy}: no host synchronization per batch: ok")
                except RuntimeError as error:
                    print(f"2. max_rows_per_batch={policy}: a host synchronization per batch: {error}")
                finally:
                    torch.cuda.set_sync_debug_mode("default")
    else:
        print("2. skipped (not a CUDA device)")


def bf16_statistics(device: torch.device) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 256).to(device=device, dtype=torch.bfloat16)
    xs = [(torch.randn(4096, 512, device=device) * torch.logspace(0, -3, 512, device=device)).bfloat16()
          for _ in range(4)]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        stats = lr.collect(layer, xs)[""]
    finally:
        torch.set_float32_matmul_precision(before)
    rows = torch.cat(xs).double()
    if stats.count.item() != len(rows):  # "auto" rows may have subsampled: compare with exact statistics
        stats = lr.collect(layer, xs, max_rows_per_batch=None)[""]
    reference = rows.t() @ rows
    scale = reference.diagonal().sqrt()
    error = ((stats.gram.double() - reference).abs() / torch.outer(scale, scale)).max().item()
    print(f"3. bf16 activations, matmul precision 'medium': Gram error {error:.1e} of sqrt(C_ii C_jj) "
          f"(full float32 ~1e-6, TF32/bf16 ~1e-3): {'ok' if error < 1e-4 else 'TOO LARGE'}")


def analysis(device: torch.device, small: bool) -> None:
    if small:
        analysis_time.DEPTH = 1
    model = analysis_time.vit_b_layers()
    cpu_stats = analysis_time.synthetic_stats()
    stats = cpu_stats.to(device)
    model_on_device = model.to(device)
    lr.analyze(model_on_device, stats, progress=False)  # warm up the solvers
    start = time.perf_counter()
    report = lr.analyze(model_on_device, stats, progress=False)
    seconds = time.perf_counter() - start
    reference = lr.analyze(model.cpu(), cpu_stats, eig_dtype=torch.float64, progress=False)
    same = analysis_time.ranks(report) == analysis_time.ranks(reference)
    print(f"4. analyze of {len(stats.sources)} ViT-B/16-shaped layers on {device}: {seconds:.2f} s; "
          f"ranks identical to CPU float64: {same}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.device is None and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing to check (--device cpu --small tries the script on a CPU)")
        return
    device = torch.device(args.device or "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}")
    collection(device, args.small, args.repeats)
    bf16_statistics(device)
    analysis(device, args.small)


if __name__ == "__main__":
    main()
