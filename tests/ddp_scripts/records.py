"""A record both 2-process scripts keep of how ``RankCompression`` planned on every process."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

import lightning_rank as lr


class PlanRecord(Callback):
    """What each process planned from (``RankCompression`` is given, and must come after this in the callbacks): the
    input keys whose sums it held while planning and their bytes, against the bytes every process counted
    (``plan_step`` is wrapped while fitting), and the factors of the plan about to be swapped in, read at the start of
    the swap epoch before ``RankCompression`` applies them."""

    def __init__(self, compression: lr.RankCompression) -> None:
        self.compression, self.held, self.factors = compression, [], {}
        self._original = None

    def setup(self, trainer, pl_module, stage) -> None:
        from lightning_rank.callbacks import compression as module

        self._original = original = module.plan_step

        def recording(compression, trainer, pl_module, shared, batches):
            self.held.append({"keys": sorted(shared.stats.inputs), "sources": shared.sources, "counted": shared.nbytes,
                              "bytes": sum(s.nbytes for s in shared.stats.inputs.values())})
            return original(compression, trainer, pl_module, shared, batches)

        module.plan_step = recording

    def teardown(self, trainer, pl_module, stage) -> None:
        from lightning_rank.callbacks import compression as module

        module.plan_step = self._original

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        plan = self.compression._run.plan
        if plan is not None:
            self.factors = {name: {key: t.detach().double().flatten().tolist() for key, t in m.state_dict().items()}
                            for name, m in plan.modules.items()}

    def written(self) -> dict:
        return {"held": self.held, "factors": self.factors}

