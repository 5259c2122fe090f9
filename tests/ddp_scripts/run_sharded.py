"""Two-process runs on CPU (gloo) of the callbacks on a model sharded with FSDP2, for tests/test_sharded.py.

``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` launches this script again for the second
process (like ``strategy="ddp"``), so it is a file run as ``python run_sharded.py MODE OUT_DIR``. Each process writes
what it saw to ``OUT_DIR`` as JSON; the test compares it with a one-process reference.

- ``monitor``: ``trainer.validate`` twice with ``RankMonitor``: counting every row in float64 (``exact``), then
  under the default row budget (``auto``), where each process's share holds more rows than the budget.
- ``compression``: ``RankCompression`` (default allocation: the probe on each process's validation batches) and
  ``RankMonitor`` in a fit of 3 epochs, the swap at epoch 1, a distributed checkpoint at every epoch; then a second
  fit to epoch 2 and a third resumed from its checkpoint of epoch 1 (after the swap).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

import lightning_rank as lr
from lightning_rank.callbacks import checkpoints
from lightning_rank.compress.probe import Probe, reshard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: its tests package
from tests.ddp_scripts.records import PlanRecord  # noqa: E402
from tests.tiny_models import make_trainer  # noqa: E402

WIDTH, HIDDEN, BLOCKS, TOKENS, SUBSPACE = 16, 48, 2, 64, 7
SAMPLES = 256  # 128 per process: 8192 rows a layer, twice the row budget of these widths


BUDGET, BATCH = 0.6, 32  # RankCompression's param_budget; validation batch size


def validation_data() -> TensorDataset:
    return token_data(128, seed=1)


def token_data(samples: int = SAMPLES, seed: int = 0) -> TensorDataset:
    """Token sequences whose features lie near a ``SUBSPACE``-dim subspace, with a class per sequence."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(SUBSPACE, WIDTH, generator=generator)
    x = torch.randn(samples, TOKENS, SUBSPACE, generator=generator) @ basis
    x = x + 0.01 * torch.randn(samples, TOKENS, WIDTH, generator=generator)
    return TensorDataset(x, torch.randint(0, 4, (samples,), generator=generator))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class ShardedBlocks(L.LightningModule):
    """Residual MLP blocks and a head, each block and the whole model sharded with ``fully_shard`` (FSDP2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, 4)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class BlocksOnly(ShardedBlocks):
    """``ShardedBlocks`` with ``fully_shard`` on each block and none on the whole model: several FSDP2 roots."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for block in self.blocks:
            fully_shard(block, mesh=self.device_mesh["data_parallel"])


