"""Time of ``lr.analyze`` on a ViT-B/16-shaped layer set: 12 x {768->2304, 768->768, 768->3072, 3072->768}.

Statistics are synthetic (random PSD second moments with a decaying spectrum, one distinct input per
layer), since only their shapes matter for the time. Compared in one run with the plain approach:
a full-size float64 ``eigvalsh`` of every input and output moment (timed on one block, times 12).
Goal: analysis <= 15 s on a 2-core CPU.

Run: .venv/bin/python benchmarks/analysis_time.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning_rank as lr  # noqa: E402
from lightning_rank.spectrum import output_moment  # noqa: E402

SHAPES = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
DEPTH = 12


def vit_b_layers() -> nn.Module:
    blocks = nn.ModuleList(nn.ModuleDict({n: nn.Linear(i, o) for n, (i, o) in SHAPES.items()}) for _ in range(DEPTH))
    return nn.ModuleDict({"blocks": blocks})


def synthetic_moment(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    spectrum = torch.logspace(0, -6, dim)
    return (basis * spectrum) @ basis.t()


def synthetic_stats(rows: int = 50_000) -> lr.ActivationStatistics:
    moments = {dim: synthetic_moment(dim, dim) for dim in (768, 3072)}
    stats = lr.ActivationStatistics()
    for b in range(DEPTH):
        for name, (fan_in, _) in SHAPES.items():
            key = f"blocks.{b}.{name}"
            jitter = 1 + 0.01 * b
            stats.inputs[key] = lr.InputStatistics(
                gram=moments[fan_in] * jitter * rows,
                total=torch.full((fan_in,), 0.01) * rows,
                count=torch.tensor(rows),
                nonfinite=torch.tensor(0),
            )
            stats.sources[key] = key
    return stats


def plain_one_block(model: nn.Module, stats: lr.ActivationStatistics) -> float:
    """Full-size float64 eigvalsh of every input and output moment of block 0, as a naive analysis would."""
    start = time.perf_counter()
    for name in SHAPES:
        layer = model["blocks"][0][name]
        s = stats[f"blocks.0.{name}"]
        moment, mean = s.second_moment(), s.mean()
        torch.linalg.eigvalsh(moment)
        torch.linalg.eigvalsh(output_moment(layer.weight.double(), layer.bias.double(), moment, mean))
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    model = vit_b_layers()
    stats = synthetic_stats()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(stats.sources)} layers")
    with torch.no_grad():
        results = {}
        for eig_dtype in (torch.float64, torch.float32):
            start = time.perf_counter()
            report = lr.analyze(model, stats, eig_dtype=eig_dtype)
            results[eig_dtype] = time.perf_counter() - start
            print(f"  analyze, eig_dtype={str(eig_dtype):<14} {results[eig_dtype]:6.1f} s   MLU {report.mlu:.3f}")
        plain = plain_one_block(model, stats) * DEPTH
    print(f"  plain full-size float64 eigvalsh   {plain:6.1f} s   (one block timed, x{DEPTH})")
    for eig_dtype, seconds in results.items():
        verdict = "ok" if seconds <= 15 else "MISSED"
        print(f"speed-up over plain, {eig_dtype}: {plain / seconds:.1f}x; goal <= 15 s: {verdict}")


if __name__ == "__main__":
    main()
