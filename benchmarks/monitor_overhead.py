"""What ``RankMonitor`` adds to a whole ``fit``, and to a validation epoch against the bare Gram updates.

Part 1 (default), whole fits: the digits ViT (examples/digits.py) and a digits CNN, each ``fit`` (training
and a validation every epoch, a TensorBoardLogger, checkpoints) with and without ``RankMonitor()`` at its
defaults (row policy "auto", float32 eigenvalues, the default TensorBoard views with their figure budget),
interleaved in one run: the ratio of each pair, its median and range over repetitions, in wall time and in
the process's CPU time, and as 1 + the time spent inside the monitor's callback and layer hooks over the
plain fit (the steadiest of the three when other processes share the cores). Also with the figures drawn on
every analyzed epoch (``figure_budget=None``), without the TensorBoard views, and the last repetition's
final report against exact statistics (every row, float64 eigenvalues): ranks within +-1 and MLU within
0.005. Goal: fit ratio <= 1.10.

Part 2 (``--epoch``): in one run, interleaved, medians over repetitions, on a ViT-like model (6 blocks, d=256, separate
q/k/v, 64 tokens), each epoch a ``trainer.validate`` over the same batches; epoch times are taken
between ``on_validation_epoch_start`` and the monitor's ``on_validation_epoch_end`` (batches only):
  T0      the validation epoch alone
  T1      the same epoch with ``RankMonitor()`` (exact statistics)
  T1/8    with ``RankMonitor(max_rows_per_batch=rows // 8)``
  Tmin    fp32 ``addmm_`` Gram updates of the distinct layer inputs alone (captured beforehand)
  A1, A1/8  the monitor's epoch-end work (reduce, analyze, report, JSON), reported separately
  V       the epoch-end work with a TensorBoardLogger (spectra, figures, heatmap, table) on top
Goals: (T1 - T0) / Tmin <= 1.0 and (T1/8 - T0) / T0 <= 0.10.

Part 3 (``--rows``): how few rows "auto" could count. The digits ViT and CNN, trained as in part 1, collected
with the budget set to 64, 32, 16 and 8 rows a feature (``AUTO_ROWS_PER_FEATURE``, with ``AUTO_MIN_ROWS`` at 64
times it), over ``--repeats`` draw seeds each: the worst rank difference and MLU difference against exact
statistics, and each layer's rows.

Part 4 (``--resnet``): a ResNet-18-shaped CNN (benchmarks/resnet_shapes.py) on 32x32 and 64x64 images, validation
1/5 of training, every epoch analyzed: whole fits with and without ``RankMonitor(tensorboard=False)``, paired and
interleaved, the CPU-time ratio (median and range) and 1 + the monitor's own time over the plain fit, at the defaults
and with settling off (:mod:`lightning_rank.stats.settling`); each one's last report against exact statistics of the
trained model, and the rows each layer summed with the reason. Goals: fit ratio <= 1.15, ranks within +-1, MLU
within 0.005.

Run: .venv/bin/python benchmarks/monitor_overhead.py [--repeats 5] [--epochs 3] [--threads 1] [--epoch | --rows |
--resnet [--sizes 32:1280,64:640]]
(one thread by default: on cores shared with other processes, torch's spinning threads distort everything)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning_rank as lr  # noqa: E402
from benchmarks.collect_overhead import BATCH, distinct_inputs, gram_minimum, setup, timed  # noqa: E402
from benchmarks.resnet_shapes import ImageClassifier  # noqa: E402
from lightning_rank.stats.collector import StatisticsCollector  # noqa: E402


class DigitsCNN(ImageClassifier):
    """A small CNN for the 8x8 digits: three 3x3 convolutions (16, 32, 64 channels, a max-pool) and a linear head."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def one_fit(
    make: type[L.LightningModule], monitor: lr.RankMonitor | None, epochs: int, root: str
) -> tuple[tuple[float, float], L.LightningModule]:
    """Wall and CPU seconds of one ``trainer.fit`` of a fresh ``make()`` (same seed every time) with a TensorBoardLogger."""
    from examples.digits import DigitsDataModule

    torch.manual_seed(0)
    model = make()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=root, logger=TensorBoardLogger(root),
                        callbacks=[monitor] if monitor else [], enable_progress_bar=False, enable_model_summary=False)
    datamodule = DigitsDataModule()
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule)
    return (time.perf_counter() - start, time.process_time() - cpu), model


