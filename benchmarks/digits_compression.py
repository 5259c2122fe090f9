"""The paper's claim at small scale: half the parameters, (almost) no accuracy lost after fine-tuning.

For each seed a ``DigitsViT`` (``examples/digits.py``: 2x2 patches, dim 64, 2 blocks) is trained on
scikit-learn's bundled digits; ``lr.RankCompression`` then factorizes the twelve linear layers of its blocks
to ``param_budget`` of their parameters (``method="whiten"``, allocation "auto": the probe on the first 4
validation batches; the patch embedding and the head stay dense) and fine-tunes, all in one ``trainer.fit``.
Read from each run's ``compression.json``: the parameters of those layers before and after, and the top-1
validation accuracy (torchmetrics) before compression, right after it, and after fine-tuning.

Fine-tuning (default ``--finetune distill``): 20 epochs towards the dense model's predictions
(``KL(dense || compressed)`` on the training images, :class:`DistilledViT`), cosine decay from lr 1e-4.
These settings were chosen on seeds 3, 4 and 5, which are not reported, at ``param_budget=0.5``
(worst-seed / mean drop in points over those seeds):

    labels,  lr 1e-4: +0.89 / +0.52       distill, lr 1e-4: +0.44 / +0.15  (chosen)
    distill, lr 5e-4: +0.67 / +0.30       (labels, lr 5e-4 was the former default, chosen on seeds 0-2)

Progressive compression (``--param-budget b1 b2 ...``: one step per budget, each a fraction of the original
blocks, ``--step-epochs`` apart, the first after ``--epochs``; each swap restarts the cosine decay from
``--finetune-lr`` over the rest of the fit, or to the next swap with ``--segments``). With several budgets the
table puts one step to the last budget beside them, fine-tuned for the same total epochs (``--no-one-step``: not).

At 25% the settings were chosen on seeds 3 and 4, which are not reported; 30 dense + 35 epochs (65 in all), the
progressive schedule 0.5 -> 0.4 -> 0.32 -> 0.25, 5 epochs apart; distillation weight 1 (drop in points, seed 3 /
seed 4; O: one step, P: progressive; issue 24, 2026-12-06):

    T 1, lr 5e-4 (the former choice):                  O +0.44 / +0.89    P +0.44 / +1.11
    T 1, lr 5e-4, mixup 1:                             O +0.67 / +0.44    P +0.67 / +0.89
    T 1, lr 1e-3, mixup 1:                             O +0.67 / +0.22
    T 1, lr 2e-4, mixup 1:                             O +0.89 / +0.67
    T 4, lr 5e-4:                                      O +0.22 / +0.44    P +0.22 / +0.67
    T 4, lr 1e-3 (chosen):                             O +0.22 / +0.44    P +0.00 / +0.44
    T 4, lr 1e-3, mixup 1:                             O +0.67 / +0.44    P +0.44 / +0.44
    T 4, lr 1e-3, mixup 1, 100 epochs in all:          O +0.67 / +0.44    P +0.67 / +0.44
    T 4, lr 1e-3, --segments:                                             P +0.22 / +0.44
    T 4, lr 1e-3, method projection:                                      P +0.22 / +0.44

Seed 4 lost 2 images (96.44% -> 96.00%) in every setting with T 4. Seed 5, run once after the choice: O +0.89,
P +0.89 (98.00% -> 97.11%). Earlier, with T 1 and lr 1e-4: one step
(seeds 0-2, as issue 24 found it) +0.67 / +1.11 / +0.67; 0.5 -> 0.25 10 epochs apart (seeds 3-5) +0.67 / +1.78 / +1.33.

Run (25%, both schedules side by side): OMP_NUM_THREADS=1 .venv/bin/python benchmarks/digits_compression.py
--param-budget 0.5 0.4 0.32 0.25 --step-epochs 5 --finetune-lr 1e-3 --temperature 4   (6 fits, about 10 minutes)

Goal: at least 50% fewer parameters in the factorized layers, at most 0.3 percentage points lower top-1
after fine-tuning on every seed. The validation set has 450 images, so one image is 0.22 points.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/digits_compression.py --param-budget 0.5   (about 2-4
minutes on two busy CPU cores; --seeds 3 4 5 for the selection runs). Every run is seeded (``L.seed_everything``)
and deterministic (``Trainer(deterministic=True)``, one thread).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from digits import DigitsDataModule, DigitsViT, is_factorized, warmup_cosine  # noqa: E402

import lightning_rank as lr  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
GOAL_SAVED, GOAL_DROP = 0.5, 0.3  # fraction of the factorized layers' parameters saved; top-1 points lost


class DistilledViT(DigitsViT):
    """``DigitsViT`` whose fine-tuning after the swap matches the dense model's predictions (knowledge
    distillation, ``KL(dense || compressed)`` on the training images) instead of the labels: compression
    should keep the dense function, and the labels of 1,347 training images, seen for 30 epochs already,
    pull a fine-tuned model towards them again. The teacher is the frozen dense copy that
    ``RankCompression(distill=1.0)`` keeps from before its first swap; the one line is ``lr.distillation_loss``.

    ``mixup``: once the teacher exists, each training batch is mixed with a shuffled copy of itself (weights
    drawn from ``Beta(mixup, mixup)``), so the student matches the teacher between the training images too.
    ``swap_epochs``: with ``segments``, the fine-tuning rate decays (cosine) to 0 at the next swap, not at the end.
    """

    def __init__(self, *args, mixup: float = 0.0, swap_epochs: tuple[int, ...] = (), segments: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mixup, self.swap_epochs, self.segments = mixup, swap_epochs, segments

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        if self.mixup and any(getattr(c, "teacher", None) is not None for c in self.trainer.callbacks):
            weight = torch.distributions.Beta(self.mixup, self.mixup).sample((len(images), 1, 1, 1))
            images = weight * images + (1 - weight) * images[torch.randperm(len(images))]
            batch = (images, labels)
        logits = self(images)
        loss = lr.distillation_loss(self, batch, logits, F.cross_entropy(logits, labels))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        config = super().configure_optimizers()
        later = [e for e in self.swap_epochs if e > self.trainer.current_epoch]
        if self.segments and is_factorized(self) and later:
            steps = (later[0] - self.trainer.current_epoch) * self.trainer.num_training_batches
            config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(
                config["optimizer"], warmup_cosine(steps, warmup=0))
        return config


def run(seed: int, budgets: list[float], finetune_epochs: int, args: argparse.Namespace) -> dict:
    """Train, compress by ``budgets`` (one step, or one step per budget ``--step-epochs`` apart) and fine-tune one
    model for ``finetune_epochs`` after the last step; the row of the table, from its ``compression.json``."""
    L.seed_everything(seed, verbose=False)
    steps = len(budgets)
    swap_epochs = [args.epochs + i * args.step_epochs for i in range(steps)]
    compression = lr.RankCompression(
        param_budget=budgets if steps > 1 else budgets[0],
        method=args.method,
        compress_at_epoch=swap_epochs if steps > 1 else args.epochs,
        monitor="val_acc",
        exclude_modules=["embed", "head"],
        distill=args.distill if args.finetune == "distill" else None,
        temperature=args.temperature,
    )
    root = args.out / f"{'-'.join(map(str, budgets))}_seed_{seed}"
    trainer = L.Trainer(
        max_epochs=swap_epochs[-1] + finetune_epochs,
        accelerator="cpu",
        default_root_dir=root,
        logger=False,
        callbacks=[compression],
        deterministic=True,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = DistilledViT(dim=args.dim, finetune_lr=args.finetune_lr, dense_epochs=args.epochs, mixup=args.mixup,
                         swap_epochs=tuple(swap_epochs), segments=args.segments)
    trainer.fit(model, DigitsDataModule())
    summary = json.loads((root / "rank_reports" / "compression.json").read_text())
    first = summary.get("steps", [summary])[0]
    before, compressed, finetuned = (100 * summary["metrics"][k] for k in ("before", "compressed", "finetuned"))
    return {"seed": seed, "budgets": budgets, "params_before": first["layer_params_before"],  # the blocks' layers
            "params_after": summary["layer_params_after"], "before": before, "compressed": compressed,
            "finetuned": finetuned, "drop": before - finetuned}


def validation_images() -> int:
    data = DigitsDataModule()
    data.setup()
    return len(data.val_set)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="training epochs before compression")
    parser.add_argument("--finetune-epochs", type=int, default=20, help="epochs after the last step")
    parser.add_argument("--finetune-lr", type=float, default=1e-4,
                        help="peak fine-tuning rate after each swap (cosine decay to 0 at the end of the fit)")
    parser.add_argument("--dim", type=int, default=64, help="width of the ViT")
    parser.add_argument("--finetune", default="distill", choices=["distill", "labels"],
                        help="fine-tune towards the dense model's predictions, or on the labels")
    parser.add_argument("--param-budget", type=float, nargs="+", default=[0.5],
                        help="one budget, or several for progressive steps (each a fraction of the original blocks)")
    parser.add_argument("--step-epochs", type=int, default=10,
                        help="fine-tuning epochs between two progressive steps (--finetune-epochs follow the last)")
    parser.add_argument("--no-one-step", action="store_true",
                        help="with several budgets, skip the one-step run beside them (same epochs in all)")
    parser.add_argument("--method", default="whiten", choices=["whiten", "projection", "svd"])
    parser.add_argument("--distill", type=float, default=1.0, help="weight of the distillation loss (--finetune distill)")
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    parser.add_argument("--mixup", type=float, default=0.0, help="Beta(a, a) mixup of the images while distilling (0: off)")
    parser.add_argument("--segments", action="store_true", help="the fine-tuning rate decays to 0 at each next swap")
    parser.add_argument("--out", type=Path, default=Path("runs/digits_compression"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    budgets, extra = args.param_budget, (len(args.param_budget) - 1) * args.step_epochs
    schedules = [(budgets, args.finetune_epochs)]  # one step beside several: the same epochs in all
    if len(budgets) > 1 and not args.no_one_step:
        schedules.insert(0, ([budgets[-1]], args.finetune_epochs + extra))
    start = time.perf_counter()
    rows = [run(seed, b, e, args) for seed in args.seeds for b, e in schedules]
    seconds = time.perf_counter() - start

    def name(b: list[float]) -> str:
        return " -> ".join(map(str, b)) if len(b) > 1 else f"one step {b[0]}"

    print(f"\nDigitsViT (dim {args.dim}) on digits, RankCompression(method={args.method!r}), {args.epochs} dense epochs, "
          f"{args.epochs + extra + args.finetune_epochs} in all; steps {args.step_epochs} epochs apart; fine-tuning on "
          f"{args.finetune} (weight {args.distill:g}, T {args.temperature:g}, mixup {args.mixup:g}), lr {args.finetune_lr:g}"
          f"{' decaying at each swap' if args.segments else ''}; top-1 on {validation_images()} validation images\n")
    print("| seed | top-1 before | " + " | ".join(f"{name(b)}: params kept, compressed -> fine-tuned, drop (points)"
                                               for b, _ in schedules) + " |")
    print("|---:|---:|" + "---:|" * len(schedules))
    for seed in args.seeds:
        mine = [r for r in rows if r["seed"] == seed]
        cells = [f"{r['params_after']:,} of {r['params_before']:,}, {r['compressed']:.2f}% -> {r['finetuned']:.2f}%, "
                 f"**{r['drop']:+.2f}**" for r in mine]
        print(f"| {seed} | {mine[0]['before']:.2f}% | " + " | ".join(cells) + " |")
    verdicts = []
    for b, _ in schedules:
        mine = [r for r in rows if r["budgets"] == b]
        worst, mean = max(r["drop"] for r in mine), statistics.mean(r["drop"] for r in mine)
        saved = min(1 - r["params_after"] / r["params_before"] for r in mine)
        goal_saved = max(GOAL_SAVED, 1 - b[-1])
        met = worst <= GOAL_DROP and saved >= goal_saved
        verdicts.append(f"{name(b)}: least saved {saved:.1%} (goal {goal_saved:.0%}), drop mean {mean:+.2f}, worst "
                        f"{worst:+.2f} (goal <= {GOAL_DROP}): {'met' if met else 'not met'}")
    print("\nGoal: " + "; ".join(verdicts) + ".")
    print(f"Wall time {seconds / 60:.1f} min; compression.json of each run under {args.out}")
    return rows


if __name__ == "__main__":
    main()
