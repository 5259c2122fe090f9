"""Time of ``lr.analyze`` on a ViT-B/16-shaped layer set: 12 x {768->2304, 768->768, 768->3072, 3072->768}.

Statistics are synthetic (random PSD second moments with a decaying spectrum, one distinct input per
layer), since only their shapes matter for the time. In one run, interleaved over repetitions:
``lr.analyze`` at its default (float32 eigenvalues, moments whose rank stays open solved again in float64)
and with ``eig_dtype=torch.float64``; the ranks of both must be identical. For scale: the solver floor, one
bare float32 ``eigvalsh`` of every input moment and every output moment at its smaller side (timed on one
block, times 12), and the plain approach, full-size float64 ``eigvalsh`` of every input and output moment.
Goal: analysis <= 15 s on a 2-core CPU.

``--resnet``: the statistics of a ResNet-18-shaped CNN (benchmarks/resnet_shapes.py) over 1/5 of a training set
of 32x32 and 64x64 images, as ``RankMonitor`` collects them (row policy "auto"). In one run, CPU time, interleaved:
``lr.analyze`` with held rows (the default) and with every row summed into the Gram (``HOLD_ROWS = 0``, the path
before them), each against the bare eigensolver work the ranks need: ``eigvalsh`` in float64 of each held input's
small Gram and of its layers' output moments at their smaller side, in float32 of every other moment (zero rows
deflated). Goal: analysis <= 1.2x that floor.

Run: .venv/bin/python benchmarks/analysis_time.py [--repeats 2] [--threads 1] [--resnet [--sizes 32:1280,64:640]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning_rank as lr  # noqa: E402
from lightning_rank.spectral.analysis import decompose  # noqa: E402
from lightning_rank.spectral.spectrum import output_moment  # noqa: E402

SHAPES = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
DEPTH = 12
UPDATES = 8  # 50,000 rows as 8 batches of 32 images x 197 tokens


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
                total=torch.zeros(fan_in),  # a mean that data could have (C - mu mu^T must stay PSD)
                count=torch.tensor(rows),
                nonfinite=torch.tensor(0),
                updates=torch.tensor(UPDATES),
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


def floor_one_block(model: nn.Module, stats: lr.ActivationStatistics) -> float:
    """Bare float32 eigvalsh of block 0's input moments and of its output moments at their smaller side."""
    matrices = []
    for name, (fan_in, out) in SHAPES.items():
        matrices.append(stats[f"blocks.0.{name}"].second_moment(dtype=torch.float32))
        side = torch.randn(min(fan_in, out) + 1, min(fan_in, out) + 1)
        matrices.append(side @ side.t())
    start = time.perf_counter()
    for m in matrices:
        torch.linalg.eigvalsh(m)
    return time.perf_counter() - start


def ranks(report: lr.RankReport) -> dict[str, tuple[int, int]]:
    return {name: (layer.in_rank, layer.out_rank) for name, layer in report.analyzed.items()}


def needed_eigensolves(model: nn.Module, stats: lr.ActivationStatistics) -> list[torch.Tensor]:
    """The matrices whose eigenvalues the ranks need, formed (untimed): per distinct input and per layer output,
    from the held rows' small Gram in float64, else the float32 moment without its exact zero rows."""
    from lightning_rank.targets import select_targets, weight_matrix

    targets, _ = select_targets(model)
    matrices = []
    for key, inputs in stats.inputs.items():
        names = [name for name, source in stats.sources.items() if source == key]
        if inputs.rows is not None:
            rows = inputs.rows.double()
            sides = [rows] + [rows @ weight_matrix(targets[n])[0].detach().double().t() for n in names]
            matrices += [x @ x.t() if x.shape[0] <= x.shape[1] else x.t() @ x for x in sides]
            continue
        moment = inputs.second_moment(dtype=torch.float32)
        active = (moment != 0).any(dim=1)
        matrices.append(moment[active][:, active])
        for name in names:
            weight = weight_matrix(targets[name])[0].detach().float()
            out = weight @ moment @ weight.t() if weight.shape[0] <= weight.shape[1] else moment
            matrices.append(out if weight.shape[0] <= weight.shape[1] else out[active][:, active])
    return matrices


