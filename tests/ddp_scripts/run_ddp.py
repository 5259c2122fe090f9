"""One ``strategy="ddp"`` run of a lightning_rank callback on CPU, for tests/test_ddp.py.

Lightning's DDP launcher re-executes this script (same arguments, ``LOCAL_RANK`` set) for every
process but the first, so it must be a file run as ``python run_ddp.py MODE OUT_DIR``. Each process
writes what it saw to ``OUT_DIR`` as JSON; the test compares them with a one-process reference.

- ``monitor``: fit one epoch with ``RankMonitor``; each rank gets a different subspace of the data.
- ``compression``: fit with ``RankCompression`` (compress after epoch 0, fine-tune one epoch).
- ``allocation``: the same with a parameter budget, shared out by the default allocation: each process probes its
  own validation batches; the dense weights, each process's calibration batches and its result are written.

Also, in every process, whether the process group was still alive when the interpreter began to exit
(``exit_rank{R}.json``), and on rank 0 the exit codes of the other processes (``exit_codes.json``).
"""

from __future__ import annotations

import atexit
import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

import lightning_rank as lr

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: its tests package
from tests.ddp_scripts.records import PlanRecord  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    Branchy,
    DumpReport,
    ParameterCheck,
    PlainClassifier,
    low_rank_dataset,
    make_trainer,
    split_subspaces,
)

# -- RankMonitor: each rank sees its own subspace ----------------------------------------------
MONITOR_SAMPLES = 32


# -- RankCompression ---------------------------------------------------------------------------


def compression(**options) -> lr.RankCompression:
    """The one place these DDP runs build RankCompression: one dense epoch, the swap, one fine-tuning epoch."""
    return lr.RankCompression(compress_at_epoch=1, monitor="val_acc", **options)


ALLOCATION_BUDGET, VALIDATION_SAMPLES, VALIDATION_BATCH = 0.3, 128, 32


def allocation_validation() -> torch.utils.data.TensorDataset:
    """The validation data of the ``allocation`` run (the DistributedSampler gives rank r the samples r, r + 2, ...)."""
    return low_rank_dataset(VALIDATION_SAMPLES, 2)


class AllocationRecord(Callback):
    """What the test needs to allocate again in one process: on rank 0 the dense weights the plan is made from
    (``dense.pt``, at the validation that counts the statistics), on every process the validation batches it saw
    then (``calibration_rank{R}.pt``), and at the end its ``FactorizationResult`` (``result_rank{R}.json``)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.batches: list = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == 0 and not trainer.sanity_checking:
            self.batches.append([t.clone() for t in batch])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0 and not trainer.sanity_checking:
            torch.save(self.batches, self.out / f"calibration_rank{trainer.global_rank}.pt")
            if trainer.global_rank == 0:
                torch.save(pl_module.state_dict(), self.out / "dense.pt")

    def on_train_end(self, trainer, pl_module) -> None:
        (compression,) = [c for c in trainer.callbacks if isinstance(c, lr.RankCompression)]
        result = compression.result.to_dict()
        (self.out / f"result_rank{trainer.global_rank}.json").write_text(json.dumps(result))


# -- every process -----------------------------------------------------------------------------
class ExitProbe(Callback):
    """Records, when this process starts to exit, whether the process group is still alive.

    Registered in the first ``setup`` of the run, so its ``atexit`` handler runs after any the
    callbacks registered later (``atexit`` runs handlers last-in, first-out).
    """

    def __init__(self, out: Path) -> None:
        self.out = out

    def setup(self, trainer, pl_module, stage) -> None:
        path = self.out / f"exit_rank{trainer.global_rank}.json"
        atexit.register(lambda: path.write_text(json.dumps({"initialized": torch.distributed.is_initialized()})))


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    # A short collective timeout turns a disagreement between the processes into an error, not a hang.
    strategy = DDPStrategy(timeout=timedelta(seconds=60), find_unused_parameters=mode == "monitor")
    options = dict(devices=2, strategy=strategy, logger=False, enable_checkpointing=False)
    if mode == "monitor":
        model = Branchy()
        monitor = lr.RankMonitor(dtype=torch.float64)
        trainer = make_trainer(out, 1, [ExitProbe(out), monitor, DumpReport(out)], **options)
        loader = DataLoader(split_subspaces(MONITOR_SAMPLES), batch_size=4)
        trainer.fit(model, loader, loader)
    elif mode == "compression":
        model, compressing = PlainClassifier(lr_=0.2), compression()
        record = PlanRecord(compressing)
        trainer = make_trainer(out, 2, [ExitProbe(out), record, compressing, ParameterCheck(out)], **options)
        trainer.fit(model, DataLoader(low_rank_dataset(256, 1), batch_size=32, shuffle=True),
                    DataLoader(low_rank_dataset(128, 2), batch_size=32))
        (out / f"plan_rank{trainer.global_rank}.json").write_text(json.dumps(record.written()))
    elif mode == "allocation":
        model, compressing = PlainClassifier(lr_=0.2), compression(param_budget=ALLOCATION_BUDGET)
        record = PlanRecord(compressing)
        callbacks = [ExitProbe(out), record, compressing, AllocationRecord(out), ParameterCheck(out)]
        trainer = make_trainer(out, 2, callbacks, **options)
        trainer.fit(model, DataLoader(low_rank_dataset(256, 1), batch_size=32, shuffle=True),
                    DataLoader(allocation_validation(), batch_size=VALIDATION_BATCH))
        (out / f"plan_rank{trainer.global_rank}.json").write_text(json.dumps(record.written()))
    else:
        raise SystemExit(f"unknown mode {mode!r}: use 'monitor', 'compression' or 'allocation'")
    if trainer.global_rank == 0:  # the launcher does not wait for the processes it started
        codes = [proc.wait(timeout=120) for proc in getattr(trainer.strategy.launcher, "procs", [])]
        (out / "exit_codes.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
