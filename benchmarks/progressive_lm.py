"""Progressive against one-step compression of the char LM of ``benchmarks/allocation_models.py`` at 25%.

The character-level transformer (pre-norm, separate q/k/v, causal attention; dim 96, 3 blocks) is trained on
Python's documentation topics for ``--dense-epochs`` epochs of ``--epoch-steps`` steps; ``lr.RankCompression``
then keeps 25% of the blocks' linear layers (the embedding and the head stay dense) inside the same
``trainer.fit`` of ``--dense-epochs + --finetune-epochs`` epochs, either in one step when the fine-tuning
starts, or in steps (``--schedule``, e.g. 0.5 then 0.25, one fine-tuning epoch apart). Both runs train the same
number of steps on the same batches. Statistics and the metric come from 256 training windows held out of
training; perplexity is measured on the last 10% of the text. Fine-tuning: AdamW, cosine decay from
``--finetune-lr`` over the remaining steps, on the labels (``--finetune labels``) or distilled from the dense
model (``--finetune distill``: ``RankCompression(distill=1.0)`` and one line in ``training_step``).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/progressive_lm.py --seeds 0 1 2   (one thread; about 16 minutes
on two busy CPU cores for the 6 runs). Seeded and deterministic (``deterministic=True``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from digits import warmup_cosine  # noqa: E402

import lightning_rank as lr  # noqa: E402
from benchmarks.allocation_models import CharLM, char_windows  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class CompressibleLM(CharLM):
    """:class:`CharLM` that logs ``val_loss`` and, once compressed, fine-tunes with a fresh cosine schedule over
    the remaining steps (rebuilt at every step), on the labels or distilled from the dense model."""

    def __init__(self, vocab: int, finetune_lr: float = 1e-3, dense_steps: int = 0, **kwargs) -> None:
        super().__init__(vocab, **kwargs)
        self.finetune_lr, self.dense_steps = finetune_lr, dense_steps

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        return lr.distillation_loss(self, batch, logits, F.cross_entropy(logits.flatten(0, 1), y.flatten()))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x).flatten(0, 1), y.flatten()))

    def configure_optimizers(self):
        compressed = any(isinstance(m, lr.LowRankLinear) for m in self.modules())
        if compressed:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.finetune_lr, weight_decay=0.05)
            steps = int(self.trainer.estimated_stepping_batches) - self.trainer.global_step
            schedule = warmup_cosine(steps, 0)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
            schedule = warmup_cosine(self.dense_steps, self.dense_steps // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def data(seed: int, steps: int, context: int = 64, batch: int = 32):
    """Training windows (``steps`` batches), the 256 held-out training windows, the test windows, the vocabulary."""
    train_x, train_y, test_x, test_y, chars = char_windows(context)
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    held, train = pick[-256:], pick[:-256][: steps * batch]
    return (TensorDataset(train_x[train], train_y[train]), TensorDataset(train_x[held], train_y[held]),
            TensorDataset(test_x[:640], test_y[:640]), len(chars))


@torch.no_grad()
def perplexity(model: torch.nn.Module, test: TensorDataset) -> float:
    training, _ = model.training, model.eval()
    x, y = test.tensors
    nll = sum(float(F.cross_entropy(model(x[i:i + 128]).flatten(0, 1), y[i:i + 128].flatten(), reduction="sum"))
              for i in range(0, len(x), 128))
    model.train(training)
    return math.exp(nll / y.numel())


class DensePerplexity(L.Callback):
    """The test perplexity of the dense model when epoch ``epoch`` starts, before ``RankCompression`` (next in the
    callback list) swaps the first step in."""

    def __init__(self, epoch: int, test: TensorDataset) -> None:
        self.epoch, self.test, self.value = epoch, test, float("nan")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.value = perplexity(pl_module, self.test)


def run(seed: int, budgets: list[float], args: argparse.Namespace) -> dict:
    """Train, compress by ``budgets`` (one or several steps) and fine-tune; perplexities and the counts."""
    train, held, test, vocab = data(seed, args.epoch_steps * args.dense_epochs)
    L.seed_everything(seed, verbose=False)
    model = CompressibleLM(vocab, finetune_lr=args.finetune_lr, dense_steps=args.epoch_steps * args.dense_epochs)
    epochs = [args.dense_epochs + i for i in range(len(budgets))]
    compression = lr.RankCompression(
        compress_at_epoch=epochs if len(budgets) > 1 else epochs[0],
        param_budget=budgets if len(budgets) > 1 else budgets[0],
        exclude_modules=["head"], distill=1.0 if args.finetune == "distill" else None,
    )
    out = args.out / f"{'-'.join(map(str, budgets))}_seed_{seed}"
    dense = DensePerplexity(args.dense_epochs, test)
    trainer = L.Trainer(max_epochs=args.dense_epochs + args.finetune_epochs, accelerator="cpu", logger=False,
                        callbacks=[dense, compression], deterministic=True, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out, limit_train_batches=args.epoch_steps)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(held, batch_size=64))
    summary = json.loads((out / "rank_reports" / "compression.json").read_text())
    first = summary.get("steps", [summary])[0]
    return {"seed": seed, "budgets": budgets, "val_loss": summary["metrics"], "dense_ppl": dense.value, "ppl": perplexity(model, test),
            "blocks_before": first["layer_params_before"], "blocks_after": summary["layer_params_after"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dense-epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=3, help="epochs from the first step to the end")
    parser.add_argument("--epoch-steps", type=int, default=100)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--finetune", default="labels", choices=["labels", "distill"])
    parser.add_argument("--schedule", type=float, nargs="+", default=[0.5, 0.25], help="budgets of the steps")
    parser.add_argument("--out", type=Path, default=Path("runs/progressive_lm"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [run(seed, budgets, args) for seed in args.seeds for budgets in ([args.schedule[-1]], args.schedule)]
    print(f"\nchar LM (dim 96, 3 blocks), {args.dense_epochs} x {args.epoch_steps} dense steps, then "
          f"{args.finetune_epochs} x {args.epoch_steps} steps from the first compression step; fine-tuning on "
          f"{args.finetune}, lr {args.finetune_lr:g}; test perplexity\n")
    print("| seed | schedule (fraction of the blocks) | blocks' params before -> after | val loss before | "
          "compressed | fine-tuned | test perplexity dense -> fine-tuned |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["val_loss"]
        print(f"| {r['seed']} | {' -> '.join(map(str, r['budgets']))} | {r['blocks_before']:,} -> {r['blocks_after']:,} "
              f"| {m['before']:.4f} | {m['compressed']:.4f} | {m['finetuned']:.4f} | {r['dense_ppl']:.3f} -> {r['ppl']:.3f} |")
    for budgets in ([args.schedule[-1]], args.schedule):
        ppl = [r["ppl"] for r in rows if r["budgets"] == budgets]
        dense = [r["dense_ppl"] for r in rows if r["budgets"] == budgets]
        print(f"| mean of {len(ppl)} | {' -> '.join(map(str, budgets))} | | | | | "
              f"{sum(dense) / len(dense):.3f} -> {sum(ppl) / len(ppl):.3f} |")
    print(f"Wall time {(time.perf_counter() - start) / 60:.1f} min")
    return rows


if __name__ == "__main__":
    main()