class RootProjection(ShardedBlocks):
    """``ShardedBlocks`` with a projection before the head that only the root unit holds, every unit computing in
    bfloat16 over float32 master weights (FSDP2's mixed precision)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        for block in self.blocks:
            fully_shard(block, mesh=self.device_mesh["data_parallel"], mp_policy=policy)
        fully_shard(self, mesh=self.device_mesh["data_parallel"], mp_policy=policy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.proj(x).mean(dim=1)).float()


def root_unit_parameters(model: nn.Module) -> list[list]:
    """Each parameter the root FSDP2 unit manages: its name and whether its module is still in ``model``."""
    in_model = {id(module) for module in model.modules()}
    groups = model._get_fsdp_state()._fsdp_param_groups
    return [[p._module_info.param_name, id(p._module_info.module) in in_model] for g in groups for p in g.fsdp_params]


def strategy() -> ModelParallelStrategy:
    # A short collective timeout turns a disagreement between the processes into an error, not a hang.
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=60))


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    loader = DataLoader(token_data(), batch_size=32)
    if mode == "monitor":
        written = {}
        for name, monitor in (("exact", lr.RankMonitor(max_rows_per_batch=None, dtype=torch.float64)),
                              ("auto", lr.RankMonitor())):
            trainer = make_trainer(out / name, 1, [monitor], devices=2, strategy=strategy(), logger=False,
                                   enable_checkpointing=False)
            trainer.validate(ShardedBlocks(), loader)
            written[name] = {"report": monitor.report.to_dict(), "bytes": monitor.history[-1]["statistics_bytes"]}
        (out / f"monitor_rank{trainer.global_rank}.json").write_text(json.dumps(written))
    elif mode == "compression":
        written = {"full": fit_compressed(out / "full", 3), "first": fit_compressed(out / "resumed", 2)}
        written["resumed"] = fit_compressed(out / "resumed", 3, resume=out / "resumed" / "checkpoints" / "last.ckpt")
        (out / f"compression_rank{written['full']['rank']}.json").write_text(json.dumps(written))
    elif mode == "noroot":  # every block its own FSDP2 root: the swap re-initializes each root
        L.seed_everything(0, verbose=False)
        model, compression = BlocksOnly(), lr.RankCompression(compress_at_epoch=1, target_modules=r"blocks\..*",
                                                                 param_budget=BUDGET, monitor="val_loss")
        trainer = make_trainer(out, 2, [compression], devices=2, strategy=strategy(), logger=False,
                               enable_checkpointing=False)
        trainer.fit(model, DataLoader(token_data(), batch_size=32), DataLoader(validation_data(), batch_size=BATCH))
        blocks = {name: p.full_tensor().flatten().tolist() for name, p in model.blocks.named_parameters()}
        (out / f"noroot_rank{trainer.global_rank}.json").write_text(json.dumps(
            {"ranks": compression.result.layers, "blocks": blocks, "metrics": compression.metrics}))
    elif mode == "threshold":  # no budget, so no probe: the root, gathered by the last forward, must be resharded
        L.seed_everything(0, verbose=False)
        compression = lr.RankCompression(compress_at_epoch=1, ranks={"proj": 4}, monitor="val_loss")
        model = RootProjection()
        trainer = make_trainer(out, 2, [compression], devices=2, strategy=strategy(), logger=False,
                               enable_checkpointing=False)
        trainer.fit(model, DataLoader(token_data(), batch_size=32), DataLoader(validation_data(), batch_size=BATCH))
        model.reshard()  # the master weights (the last forward left the root's gathered in bfloat16)
        (out / f"threshold_rank{trainer.global_rank}.json").write_text(json.dumps({
            "ranks": compression.result.layers, "root": root_unit_parameters(model),
            "dtypes": {name: str(p.dtype) for name, p in model.named_parameters()}}))
    elif mode == "progressive":  # two steps: the second re-plans the low-rank pairs, from sharded dense stand-ins
        L.seed_everything(0, verbose=False)
        compression = lr.RankCompression(compress_at_epoch=[1, 2], param_budget=[0.7, 0.45], monitor="val_loss")
        record, model = PlanRecord(compression), RootProjection()
        trainer = make_trainer(out, 3, [record, compression], devices=2, strategy=strategy(), logger=False,
                               enable_checkpointing=False)
        trainer.fit(model, DataLoader(token_data(), batch_size=32), DataLoader(validation_data(), batch_size=BATCH))
        summary = compression.summary()
        reshard(model)  # the master weights (the last forward left the root's gathered in bfloat16)
        (out / f"progressive_rank{trainer.global_rank}.json").write_text(json.dumps({
            "ranks": [step["layers"] for step in summary["steps"]], "failure": compression.failure,
            "parameters": {name: p.full_tensor().flatten().tolist() for name, p in model.named_parameters()},
            "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "policies": sorted({str(m._get_fsdp_state()._mp_policy.param_dtype) for m in model.modules()
                                if isinstance(m, FSDPModule)}),
            "held": record.held,
        }))
    elif mode == "failing":  # step 2's probe raises inside a block's forward: that step fails, training goes on
        L.seed_everything(0, verbose=False)
        compression = lr.RankCompression(compress_at_epoch=[1, 2], param_budget=[0.7, 0.45], monitor="val_loss")
        model, seen, calls = RootProjection(), {}, []

        def failing(probe, *args, **kwargs):
            def fail(module, args):
                raise RuntimeError("a forward that fails")
            calls.append(1)
            if len(calls) == 1:
                return weighted_damage(probe, *args, **kwargs)
            handle = model.blocks[1].register_forward_pre_hook(fail)
            try:
                return weighted_damage(probe, *args, **kwargs)
            finally:
                handle.remove()

        class Head(L.Callback):  # the root unit's own parameters, in full, when each epoch starts
            def on_train_epoch_start(self, trainer, pl_module):
                bias = pl_module.head.bias
                seen[trainer.current_epoch] = (bias.full_tensor() if isinstance(bias, DTensor) else bias).tolist()

        weighted_damage, Probe.weighted_damage = Probe.weighted_damage, failing
        trainer = make_trainer(out, 4, [compression, Head()], devices=2, strategy=strategy(), logger=False,
                               enable_checkpointing=False)
        trainer.fit(model, DataLoader(token_data(), batch_size=32), DataLoader(validation_data(), batch_size=BATCH))
        reshard(model)
        (out / f"failing_rank{trainer.global_rank}.json").write_text(json.dumps({
            "failure": compression.failure, "ranks": compression.result.layers if compression.result else None,
            "head": seen, "parameters": {name: p.full_tensor().flatten().tolist() for name, p in model.named_parameters()},
        }))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def fit_compressed(root: Path, epochs: int, resume: Path | None = None) -> dict:
    """Fit ``ShardedBlocks`` with ``RankCompression`` to ``epochs`` epochs; what this process then holds."""
    L.seed_everything(0, verbose=False)
    compression = lr.RankCompression(compress_at_epoch=1, param_budget=BUDGET, monitor="val_loss", dtype=torch.float64,
                                     max_rows_per_batch=None)
    monitor, record = lr.RankMonitor(), PlanRecord(compression)
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer(root, epochs, [record, compression, monitor, checkpoint], devices=2, strategy=strategy(),
                           logger=False)
    model = ShardedBlocks()
    gathered: list[list[str]] = []  # the layers each gather of a resume's rebuild kept at once
    original = checkpoints.full_weights
    checkpoints.full_weights = lambda model, names, keep: gathered.append(list(keep)) or original(model, names, keep)
    try:
        trainer.fit(model, DataLoader(token_data(), batch_size=32), DataLoader(validation_data(), batch_size=BATCH),
                    ckpt_path=resume)
    finally:
        checkpoints.full_weights = original
    full = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().double()
            for name, p in model.named_parameters()}
    return {
        "rank": trainer.global_rank,
        "types": {name: type(module).__name__ for name, module in model.named_modules() if name.count(".") == 2},
        "sharded": sorted(name for name, p in model.named_parameters() if isinstance(p, DTensor)),
        "parameters": {name: t.flatten().tolist() for name, t in full.items()},
        "local": {name: list(p.to_local().shape) for name, p in model.named_parameters() if isinstance(p, DTensor)},
        "ranks": compression.result.layers if compression.result else None,
        "metrics": compression.metrics,
        "reports": [entry["report"]["mlu"] for entry in monitor.history],
        "factorized": [entry["factorized"] for entry in monitor.history],
        "allocation": compression.result.allocation if compression.result else None,
        "plan": record.written(),
        "gathered": gathered,
    }


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