class Inside:
    """Wall seconds spent inside one monitor: its callback hooks and its layer hooks (the statistics), timed
    around each call. Their share of the plain fit's time is the overhead the monitor itself causes, a figure
    that other processes on the cores disturb far less than the difference of two whole fits."""

    HOOKS = ("setup", "on_fit_start", "on_validation_start", "on_validation_epoch_start", "on_validation_batch_start",
             "on_validation_batch_end", "on_validation_epoch_end", "on_fit_end", "teardown", "state_dict")

    def __init__(self, monitor: lr.RankMonitor) -> None:
        self.seconds = 0.0
        for name in self.HOOKS:  # Lightning looks hooks up on the instance
            setattr(monitor, name, self._timed(getattr(monitor, name)))
        self._observe = StatisticsCollector._observe_input
        StatisticsCollector._observe_input = self._timed(self._observe)

    def _timed(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed

    def close(self) -> float:
        StatisticsCollector._observe_input = self._observe
        return self.seconds


def exact_report(model: L.LightningModule) -> lr.RankReport:
    """The model's report from every validation row, with float64 eigenvalues."""
    from examples.digits import DigitsDataModule

    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    stats = lr.collect(model, datamodule.val_dataloader(), max_rows_per_batch=None)
    return lr.analyze(model, stats, eig_dtype=torch.float64)


def compare(report: lr.RankReport, exact: lr.RankReport) -> tuple[int, float]:
    """Largest rank difference (in, out or rank) over layers and the MLU difference."""
    worst = 0
    for name, layer in exact.analyzed.items():
        got = report.layers[name]
        worst = max(worst, *(abs(getattr(got, key) - getattr(layer, key)) for key in ("in_rank", "out_rank", "rank")))
    return worst, abs(report.mlu - exact.mlu)


def fit_part(repeats: int, epochs: int) -> None:
    from examples.digits import DigitsViT

    variants = {
        "plain": lambda: None,
        "monitor": lambda: lr.RankMonitor(),
        "figures every epoch": lambda: lr.RankMonitor(figure_budget=None),
        "monitor, no views": lambda: lr.RankMonitor(tensorboard=False),
    }
    models = {"digits ViT": DigitsViT, "digits CNN": DigitsCNN}
    times = {(m, v): [] for m in models for v in variants}
    inside = {(m, v): [] for m in models for v in variants}
    last: dict[str, tuple[lr.RankMonitor, L.LightningModule]] = {}
    with tempfile.TemporaryDirectory() as root:
        for model_name, make in models.items():
            one_fit(make, None, 1, root)  # warm up
        for _ in range(repeats):
            for model_name, make in models.items():
                for variant, monitor_of in variants.items():
                    monitor = monitor_of()
                    timer = Inside(monitor) if monitor else None
                    seconds, model = one_fit(make, monitor, epochs, root)
                    times[(model_name, variant)].append(seconds)
                    if timer:
                        inside[(model_name, variant)].append(timer.close() / seconds[0])
                    if variant == "monitor":
                        last[model_name] = (monitor, model)
    for model_name in models:
        plain = times[(model_name, "plain")]
        walls, cpus = [wall for wall, _ in plain], [cpu for _, cpu in plain]
        print(f"{model_name}: {epochs} epochs a fit; plain fit median {statistics.median(walls):.2f} s "
              f"(range {min(walls):.2f}-{max(walls):.2f}), CPU {statistics.median(cpus):.2f} s, over {repeats} runs")
        for variant in list(variants)[1:]:
            pairs = list(zip(times[(model_name, variant)], plain))
            ratios = [t[0] / p[0] for t, p in pairs]
            cpu_ratios = [t[1] / p[1] for t, p in pairs]
            # 1 + the monitor's own time over the plain fit of the same repetition
            own = [1 + share * t[0] / p[0] for share, (t, p) in zip(inside[(model_name, variant)], pairs)]
            verdict = "" if variant != "monitor" else ("  goal <= 1.10 " + ("ok" if statistics.median(ratios) <= 1.10 else "MISSED"))
            print(f"  {variant:<20} fit ratio median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-"
                  f"{max(ratios):.3f}); CPU {statistics.median(cpu_ratios):.3f} ({min(cpu_ratios):.3f}-"
                  f"{max(cpu_ratios):.3f}); 1 + inside / plain {statistics.median(own):.3f} ({min(own):.3f}-"
                  f"{max(own):.3f}){verdict}")
        monitor, model = last[model_name]
        worst, mlu = compare(monitor.report, exact_report(model))
        rows = {name: layer.rows for name, layer in monitor.report.analyzed.items()}
        print(f"  defaults vs exact statistics (last run): largest rank difference {worst} (goal <= 1), "
              f"MLU difference {mlu:.4f} (goal <= 0.005); MLU {monitor.report.mlu:.3f}")
        print(f"  rows used per layer in the last epoch: {rows}")


class Classifier(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self.model(images), labels))


