"""The whole job in one ``trainer.fit``: watch the utilized rank of a small ViT while it learns the digits,
then compress it to half the parameters of its blocks and fine-tune.

- ``lr.RankMonitor`` measures every layer's utilized rank on each analyzed validation epoch; a small callback
  prints the table under the progress bar, and TensorBoard gets scalars, a heatmap and spectra.
- ``lr.RankCompression`` factorizes the trained model after ``--epochs`` dense epochs (keeping half the
  parameters of the layers it may touch, ``param_budget=0.5``) and fine-tunes it for the remaining
  ``--finetune-epochs`` of ``max_epochs``, towards the dense model's predictions (``distill=1.0``: the
  distillation setting of ``benchmarks/digits_compression.py``, with ``lr.distillation_loss`` in
  ``DigitsViT.training_step``), so fine-tuning keeps the accuracy the swap left, or adds to it.
- At the end the dense and the compressed model are compared side by side: parameters, multiply-adds,
  accuracy, and CPU latency on the validation set. The utilization heatmap is saved as a PNG.

Run (about a minute on two CPU cores)::

    .venv/bin/python examples/demo.py            # or: make demo
    .venv/bin/python examples/demo.py --seed 1   # another initialization and shuffling (the split is fixed)
    .venv/bin/python examples/demo.py --fast     # a few seconds: a smoke run (also DEMO_FAST=1)

It writes only under ``--root``/runs (ignored by git); ``--docs-figure`` also refreshes the README's
``docs/utilization_heatmap.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

import lightning_rank as lr
from digits import DigitsDataModule, DigitsViT, accuracy, is_factorized
from lightning_rank.views.figures import utilization_matrix

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class PrintRanks(Callback):
    """Prints the per-layer utilization after each epoch ``monitor`` analyzed, above the progress bar."""

    def __init__(self, monitor: lr.RankMonitor) -> None:
        self.monitor = monitor
        self.printed = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if len(self.monitor.history) == self.printed:
            return
        self.printed = len(self.monitor.history)
        text = rank_table(self.monitor.report, trainer.current_epoch)
        bar = trainer.progress_bar_callback
        bar.print(text) if bar is not None else print(text)


def rank_table(report: lr.RankReport, epoch: int) -> str:
    """A compact table: one line per analyzed layer with its shape, ranks and utilization (and a bar)."""
    lines = [
        f"\nepoch {epoch}: MLU {report.mlu:.1%} (parameter-weighted {report.weighted_mlu:.1%})",
        f"  {'layer':<22} {'out x in':>10} {'in':>4} {'out':>4} {'rank':>5} {'utilization':>12}",
    ]
    for name, layer in report.analyzed.items():
        bar = "#" * round(20 * layer.utilization)
        lines.append(
            f"  {name:<22} {f'{layer.out_features} x {layer.in_features}':>10} {layer.in_rank:>4} "
            f"{layer.out_rank:>4} {layer.rank:>5} {layer.utilization:>11.1%}  {bar}"
        )
    lines += [f"  {name:<22} skipped: {reason}" for name, reason in report.skipped.items()]
    return "\n".join(lines)


class KeepDense(Callback):
    """Keeps the weights of the last epoch before ``RankCompression`` swapped layers in: the trained dense model."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not is_factorized(pl_module):
            self.weights = copy.deepcopy(pl_module.state_dict())


def save_heatmap(history: list[dict[str, Any]], dense_epochs: int, paths: list[Path]) -> None:
    """Utilization of every layer (rows) at every analyzed epoch (columns), as a PNG at each of ``paths``.

    One panel for the dense training and one for the fine-tuning after the swap, where the two factors of a
    replaced layer (``<layer>.first``, ``<layer>.second``) are layers of their own.
    """
    phases = [
        ("training: dense layers", [h for h in history if h["epoch"] < dense_epochs]),
        ("fine-tuning: low-rank factors", [h for h in history if h["epoch"] >= dense_epochs]),
    ]
    phases = [(title, entries) for title, entries in phases if entries]
    rows = max(len(utilization_matrix([h["report"] for h in entries])[0]) for _, entries in phases)
    widths = [len(entries) + 6 for _, entries in phases]  # room for the row labels
    figure, axes = plt.subplots(1, len(phases), figsize=(0.3 * sum(widths) + 1.5, 1.0 + 0.19 * rows),
                                width_ratios=widths, squeeze=False, layout="constrained")
    colors = matplotlib.colormaps["viridis"].copy()
    colors.set_bad("lightgray")  # a layer skipped at that epoch
    for ax, (title, entries) in zip(axes[0], phases):
        names, matrix = utilization_matrix([h["report"] for h in entries])
        image = ax.imshow(matrix, cmap=colors, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(entries)), [str(h["epoch"]) for h in entries], fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes[0].tolist(), format=matplotlib.ticker.PercentFormatter(1.0), shrink=0.8,
                    label="utilization (utilized rank / min(out, in))")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    plt.close(figure)


