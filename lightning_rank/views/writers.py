"""Writers of the TensorBoard views: scalars and images with their descriptions, the layout, figures, tables.

Each takes a ``SummaryWriter`` (e.g. ``TensorBoardLogger.experiment``) and plain data, and knows nothing of
Lightning. Every scalar, histogram and image carries its description (summary metadata); the legacy
Scalars, Images and Histograms tabs show it under the card's info icon.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor

from lightning_rank.spectral.report import RankReport
from lightning_rank.views import drawing
from lightning_rank.views.figures import energy_image, heatmap_image
from lightning_rank.views.tables import compression_markdown
from lightning_rank.views.tags import (
    COMPRESSION_TEXT_TAG,
    ENERGY_PREFIX,
    HEATMAP_TAG,
    REPORT_TEXT_TAG,
    SPECTRUM_PREFIX,
    compression_scalars,
    describe,
    group_layers,
    layer_group,
    utilization_layout,
)


def _write(writer: Any, value: Summary.Value, step: int) -> None:
    writer._get_file_writer().add_summary(Summary(value=[value]), step)

def write_scalars(writer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Write ``metrics`` as scalars with their descriptions.

    In TensorBoard's tensor form: its data server drops the description of the older ``simple_value`` form
    that ``SummaryWriter.add_scalar`` writes.
    """
    from tensorboard.plugins.scalar.summary_v2 import scalar_pb

    for tag, value in metrics.items():
        (proto,) = scalar_pb(tag, float(value), description=describe(tag)).value
        _write(writer, proto, step)

def write_image(writer: Any, tag: str, image: np.ndarray | Image.Image, step: int) -> None:
    """Write an image (Pillow, or an RGB ``(H, W, 3)`` uint8 array) with its description, as the tensor
    ``[width, height, png]`` TensorBoard's image plugin reads."""
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.image.metadata import create_summary_metadata

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    tensor = TensorProto(dtype="DT_STRING", tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=3)]),
                         string_val=[str(image.width).encode(), str(image.height).encode(), drawing.png_bytes(image)])
    metadata = create_summary_metadata(display_name=tag, description=describe(tag) or "")
    _write(writer, Summary.Value(tag=tag, metadata=metadata, tensor=tensor), step)

def write_layout(writer: Any, layers: Sequence[str]) -> None:
    """Write :func:`utilization_layout`; TensorBoard shows the latest layout a run wrote."""
    writer.add_custom_scalars(utilization_layout(layers))

def write_heatmap(writer: Any, history: Sequence[Mapping[str, Any]], step: int, tag: str = HEATMAP_TAG) -> bool:
    """Write :func:`heatmap_image`; ``False`` (nothing written) without history."""
    if not history:
        return False
    write_image(writer, tag, heatmap_image(history), step)
    return True

def write_spectra(writer: Any, spectra: Mapping[str, Tensor], step: int, buckets: int = 30) -> None:
    """One histogram per layer of ``log10`` of each nonzero eigenvalue's share of the trace of its input moment."""
    from tensorboard.plugins.histogram.summary_v2 import histogram_pb

    for name, eigenvalues in spectra.items():
        values = eigenvalues.detach().double().cpu()
        values = values[values > 0]
        if values.numel():
            tag = f"{SPECTRUM_PREFIX}/{name}"
            shares = (values / values.sum()).log10().numpy()
            (proto,) = histogram_pb(tag, shares, buckets=buckets, description=describe(tag)).value
            _write(writer, proto, step)

def write_energy_curves(
    writer: Any, spectra: Mapping[str, Tensor], threshold: float, step: int, epoch: int | None = None
) -> None:
    """One cumulative-energy image per block (:func:`layer_group`)."""
    when = f"epoch {epoch}" if epoch is not None else f"step {step}"
    for group, names in group_layers(list(spectra), layer_group).items():
        title = f"{group}: cumulative energy of each layer's input ({when})"
        image = energy_image({name: spectra[name] for name in names}, threshold, title=title)
        write_image(writer, f"{ENERGY_PREFIX}/{group}", image, step)

def write_report_text(writer: Any, report: RankReport, step: int, tag: str = REPORT_TEXT_TAG) -> None:
    """The report as a markdown table in TensorBoard's text tab."""
    writer.add_text(tag, report.to_markdown(), step)

def write_compression(writer: Any, summary: Mapping[str, Any], step: int, at: str = "end", epoch: int | None = None) -> None:
    """Write :func:`compression_scalars` (with descriptions) and :func:`compression_markdown` as text, ``at`` the
    swap (with the metric right after it) or the ``"end"`` of fit (after fine-tuning)."""
    write_scalars(writer, compression_scalars(summary, at), step)
    writer.add_text(COMPRESSION_TEXT_TAG, compression_markdown(summary, at, step=step, epoch=epoch), step)
    writer.flush()
