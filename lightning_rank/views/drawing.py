"""Labelled images drawn with Pillow in milliseconds: the utilization heatmap and cumulative-energy curves.

matplotlib spends 0.1-0.3 s on one such figure, nearly all of it laying out text, which on a small model
costs more than the validation epoch the figure describes. These images carry the same labels (layer
names, epochs, a colour bar, axes with ticks, a legend) and are drawn directly: the heatmap's cells as one
numpy array, curves as polylines, text with Pillow's bundled font. Pillow is a dependency of TensorBoard,
so the figures need nothing else. Colours are matplotlib's viridis, tab10 and tab20.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# viridis at 17 evenly spaced points (interpolated linearly: within 6/255 of matplotlib's table).
_VIRIDIS = np.array([
    (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141), (44, 114, 142),
    (38, 130, 142), (33, 145, 140), (31, 160, 136), (40, 174, 128), (63, 188, 115), (94, 201, 98),
    (132, 212, 75), (173, 220, 48), (216, 226, 25), (253, 231, 37),
], dtype=np.float64)
MISSING = (208, 208, 208)  # a layer skipped or absent that epoch
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
TAB20 = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd", "#c5b0d5",
         "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5"]
#: Dash patterns (on, off pixels) of the line styles that follow solid once the palette's colours are used up.
DASHES: list[tuple[int, ...] | None] = [None, (8, 4), (2, 3), (8, 3, 2, 3)]
BLACK, WHITE, GRID, RED = (0, 0, 0), (255, 255, 255), (226, 226, 226), (214, 39, 40)


def viridis(values: np.ndarray) -> np.ndarray:
    """RGB uint8 colours of ``values`` in [0, 1] (clipped) on viridis; NaN gets :data:`MISSING`."""
    values = np.asarray(values, dtype=np.float64)
    position = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.minimum(position.astype(np.int64), len(_VIRIDIS) - 2)
    weight = (position - low)[..., None]
    rgb = _VIRIDIS[low] * (1 - weight) + _VIRIDIS[low + 1] * weight
    rgb[np.isnan(values)] = MISSING
    return np.rint(rgb).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at ``size`` pixels (Pillow >= 10.1, built with FreeType)."""
    return ImageFont.load_default(size=size)


def text_width(text: str, size: int) -> int:
    return math.ceil(font(size).getlength(text))


@functools.lru_cache(maxsize=4096)
def _glyphs(text: str, size: int, anchor: str, vertical: bool) -> tuple[Image.Image, int, int]:
    """``text`` rendered once as a coverage mask, with its offset from the anchor point (labels repeat across
    images and epochs, so each is rasterized once)."""
    left, top, right, bottom = font(size).getbbox(text, anchor=anchor)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font(size), anchor=anchor)
    if vertical:  # a quarter turn counter-clockwise about the anchor: (dx, dy) -> (dy, -dx)
        return mask.transpose(Image.Transpose.ROTATE_90), top, -right
    return mask, left, top


def _text(image: Image.Image, xy: tuple[float, float], text: str, size: int, fill=BLACK, anchor: str = "la",
          bold: bool = False, vertical: bool = False) -> None:
    """``text`` at ``xy`` by Pillow's ``anchor`` convention; ``vertical`` reads bottom to top."""
    if not text:
        return
    mask, dx, dy = _glyphs(text, size, anchor, vertical)
    x, y = round(xy[0]) + dx, round(xy[1]) + dy
    image.paste(fill, (x, y, x + mask.width, y + mask.height), mask)
    if bold:  # the bundled font has no bold face: a second copy one pixel to the left thickens the strokes
        image.paste(fill, (x - 1, y, x - 1 + mask.width, y + mask.height), mask)


