"""The state of ``RankCompression``'s steps: its phase, the steps done, and how they are saved and summarized.

A schedule is one step (``compress_at_epoch=c``) or several (``compress_at_epoch=[c1, c2, ...]`` with one
budget per step). Each step plans from fresh statistics of the model as it then is, swaps, and fine-tunes
until the next; ``steps`` keeps each finished step's record (:func:`~lightning_rank.callbacks.summary.step_record`),
``result``/``metrics``/``macs`` describe the current one. A plan is never saved: a checkpoint written while one
waits for its swap holds the state from before it, and the resumed fit plans again.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from torch import nn
from typing_extensions import override

from lightning_rank.callbacks.summary import schedule_summary, step_record
from lightning_rank.compress.results import FactorizationResult


class Phase(str, Enum):
    """Where a :class:`~lightning_rank.RankCompression` is in its current step: saved in its ``state_dict``."""

    TRAINING = "training"  # the dense model trains
    PLANNED = "planned"  # the plan is made; the swap happens when the next epoch starts
    COMPRESSED = "compressed"  # the low-rank layers are in place and fine-tune
    FINISHED = "finished"  # the fit ended after compression, or there was nothing to replace


class ScheduleState:
    """The steps' state of a compression callback (mixed into ``RankCompression``, which sets ``_run``, the
    ``monitor`` and the ``teacher``)."""

    def _init_schedule(self) -> None:
        self.phase = Phase.TRAINING
        self.swap_epochs: list[int] = []  # compress_at_epoch resolved against max_epochs in `setup`
        self.step = 0  # swaps done
        self.steps: list[dict[str, Any]] = []  # the steps before the current one (`step_record` each)
        self.result: FactorizationResult | None = None
        self.metrics: dict[str, float | None] = {"before": None, "compressed": None, "finetuned": None}
        self.macs: dict[str, float | None] = {"before": None, "after": None}
        self.failure: str | None = None  # why planning failed, the model training on as it was

    @property
    def compressed(self) -> bool:
        """Whether the low-rank layers are in place."""
        return self.phase in (Phase.COMPRESSED, Phase.FINISHED) and self.result is not None and bool(self.result.layers)

    @property
    def swap_epoch(self) -> int | None:
        """The epoch whose start swaps the next step in (the last step's once all are done), None before ``setup``."""
        return self.swap_epochs[min(self.step, len(self.swap_epochs) - 1)] if self.swap_epochs else None

    @property
    def _step_epoch(self) -> int | None:
        """The swap epoch of the current step: the last swapped, or the first one still to come."""
        return self.swap_epochs[self.step - 1] if self.step and self.phase != Phase.PLANNED else self.swap_epoch

    def _next_swap(self) -> int | None:
        """The swap epoch of the next step while one can still come, else None."""
        open_phase = self.phase in (Phase.TRAINING, Phase.COMPRESSED) and not self._run.disabled
        more = open_phase and self.failure is None and self.step < len(self.swap_epochs)
        return self.swap_epochs[self.step] if more else None

    def _archive_step(self) -> None:
        """Keep the current step's record, before the next step's plan replaces it."""
        self.steps.append(step_record(self._step_epoch, self.result.to_dict(), self.metrics, self.macs))
        self.metrics = {"before": self.metrics["finetuned"], "compressed": None, "finetuned": None}

    def _unplan(self) -> None:
        """Drop the plan not yet applied: back to the phase, step record and metrics before it was made."""
        self._run.plan, self.phase = None, Phase.COMPRESSED if self.step else Phase.TRAINING
        if self.step:
            last = self.steps.pop()
            self.result = FactorizationResult.from_dict(last["factorization"])
            self.metrics, self.macs = dict(last["metrics"]), dict(last["macs"])

    def summary(self) -> dict[str, Any]:
        """What ``compression.json`` holds (see :func:`~lightning_rank.callbacks.summary.schedule_summary`)."""
        if self.result is None and self.failure is None:
            raise RuntimeError("RankCompression has not planned a compression yet")
        factorization = self.result.to_dict() if self.result is not None else None
        current = step_record(self._step_epoch, factorization, self.metrics, self.macs)
        return schedule_summary([*self.steps, current], self.monitor, self.failure)

    @override
    def state_dict(self) -> dict[str, Any]:
        phase, steps, metrics, macs = self.phase, self.steps, self.metrics, self.macs
        done = phase in (Phase.COMPRESSED, Phase.FINISHED) and self.result is not None
        factorization = self.result.to_dict() if done else None
        if phase == Phase.PLANNED and self.step:  # the state from before the plan: it is made again on resume
            *steps, last = steps
            phase, factorization, metrics, macs = Phase.COMPRESSED, last["factorization"], last["metrics"], last["macs"]
        teacher = self.teacher.state_dict() if isinstance(self.teacher, nn.Module) else self.teacher
        return {"phase": phase.value, "swap_epoch": self.swap_epoch, "step": self.step, "steps": list(steps),
                "metrics": dict(metrics), "macs": dict(macs), "factorization": factorization, "failure": self.failure,
                "teacher": teacher}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        phase = Phase(state_dict["phase"])
        self.phase = Phase.TRAINING if phase == Phase.PLANNED else phase  # the first step's plan is made again
        self.step = state_dict.get("step", int(self.phase in (Phase.COMPRESSED, Phase.FINISHED)))
        self.steps = list(state_dict.get("steps", []))
        self.metrics.update(state_dict["metrics"])
        self.macs.update(state_dict["macs"])
        factorization = state_dict["factorization"] if self.phase != Phase.TRAINING else None
        self.result = FactorizationResult.from_dict(factorization) if factorization else None
        self.failure = state_dict.get("failure")
        self.teacher = state_dict.get("teacher")  # dense weights: the frozen copy is built in `on_fit_start`