@torch.inference_mode()
def latency(models: dict[str, nn.Module], loader: DataLoader, repeats: int) -> dict[str, float]:
    """Median seconds of one pass over ``loader`` per model; the models take turns, so they see the same load."""
    batches = list(loader)
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()(batches[0][0])  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            for images, _ in batches:
                model(images)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", default=bool(os.environ.get("DEMO_FAST")),
                        help="a smoke run of a few seconds (also: DEMO_FAST=1)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of dense training, before compression")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="epochs after the swap (max_epochs: the sum)")
    parser.add_argument("--finetune-lr", type=float, default=1e-4, help="peak learning rate after the swap")
    parser.add_argument("--param-budget", type=float, default=0.5, help="fraction of the blocks' parameters kept")
    parser.add_argument("--root", type=Path, default=Path("."), help="where runs/ and docs/ are")
    parser.add_argument("--docs-figure", action="store_true",
                        help="also write docs/utilization_heatmap.png, the README's figure (a tracked file)")
    parser.add_argument("--seed", type=int, default=0, help="initialization and shuffling (the split is fixed)")
    args = parser.parse_args(argv)
    if args.fast:
        args.epochs, args.finetune_epochs = 2, 1

    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    L.seed_everything(args.seed)
    data, model = DigitsDataModule(), DigitsViT(dense_epochs=args.epochs, finetune_lr=args.finetune_lr)
    monitor = lr.RankMonitor(every_n_epochs=1 if args.fast else 2)
    compression = lr.RankCompression(
        param_budget=args.param_budget,
        method="whiten",
        compress_at_epoch=args.epochs,
        monitor="val_acc",
        exclude_modules=["embed", "head"],  # the tiny patch embedding and head stay dense
        distill=1.0,  # fine-tune towards the dense model's predictions: lr.distillation_loss in training_step
    )
    dense = KeepDense()
    trainer = L.Trainer(
        max_epochs=args.epochs + args.finetune_epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(args.root / "runs", name="digits_vit"),
        callbacks=[monitor, PrintRanks(monitor), compression, dense],
        limit_train_batches=5 if args.fast else None,
        log_every_n_steps=10,
    )
    trainer.fit(model, data)

    # The dense model as it was when the dense epochs ended, next to the compressed, fine-tuned one.
    dense_model = DigitsViT(**model.hparams)
    dense_model.load_state_dict(dense.weights)
    summary = json.loads((Path(trainer.log_dir) / "rank_reports" / "compression.json").read_text())
    seconds = latency({"dense": dense_model, "compressed": model}, data.val_dataloader(), repeats=5 if args.fast else 30)
    acc = {"dense": accuracy(dense_model, data.val_dataloader()), "compressed": accuracy(model, data.val_dataloader())}
    metrics, images = summary["metrics"], len(data.val_set)

    print("\n" + compression.result.to_markdown())
    print(f"| {images} validation images | dense | compressed |")
    print("|---|---:|---:|")
    before, after = summary["params_before"], summary["params_after"]
    print(f"| parameters | {before:,} | {after:,} ({after / before:.0%}) |")
    print(f"| parameters of the blocks' linear layers | {summary['layer_params_before']:,} | "
          f"{summary['layer_params_after']:,} ({summary['layer_params_after'] / summary['layer_params_before']:.0%}) |")
    print(f"| multiply-adds per image | {summary['macs_before']:,.0f} | {summary['macs_after']:,.0f} |")
    print(f"| val accuracy (RankCompression) | {metrics['before']:.2%} | {metrics['compressed']:.2%} right after the "
          f"swap, {metrics['finetuned']:.2%} after {args.finetune_epochs} fine-tuning epochs |")
    print(f"| val accuracy, re-measured on the two models | {acc['dense']:.2%} | {acc['compressed']:.2%} |")
    print(f"| CPU latency, validation set in batches of {data.batch_size} | {1e3 * seconds['dense']:.1f} ms | "
          f"{1e3 * seconds['compressed']:.1f} ms |")
    if seconds["compressed"] >= seconds["dense"]:
        print("(Fewer multiply-adds, yet no faster: layers this small spend their time in per-call overheads, "
              "attention and norms; benchmarks/factorized_latency.py measures larger layers.)")

    history = monitor.history
    figures = [args.root / "runs" / "utilization_heatmap.png"]
    if args.docs_figure:
        figures.append(args.root / "docs" / "utilization_heatmap.png")
    save_heatmap(history, args.epochs, figures)
    print(f"\nUtilization heatmap: {', '.join(map(str, figures))}")
    print(f"Reports and compression.json: {Path(trainer.log_dir) / 'rank_reports'}")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {args.root / 'runs'}  (then open http://localhost:6006)")
    return {"log_dir": Path(trainer.log_dir), "summary": summary, "accuracy": acc, "latency": seconds,
            "figures": figures, "history": history, "compression": compression}


if __name__ == "__main__":
    main()
