"""CPU inference time of ``LowRankLinear`` against the dense ``nn.Linear`` it replaces, ViT-B MLP shapes.

768 -> 3072 and 3072 -> 768 at 50% and 25% of the weight parameters (rank ``floor(f * out * in / (out + in))``),
for a ViT-B/16 batch of 8 images (8 x 197 tokens) and for 16 tokens. Dense and factorized layers are
timed side by side in one run: repetitions are interleaved (dense, 50%, 25%, dense, ...) so that load
and frequency changes hit all alike, and medians are reported. Goal: time ratio <= 1.3 x the
parameter ratio.

Run: .venv/bin/python benchmarks/factorized_latency.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning_rank as lr  # noqa: E402

SHAPES = ((768, 3072), (3072, 768))
FRACTIONS = (0.5, 0.25)
ROWS = (8 * 197, 16)
REPEATS = 60
GOAL = 1.3


def factorized(dense: nn.Linear, fraction: float) -> lr.LowRankLinear:
    out, fan_in = dense.out_features, dense.in_features
    rank = int(fraction * out * fan_in / (out + fan_in))
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    return lr.LowRankLinear.from_dense(dense, u[:, :rank] * s[:rank], vh[:rank])


def weight_params(layer: nn.Module) -> int:
    return sum(p.numel() for name, p in layer.named_parameters() if name.endswith("weight"))


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, medians of {REPEATS} interleaved runs")
    print()
    print("| in -> out | tokens | params | rank | dense ms | factorized ms | time ratio | time / param ratio | goal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for fan_in, out in SHAPES:
        dense = nn.Linear(fan_in, out).eval()
        layers = {"dense": dense} | {f: factorized(dense, f).eval() for f in FRACTIONS}
        for rows in ROWS:
            x = torch.randn(rows, fan_in)
            inner = max(1, 2000 // rows)  # several calls per sample for tiny inputs
            times: dict[object, list[float]] = {key: [] for key in layers}
            for repeat in range(REPEATS + 5):
                for key, layer in layers.items():
                    start = time.perf_counter()
                    for _ in range(inner):
                        layer(x)
                    if repeat >= 5:  # warm-up
                        times[key].append((time.perf_counter() - start) / inner)
            base = statistics.median(times["dense"])
            for fraction in FRACTIONS:
                layer = layers[fraction]
                param_ratio = weight_params(layer) / weight_params(dense)
                ratio = statistics.median(times[fraction]) / base
                print(
                    f"| {fan_in} -> {out} | {rows} | {100 * param_ratio:.1f}% | {layer.rank} | {1e3 * base:.3f} | "
                    f"{1e3 * statistics.median(times[fraction]):.3f} | {ratio:.3f} | {ratio / param_ratio:.2f} | "
                    f"{'ok' if ratio <= GOAL * param_ratio else 'MISSED'} |"
                )


if __name__ == "__main__":
    main()
