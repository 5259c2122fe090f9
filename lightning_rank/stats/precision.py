"""Full float32 matmul precision for the package's own products, whatever the user set.

``torch.set_float32_matmul_precision("high")`` or ``"medium"`` (common in Lightning scripts) lets float32
matmuls run in TF32 or bf16: on GPUs, and on CPUs whose oneDNN supports it (bf16 there gives relative
errors of about 3e-4 instead of 3e-7). A Gram matrix or output moment computed so would change the
ranks silently. :func:`full_precision_matmul` sets full precision around such products only and puts the
user's setting back, so the user's own forward keeps the speed they asked for. :func:`symmetric_gram_update_` is
the package's main product, the Gram update of the statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

_FULL = "ieee"  # the per-backend API's name of full precision ("highest" in the legacy one)


def _backends() -> list:
    """The per-backend matmul precision settings of this torch (``fp32_precision``, torch >= 2.9)."""
    found = []
    for backend in ("mkldnn", "cuda"):
        matmul = getattr(getattr(torch.backends, backend, None), "matmul", None)
        if matmul is not None and hasattr(matmul, "fp32_precision"):
            found.append(matmul)
    return found


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Run float32 matmuls inside at full precision, restoring the user's setting on exit (a no-op when it is
    already full). Uses whichever API the user's setting was made with: the legacy
    ``torch.set_float32_matmul_precision`` or, when that cannot be read, the per-backend ``fp32_precision``."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the user mixed the legacy and the per-backend API: torch refuses to read the legacy one
        legacy = None
    if legacy == "highest":
        yield
        return
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy)
        return
    saved = [(matmul, matmul.fp32_precision) for matmul in _backends()]
    for matmul, _ in saved:
        matmul.fp32_precision = _FULL
    try:
        yield
    finally:
        for matmul, value in saved:
            matmul.fp32_precision = value


def symmetric_gram_update_(gram: Tensor, rows: Tensor, block: int | None = None, alpha: float = 1.0) -> None:
    """``gram += alpha * rows^T rows`` on the upper block triangle only, one GEMM per block row.

    Blocks of 128-256 columns keep every GEMM large enough to run at full speed while skipping
    about half of the products; below two blocks a plain ``addmm_`` is used.
    """
    dim = rows.shape[1]
    block = block or (128 if dim <= 1024 else 256)
    if dim < 2 * block:
        gram.addmm_(rows.t(), rows, alpha=alpha)
        return
    for start in range(0, dim, block):
        stop = min(start + block, dim)
        gram[start:stop, start:].addmm_(rows[:, start:stop].t(), rows[:, start:], alpha=alpha)
