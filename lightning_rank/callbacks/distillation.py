"""Distillation from the dense model: the teacher ``RankCompression(distill=...)`` keeps, and the loss that uses it.

Fine-tuning a compressed model towards the dense model's outputs holds accuracy better than fine-tuning on the
labels alone. With ``distill`` set, ``RankCompression`` keeps a frozen copy of the model as it was right before
the first swap (the teacher: no gradients, no optimizer state, eval mode; saved in the callback's checkpoint
state so a resumed fit distills from the same teacher), and one line in ``training_step`` uses it::

    loss = lr.distillation_loss(self, batch, logits, loss)

Cost: one more copy of the dense model's parameters and buffers on the model's device from the first swap to the
end of the fit, one teacher forward (no backward) per training batch, and the dense weights once more in each
checkpoint written after the swap.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lightning_rank.compress.layers import LOW_RANK_TYPES
from lightning_rank.stats.collect import ForwardFn, default_forward
from lightning_rank.targets import named_modules, set_submodule


def frozen_copy(pl_module: nn.Module, state_dict: dict[str, Tensor] | None = None) -> nn.Module:
    """A frozen copy of ``pl_module`` (eval mode, no gradients, not attached to the trainer); with ``state_dict``,
    its low-rank pairs become dense layers again and the dense weights are loaded (the teacher of a resumed fit)."""
    trainer = getattr(pl_module, "_trainer", None)
    memo: dict[int, Any] = {id(trainer): None} if trainer is not None else {}
    teacher = copy.deepcopy(pl_module, memo)
    if state_dict is not None:
        for name, module in named_modules(teacher):
            if isinstance(module, LOW_RANK_TYPES):
                set_submodule(teacher, name, module.to_dense())
        teacher.load_state_dict(state_dict)
    return teacher.eval().requires_grad_(False)


def teacher_output(teacher: nn.Module, batch: Any, forward: ForwardFn | None = None) -> Any:
    """The teacher's output on ``batch`` (``forward(model, batch)``, default as in :func:`~lightning_rank.collect`)."""
    with torch.no_grad():
        return (forward or default_forward)(teacher, batch)


def distillation_loss(pl_module: LightningModule, batch: Any, output: Tensor, loss: Tensor) -> Tensor:
    """``loss`` mixed with the distillation loss from the dense teacher kept by ``RankCompression(distill=w)``:
    ``(1 - w) * loss + w * T^2 * KL(softmax(teacher / T) || softmax(output / T))`` over the last dimension
    (``T``: its ``temperature``). Before the first swap, or without such a callback, ``loss`` itself.

    ``output`` is the model's output (logits) on ``batch``, the teacher's comes from the callback's ``forward``
    (default: as in :func:`~lightning_rank.collect`), so call it with the batch ``training_step`` got. In a
    LightningModule trained with ``RankCompression(distill=1.0)`` among its callbacks::

        def training_step(self, batch, batch_idx):
            images, labels = batch
            logits = self(images)
            return lr.distillation_loss(self, batch, logits, F.cross_entropy(logits, labels))

    Without such a callback (or before its first swap) it is ``loss`` itself:

    >>> import torch, lightning as L, lightning_rank as lr
    >>> loss = torch.tensor(2.3)
    >>> lr.distillation_loss(L.LightningModule(), (torch.zeros(2, 8),), torch.zeros(2, 10), loss) is loss
    True
    """
    trainer = getattr(pl_module, "_trainer", None)
    for callback in trainer.callbacks if trainer is not None else []:
        teacher = getattr(callback, "teacher", None)
        if teacher is not None and getattr(callback, "distill", None):
            target = teacher_output(teacher, batch, callback.forward)
            target = getattr(target, "logits", target)
            weight, temperature = callback.distill, callback.temperature
            kl = F.kl_div(F.log_softmax(output / temperature, dim=-1), F.log_softmax(target / temperature, dim=-1),
                          log_target=True, reduction="none").sum(-1).mean()
            return (1 - weight) * loss + weight * temperature**2 * kl
    return loss
