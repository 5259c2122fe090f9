"""A record both 2-process scripts keep of how ``RankCompression`` planned on every process."""

from __future__ import annotations

import contextlib

from lightning.pytorch.callbacks import Callback

import lightning_rank as lr


class PlanRecord(Callback):
    """What each process planned from (``RankCompression`` is given, and must come after this in the callbacks): the
    input keys whose sums it held while planning and their bytes, against the bytes every process counted
    (``plan_step`` is wrapped while fitting), and the factors of the plan about to be swapped in, read at the start of
    the swap epoch before ``RankCompression`` applies them.

    Also, per planning step: the low-rank pairs planned from sharded dense stand-ins (``stood_in``), the layers each
    gather of full weights for planning kept on this process (``kept``), and the candidates whose whitened basis this
    process held in memory (``bases``) against those it held as ``meta`` stand-ins (``stand_ins``)."""

    def __init__(self, compression: lr.RankCompression) -> None:
        self.compression, self.held, self.factors = compression, [], {}
        self._restore: list = []
        self._planning = False

    def setup(self, trainer, pl_module, stage) -> None:
        from lightning_rank.callbacks import compression as module
        from lightning_rank.callbacks import owners, steps
        from lightning_rank.compress import planning

        def recording(compression, trainer, pl_module, shared, batches):
            self.held.append({"keys": sorted(shared.stats.inputs), "sources": shared.sources, "counted": shared.nbytes,
                              "bytes": sum(s.nbytes for s in shared.stats.inputs.values()), "stood_in": [],
                              "kept": [], "bases": [], "stand_ins": []})
            self._planning = True
            try:
                return plan_step(compression, trainer, pl_module, shared, batches)
            finally:
                self._planning = False

        @contextlib.contextmanager
        def standing_in(model):
            with sharded_stand_ins(model) as pairs:
                self.held[-1]["stood_in"] = sorted(pairs)
                yield pairs

        def gathering(model, names, keep):  # the monitor's analysis gathers too, not recorded
            if self._planning:
                self.held[-1]["kept"].append(sorted(keep))
            return full_weights(model, names, keep)

        def making(name, layer, positions=1.0):
            made = candidate(name, layer, positions)
            self.held[-1]["stand_ins" if made.basis.is_meta else "bases"].append(name)
            return made

        plan_step, sharded_stand_ins = module.plan_step, steps.sharded_stand_ins
        full_weights, candidate = owners.full_weights, planning.candidate
        self._restore = [(module, "plan_step", plan_step), (steps, "sharded_stand_ins", sharded_stand_ins),
                         (owners, "full_weights", full_weights), (planning, "candidate", candidate)]
        module.plan_step, steps.sharded_stand_ins = recording, standing_in
        owners.full_weights, planning.candidate = gathering, making

    def teardown(self, trainer, pl_module, stage) -> None:
        for module, name, original in self._restore:
            setattr(module, name, original)
        self._restore = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        plan = self.compression._run.plan
        if plan is not None:
            self.factors = {name: {key: t.detach().double().flatten().tolist() for key, t in m.state_dict().items()}
                            for name, m in plan.modules.items()}

    def written(self) -> dict:
        return {"held": self.held, "factors": self.factors}