def _dashed(points: Sequence[tuple[float, float]], pattern: tuple[int, ...]) -> Iterator[list[tuple[float, float]]]:
    """The pieces of the polyline ``points`` that a dash ``pattern`` (on, off, ... pixels) draws."""
    index, left, on = 0, pattern[0], True
    piece = [points[0]]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        done = 0.0
        while length - done > left:
            done += left
            point = (x0 + (x1 - x0) * done / length, y0 + (y1 - y0) * done / length)
            if on:
                yield [*piece, point]
            piece = [point]
            index = (index + 1) % len(pattern)
            left, on = pattern[index], not on
        left -= length - done
        piece.append((x1, y1))
    if on and len(piece) > 1:
        yield piece


def polyline(draw: ImageDraw.ImageDraw, points: Sequence[tuple[float, float]], fill, width: int = 2,
             dash: tuple[int, ...] | None = None) -> None:
    """A solid or dashed polyline."""
    for piece in [list(points)] if dash is None else _dashed(points, dash):
        draw.line(piece, fill=fill, width=width)


def _hex(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def curve_styles(count: int) -> list[tuple[tuple[int, int, int], tuple[int, ...] | None]]:
    """(colour, dash) of ``count`` curves: tab10's colours up to 10 curves, tab20's up to 20, then dashed repeats."""
    palette = [_hex(c) for c in (TAB10 if count <= 10 else TAB20)]
    return [(palette[i % len(palette)], DASHES[(i // len(palette)) % len(DASHES)]) for i in range(count)]


# -- the heatmap ------------------------------------------------------------------------------------
def heatmap_image(values: np.ndarray, labels: Sequence[str], columns: Sequence[str], *, title: str,
                  xlabel: str, swap: int | Sequence[int] | None = None) -> Image.Image:
    """``values`` (rows x columns in [0, 1], NaN: missing) as coloured cells with row ``labels`` (the first in
    bold, set apart by a white band), ``columns`` ticks, a viridis colour bar in percent, cell values in
    percent when they fit, and a dashed red line before column ``swap`` labelled "compressed" (before each of
    several, labelled by step)."""
    swaps = [] if swap is None else [swap] if isinstance(swap, int) else list(swap)
    rows, count = values.shape
    cell_h = max(6, min(22, 2600 // max(rows, 1)))
    label_size = max(7, min(12, cell_h - 4))
    left = 12 + max(text_width(label, label_size) for label in labels) + 8
    right = 16 + 18 + 8 + text_width("100%", 11) + 26
    grid_w = max(min(1250, 46 * count), 700 - left - right)
    cell_w = max(2, math.ceil(grid_w / count))
    grid_w = cell_w * count
    band = 4  # white band between the MLU row and the layers
    top = 34 + (18 if swaps else 0)
    grid_h = rows * cell_h + band
    width, height = left + grid_w + right, top + grid_h + 50
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)

    cells = np.repeat(np.repeat(viridis(values), cell_h, axis=0), cell_w, axis=1)
    image.paste(Image.fromarray(cells[:cell_h]), (left, top))
    image.paste(Image.fromarray(np.ascontiguousarray(cells[cell_h:])), (left, top + cell_h + band))

    def row_y(row: int) -> float:
        return top + row * cell_h + (band if row else 0) + cell_h / 2

    _text(image, (left + grid_w / 2, 10), title, 14, anchor="ma")
    for row, label in enumerate(labels):
        _text(image, (left - 8, row_y(row)), label, label_size, anchor="rm", bold=row == 0)
        draw.line([(left - 5, row_y(row)), (left - 1, row_y(row))], fill=BLACK)
    every = max(1, math.ceil(count / 25))
    for column in range(0, count, every):
        x = left + (column + 0.5) * cell_w
        draw.line([(x, top + grid_h), (x, top + grid_h + 4)], fill=BLACK)
        _text(image, (x, top + grid_h + 6), columns[column], 11, anchor="ma")
    _text(image, (left + grid_w / 2, top + grid_h + 26), xlabel, 12, anchor="ma")
    draw.rectangle([left - 1, top - 1, left + grid_w, top + grid_h], outline=BLACK)

    value_size = min(11, cell_h - 5)
    if value_size >= 7 and text_width("100", value_size) + 4 <= cell_w:
        for (row, column), value in np.ndenumerate(values):
            if not np.isnan(value):
                _text(image, (left + (column + 0.5) * cell_w, row_y(row)), f"{100 * value:.0f}", value_size,
                      fill=BLACK if value > 0.6 else WHITE, anchor="mm")
    for step, column in enumerate(swaps, 1):
        x = left + column * cell_w
        polyline(draw, [(x, top - 4), (x, top + grid_h)], RED, width=2, dash=(7, 4))
        _text(image, (x, top - 6), "compressed" if len(swaps) == 1 else f"step {step}", 12, fill=RED, anchor="md")

    bar_x, bar_h = left + grid_w + 16, grid_h
    ramp = viridis(np.linspace(1, 0, bar_h))[:, None, :].repeat(18, axis=1)
    image.paste(Image.fromarray(ramp), (bar_x, top))
    draw.rectangle([bar_x - 1, top - 1, bar_x + 18, top + bar_h], outline=BLACK)
    for share in np.linspace(0, 1, 6):
        y = top + (1 - share) * (bar_h - 1)
        draw.line([(bar_x + 18, y), (bar_x + 22, y)], fill=BLACK)
        _text(image, (bar_x + 25, y), f"{100 * share:.0f}%", 11, anchor="lm")
    _text(image, (bar_x + 25 + text_width("100%", 11) + 14, top + bar_h / 2), "utilization", 12, anchor="mm",
          vertical=True)
    return image


# -- cumulative energy ------------------------------------------------------------------------------
def log_ticks(high: float) -> tuple[list[int], list[int]]:
    """Labelled (1, 2, 5, 10, 20, ...) and unlabelled (3, 4, 6, ...) ticks of a log axis from 1 to ``high``."""
    major, minor, decade = [], [], 1
    while decade <= high:
        for digit in range(1, 10):
            if digit * decade <= high:
                (major if digit in (1, 2, 5) else minor).append(digit * decade)
        decade *= 10
    return major, minor


def _kept_points(xs: np.ndarray, ys: np.ndarray, keep: int | None) -> list[tuple[float, float]]:
    """The polyline's points, at most the first and last of each pixel column (and point ``keep``): a spectrum of
    thousands of eigenvalues crowds into a few columns at the right of a log axis."""
    columns = np.rint(xs)
    wanted = np.ones(len(xs), dtype=bool)
    wanted[1:-1] = (columns[1:-1] != columns[:-2]) | (columns[1:-1] != columns[2:])
    if keep is not None:
        wanted[keep] = True
    return list(zip(xs[wanted].tolist(), ys[wanted].tolist()))


def curves_image(curves: Mapping[str, np.ndarray], threshold: float, *, marks: Mapping[str, int] | None = None,
                 title: str, xlabel: str, ylabel: str, legend_title: str, mark_label: str = "") -> Image.Image:
    """Curves ``y = curves[label][k - 1]`` against ``k = 1 .. len`` on a log x axis from 1 to the longest curve's
    length, y on [0, 1.02], a dashed line at ``threshold``, a dot on each curve at ``k = marks[label]`` (none for
    0), and a legend beside the axes (two columns beyond 16 entries; ``mark_label`` explains the dots)."""
    marks = marks or {}
    styles = curve_styles(len(curves))
    entries = [*curves, f"threshold {threshold:g}", *([mark_label] if mark_label else [])]
    per_column = len(entries) if len(entries) <= 17 else math.ceil(len(entries) / 2)
    column_w = 34 + max(text_width(label, 12) for label in [*entries, legend_title])
    legend_w = column_w * math.ceil(len(entries) / per_column)
    width = max(900, 62 + 420 + 24 + legend_w)
    height = max(420, 40 + 22 + 17 * per_column + 40)
    x0, y0, x1, y1 = 62, 36, width - legend_w - 24, height - 52
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    top = max(2, max((len(y) for y in curves.values()), default=2))

    def px(k: np.ndarray | float, y: np.ndarray | float) -> tuple[Any, Any]:
        return x0 + np.log(np.asarray(k, dtype=np.float64)) / math.log(top) * (x1 - x0), y1 - np.asarray(y) / 1.02 * (y1 - y0)

    major, minor = log_ticks(top)
    for tick in minor:
        gx = float(px(tick, 0)[0])
        draw.line([(gx, y0), (gx, y1)], fill=(242, 242, 242))
        draw.line([(gx, y1), (gx, y1 + 2)], fill=BLACK)
    last_label = -math.inf
    for tick in major:
        gx = float(px(tick, 0)[0])
        draw.line([(gx, y0), (gx, y1)], fill=GRID)
        draw.line([(gx, y1), (gx, y1 + 4)], fill=BLACK)
        label = f"{tick:,}"
        if gx - text_width(label, 11) / 2 > last_label + 6:  # no label runs into the one before it
            _text(image, (gx, y1 + 6), label, 11, anchor="ma")
            last_label = gx + text_width(label, 11) / 2
    for tick in np.linspace(0, 1, 6):
        gy = float(px(1, tick)[1])
        draw.line([(x0, gy), (x1, gy)], fill=GRID)
        draw.line([(x0 - 4, gy), (x0, gy)], fill=BLACK)
        _text(image, (x0 - 7, gy), f"{tick:g}", 11, anchor="rm")
    dots = []
    for (color, dash), (label, y) in zip(styles, curves.items()):
        y = np.asarray(y, dtype=np.float64)
        if not len(y):
            continue
        k = marks.get(label) or 0
        xs, ys = px(np.arange(1, len(y) + 1), y)
        points = _kept_points(np.atleast_1d(xs), np.atleast_1d(ys), k - 1 if 0 < k <= len(y) else None)
        polyline(draw, points if len(points) > 1 else points * 2, color, width=2, dash=dash)
        if 0 < k <= len(y):
            dots.append((float(xs[k - 1]), float(ys[k - 1]), color))
    threshold_y = float(px(1, threshold)[1])
    polyline(draw, [(x0, threshold_y), (x1, threshold_y)], BLACK, width=1, dash=(6, 4))
    for x, y, color in dots:  # over every curve and the threshold line
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color, outline=BLACK)
    draw.rectangle([x0, y0, x1, y1], outline=BLACK)

    _text(image, ((x0 + x1) / 2, 10), title, 13, anchor="ma")
    _text(image, ((x0 + x1) / 2, y1 + 26), xlabel, 12, anchor="ma")
    _text(image, (18, (y0 + y1) / 2), ylabel, 12, anchor="mm", vertical=True)
    _text(image, (x1 + 20, y0), legend_title, 12, anchor="la")
    for i, label in enumerate(entries):
        lx, ly = x1 + 20 + (i // per_column) * column_w, y0 + 24 + (i % per_column) * 17
        if i < len(styles):
            polyline(draw, [(lx, ly + 7), (lx + 24, ly + 7)], styles[i][0], width=2, dash=styles[i][1])
        elif i == len(styles):
            polyline(draw, [(lx, ly + 7), (lx + 24, ly + 7)], BLACK, width=1, dash=(6, 4))
        else:
            draw.ellipse([lx + 8, ly + 3, lx + 16, ly + 11], fill=WHITE, outline=BLACK)
        _text(image, (lx + 30, ly + 7), label, 12, anchor="lm")
    return image


# -- PNG --------------------------------------------------------------------------------------------
def png_bytes(image: Image.Image, level: int = 3) -> bytes:
    """``image`` (RGB) as PNG bytes, rows unfiltered and deflated at zlib ``level``: about four times faster
    than Pillow's encoder, which tries every row filter, and as small for these flat-coloured figures."""
    pixels = np.asarray(image.convert("RGB"))
    height, width, _ = pixels.shape
    raw = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # each row starts with filter type 0 (none)
    raw[:, 1:] = pixels.reshape(height, -1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
            + chunk(b"IEND", b""))