class Clock(Callback):
    """Stamps the epoch's start and end; placed before and after the monitor to split batches from analysis."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end = time.perf_counter()


class Run:
    """One Trainer configuration; ``__call__`` runs one validation epoch and returns (batches, epoch end) seconds."""

    def __init__(self, module: L.LightningModule, batches: list, root: str, monitor: lr.RankMonitor | None,
                 logger: bool = False) -> None:
        self.before, self.after = Clock(), Clock()
        callbacks = [self.before] + ([monitor, self.after] if monitor else [])
        self.trainer = L.Trainer(
            accelerator="cpu", default_root_dir=root, callbacks=callbacks, enable_progress_bar=False,
            enable_model_summary=False, logger=TensorBoardLogger(root) if logger else False,
        )
        self.module, self.loader = module, DataLoader(batches, batch_size=None)

    def __call__(self) -> tuple[float, float]:
        self.trainer.validate(self.module, self.loader, verbose=False)
        return self.before.end - self.before.start, self.after.end - self.before.end


def rows_part(repeats: int, epochs: int) -> None:
    from examples.digits import DigitsDataModule, DigitsViT
    from lightning_rank.stats import rows

    defaults = rows.AUTO_ROWS_PER_FEATURE, rows.AUTO_MIN_ROWS
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    try:
        for name, make in {"digits ViT": DigitsViT, "digits CNN": DigitsCNN}.items():
            with tempfile.TemporaryDirectory() as root:
                _, model = one_fit(make, None, epochs, root)
            exact = exact_report(model)
            for per_feature in (64, 32, 16, 8):
                rows.AUTO_ROWS_PER_FEATURE, rows.AUTO_MIN_ROWS = per_feature, 64 * per_feature
                collected = [lr.collect(model, datamodule.val_dataloader(), seed=seed) for seed in range(repeats)]
                results = [compare(lr.analyze(model, stats, progress=False), exact) for stats in collected]
                counts = {layer: int(collected[0][layer].count) for layer in exact.analyzed}
                print(f"{name}, {per_feature:2d} rows a feature: largest rank difference "
                      f"{max(r[0] for r in results)}, largest MLU difference {max(r[1] for r in results):.4f} "
                      f"over {repeats} seeds; rows {counts}")
    finally:
        rows.AUTO_ROWS_PER_FEATURE, rows.AUTO_MIN_ROWS = defaults


def resnet_part(repeats: int, epochs: int, sizes: list[tuple[int, int]]) -> None:
    from benchmarks.resnet_shapes import fit_seconds
    from lightning_rank.stats import settling

    first = settling.SETTLE_FIRST_ROWS
    variants = {"default": first, "without settling": 10**12}  # a first check no layer reaches: settling off
    with tempfile.TemporaryDirectory() as root:
        fit_seconds(None, 32, 64, 1, root)  # warm up
        for size, train in sizes:
            cpu, own = {v: [] for v in variants}, {v: [] for v in variants}
            walls, last = [], {}
            for _ in range(repeats):
                (plain_wall, plain_cpu), _, _ = fit_seconds(None, size, train, epochs, root)
                walls.append(plain_wall)
                for variant, first_check in variants.items():
                    settling.SETTLE_FIRST_ROWS = first_check
                    monitor = lr.RankMonitor(tensorboard=False)
                    timer = Inside(monitor)
                    (wall, seconds), model, val = fit_seconds(monitor, size, train, epochs, root)
                    cpu[variant].append(seconds / plain_cpu)
                    own[variant].append(1 + timer.close() / plain_wall)
                    last[variant] = monitor
            settling.SETTLE_FIRST_ROWS = first
            exact = lr.analyze(model, lr.collect(model, val, max_rows_per_batch=None), eig_dtype=torch.float64,
                               progress=False)
            print(f"ResNet-18 shape, {size}x{size}, {train} training / {train // 5} validation images, {epochs} "
                  f"epochs, plain fit median {statistics.median(walls):.1f} s wall, {repeats} interleaved repeats:")
            for variant in variants:
                c, o = cpu[variant], own[variant]
                worst, mlu = compare(last[variant].report, exact)
                print(f"  RankMonitor, {variant:<17} CPU ratio {statistics.median(c):.3f} ({min(c):.3f}-{max(c):.3f}); "
                      f"1 + inside / plain {statistics.median(o):.3f} ({min(o):.3f}-{max(o):.3f}); last epoch "
                      f"{ {k: round(v, 2) for k, v in last[variant].history[-1]['seconds'].items()} }; vs exact "
                      f"statistics (the last run's model): largest rank difference {worst} (goal <= 1), MLU difference "
                      f"{mlu:.4f} (goal <= 0.005)")
            report = last["default"].report
            print("  rows per layer (why): " + ", ".join(
                f"{name} {layer.rows} ({layer.rows_reason})" for name, layer in report.analyzed.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each fit (part 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is steadier when other processes share the cores")
    parser.add_argument("--epoch", action="store_true", help="part 2: validation epochs against the bare Gram updates")
    parser.add_argument("--rows", action="store_true", help="part 3: ranks against exact statistics for smaller budgets")
    parser.add_argument("--resnet", action="store_true", help="part 4: a ResNet-18 shape on 32x32 and 64x64 images")
    parser.add_argument("--sizes", default="32:1280,64:640", help="part 4: image size:training images, ...")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads, load average "
          f"{load[0]:.2f}")
    if args.rows:
        rows_part(args.repeats, args.epochs)
        return
    if args.resnet:
        sizes = [tuple(int(v) for v in item.split(":")) for item in args.sizes.split(",")]
        resnet_part(args.repeats, args.epochs, sizes)
        return
    if not args.epoch:
        fit_part(args.repeats, args.epochs)
        print(f"load average now {os.getloadavg()[0]:.2f}")
        return

    load = os.getloadavg()  # other processes on the cores distort every number below
    model, images = setup()
    labels = torch.zeros(BATCH, dtype=torch.long)
    batches = [(x, labels) for x in images]
    module = Classifier(model)
    rows = BATCH * 64
    inputs = distinct_inputs(model, images)
    with tempfile.TemporaryDirectory() as root:
        runs = {
            "T0": Run(module, batches, root, None),
            "T1": Run(module, batches, root, lr.RankMonitor(max_rows_per_batch=None, tensorboard=False)),
            "T1/8": Run(module, batches, root, lr.RankMonitor(max_rows_per_batch=rows // 8, tensorboard=False)),
        }
        views = Run(module, batches, root, lr.RankMonitor(), logger=True)
        for run in runs.values():
            run()  # warm up
        times: dict[str, list[float]] = {name: [] for name in (*runs, "Tmin", "A1", "A1/8")}
        for _ in range(args.repeats):
            for name, run in runs.items():
                epoch, end = run()
                times[name].append(epoch)
                if name != "T0":
                    times[name.replace("T", "A")].append(end)
            times["Tmin"].append(timed(gram_minimum, inputs))
        views()
        view_times = [views()[1] for _ in range(2)]
    med = {name: statistics.median(values) for name, values in times.items()}
    t0, t1, t8, tmin = med["T0"], med["T1"], med["T1/8"], med["Tmin"]

    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads "
          f"(load average at the start {load[0]:.2f}, now {os.getloadavg()[0]:.2f}); "
          f"{len(batches)} batches x {BATCH} images x 64 tokens a validation epoch")
    print(f"distinct inputs per batch: {len(inputs[0])} (dims {sorted({x.shape[1] for x in inputs[0]})})")
    for name, value in med.items():
        print(f"  {name:<6} {1000 * value:8.1f} ms  (median of {args.repeats})")
    print(f"  V      {1000 * statistics.median(view_times):8.1f} ms  epoch end with TensorBoard views (median of 2)")
    exact, sub = (t1 - t0) / tmin, (t8 - t0) / t0
    print(f"(T1 - T0) / Tmin   = {exact:.2f}   goal <= 1.00  {'ok' if exact <= 1.0 else 'MISSED'}")
    print(f"(T1/8 - T0) / T0   = {sub:.3f}  goal <= 0.10  {'ok' if sub <= 0.10 else 'MISSED'}")
    print(f"(T1 - T0) / T0     = {(t1 - t0) / t0:.2f}   (exact statistics, relative to the epoch)")
    print(f"A1 / T0            = {med['A1'] / t0:.2f}   (epoch-end analysis, relative to the epoch)")


if __name__ == "__main__":
    main()