def cpu_seconds(function, *args) -> float:
    start = time.process_time()
    function(*args)
    return time.process_time() - start


def resnet_main(repeats: int, sizes: list[tuple[int, int]]) -> None:
    from benchmarks.resnet_shapes import ResNet18Shaped, image_data
    from lightning_rank.stats import sums

    held = sums.HOLD_ROWS
    for size, train in sizes:
        torch.manual_seed(0)
        model = ResNet18Shaped().eval()
        _, val = image_data(size, train)
        results: dict[str, dict[str, list[float]]] = {}
        reports = {}
        for _ in range(repeats):
            for variant, hold in (("held rows", held), ("every row summed", 0.0)):
                sums.HOLD_ROWS = hold
                stats = lr.collect(model, val)
                floor = needed_eigensolves(model, stats)
                times = results.setdefault(variant, {"analyze": [], "floor": []})
                times["analyze"].append(cpu_seconds(lambda: reports.__setitem__(variant, lr.analyze(
                    model, stats, progress=False))))
                times["floor"].append(cpu_seconds(lambda: [torch.linalg.eigvalsh(m) for m in floor]))
        sums.HOLD_ROWS = held
        print(f"ResNet-18 shape, {size}x{size}, {len(val.dataset)} validation images, {len(stats.sources)} layers, "
              f"CPU seconds, median (range) of {repeats}; ranks identical: "
              f"{ranks(reports['held rows']) == ranks(reports['every row summed'])}")
        for variant, times in results.items():
            a, f = times["analyze"], times["floor"]
            ratio = [x / y for x, y in zip(a, f)]
            print(f"  {variant:<17} analyze {statistics.median(a):6.2f} ({min(a):.2f}-{max(a):.2f}); its eigensolver "
                  f"floor {statistics.median(f):6.2f}; ratio {statistics.median(ratio):.2f} ({min(ratio):.2f}-"
                  f"{max(ratio):.2f})")
        best = statistics.median(results["held rows"]["floor"])
        print(f"  every row summed / floor of held rows: "
              f"{statistics.median(results['every row summed']['analyze']) / best:.2f}; goal held ratio <= 1.2")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is steadier when other processes share the cores")
    parser.add_argument("--resnet", action="store_true", help="a ResNet-18 shape's statistics instead of ViT-B's")
    parser.add_argument("--sizes", default="32:1280,64:640", help="with --resnet: image size:training images, ...")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.resnet:
        import warnings

        warnings.filterwarnings("ignore")
        resnet_main(args.repeats, [tuple(int(v) for v in item.split(":")) for item in args.sizes.split(",")])
        return
    torch.manual_seed(0)
    model = vit_b_layers()
    stats = synthetic_stats()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(stats.sources)} layers")
    times: dict[str, list[float]] = {"default (float32)": [], "float64": [], "floor": []}
    with torch.no_grad():
        for _ in range(args.repeats):
            start = time.perf_counter()
            fast = decompose(model, stats, eig_dtype=torch.float32)
            times["default (float32)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            slow = lr.analyze(model, stats, eig_dtype=torch.float64)
            times["float64"].append(time.perf_counter() - start)
            times["floor"].append(floor_one_block(model, stats) * DEPTH)
            same = ranks(fast.report) == ranks(slow)
            print(f"  ranks identical to float64: {same}; moments solved again in float64: {len(fast.refined)} of "
                  f"{len(stats.inputs) + len(stats.sources)}; MLU {fast.report.mlu:.4f} / {slow.mlu:.4f}")
        plain = plain_one_block(model, stats) * DEPTH
    for name, values in times.items():
        label = name if name != "floor" else "solver floor (bare float32 eigvalsh, x12)"
        print(f"  {label:<42} median {statistics.median(values):6.1f} s (range {min(values):.1f}-{max(values):.1f})")
    print(f"  plain full-size float64 eigvalsh, x12      {plain:6.1f} s")
    default = statistics.median(times["default (float32)"])
    print(f"default / solver floor: {default / statistics.median(times['floor']):.2f}; "
          f"goal <= 15 s: {'ok' if default <= 15 else 'MISSED'}")


if __name__ == "__main__":
    main()
