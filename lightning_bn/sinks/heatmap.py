"""Render a layers-by-steps heatmap to an RGB image (HWC, uint8) that any logger can take."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_bn.sinks._validate import check_heatmap

__all__ = ["render_heatmap", "matplotlib_available", "pillow_available"]

BACKENDS = ("auto", "pillow", "matplotlib", "numpy")

# Viridis sampled at 9 points; the numpy fallback interpolates between them.
_VIRIDIS_ANCHORS = np.array(
    [
        [68, 1, 84],
        [71, 44, 122],
        [59, 81, 139],
        [44, 113, 142],
        [33, 144, 141],
        [39, 173, 129],
        [92, 200, 99],
        [170, 220, 50],
        [253, 231, 37],
    ],
    dtype=np.float64,
)
_MISSING_RGB = np.array([128, 128, 128], dtype=np.uint8)


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (then headings, tick labels and a colour bar are drawn)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pillow_available() -> bool:
    """Whether Pillow can be imported (the fast labelled renderer; TensorBoard and W&B images need it anyway)."""
    try:
        import PIL.ImageDraw  # noqa: F401
    except ImportError:
        return False
    return True


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return low - 0.5, high + 0.5
    return low, high


def _colour(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Viridis colours (interpolated between 9 anchors) of ``values`` scaled from ``[low, high]``; NaN and inf grey."""
    finite = np.isfinite(values)
    scaled = np.where(finite, (np.where(finite, values, low) - low) / (high - low), 0.0)
    position = np.clip(scaled, 0.0, 1.0) * (len(_VIRIDIS_ANCHORS) - 1)
    lower = np.floor(position).astype(int).clip(max=len(_VIRIDIS_ANCHORS) - 2)
    frac = (position - lower)[..., None]
    rgb = _VIRIDIS_ANCHORS[lower] * (1 - frac) + _VIRIDIS_ANCHORS[lower + 1] * frac
    image = np.rint(rgb).astype(np.uint8)
    image[~finite] = _MISSING_RGB
    return image


def _render_numpy(values: np.ndarray, cell_px: int) -> np.ndarray:
    image = _colour(values, *_finite_range(values))
    # Nearest-neighbour upscaling keeps one flat block per (layer, step) cell.
    return np.ascontiguousarray(image.repeat(cell_px, axis=0).repeat(cell_px, axis=1))


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _text_stamp(text: str, size: int, anchor: str) -> tuple[np.ndarray, int, int] | None:
    """``text`` rendered once as an 8-bit coverage mask, with its offset from the anchor point (cached: layer names
    and most step labels are the same from one heatmap to the next). None when the font cannot place anchors."""
    from PIL import Image, ImageDraw, ImageFont

    font = _font(size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow < 10.1's bitmap font: no anchors
        return None
    left, top, right, bottom = (int(v) for v in font.getbbox(text, anchor=anchor))
    mask = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font, anchor=anchor)
    return np.asarray(mask), left, top


def _draw_text(canvas: np.ndarray, xy: tuple[int, int], text: str, size: int, anchor: str) -> bool:
    """Black ``text`` onto an RGB ``canvas`` at ``xy`` as Pillow's ``ImageDraw.text`` draws it; False if it cannot."""
    stamp = _text_stamp(text, size, anchor)
    if stamp is None:
        return False
    mask, left, top = stamp
    x0, y0 = xy[0] + left, xy[1] + top
    height, width = canvas.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + mask.shape[1], width), min(y0 + mask.shape[0], height)
    if cx0 < cx1 and cy0 < cy1:
        alpha = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0, None].astype(np.uint16)
        region = canvas[cy0:cy1, cx0:cx1]
        # black over the background with the glyph coverage as alpha, rounded like Pillow's blend
        region[...] = (region * (255 - alpha) + 127) // 255
    return True


def _render_pillow(values: np.ndarray, row_labels: list[str], col_labels: list[int], title: str) -> np.ndarray:
    """The matplotlib figure's content (layer names, steps, title, colour bar) drawn with Pillow in a few ms."""
    from PIL import Image, ImageDraw

    rows, cols = values.shape
    font, small = _font(11), _font(10)
    # A row is tall enough for its label up to 60 rows; beyond that rows shrink and every k-th one is labelled.
    row_px = 13 if rows <= 60 else max(2, 780 // rows)
    col_px = max(1, min(16, 640 // cols))
    plot_w, plot_h = col_px * cols, row_px * rows
    label_w = max(_text_width(label, 11) for label in row_labels)
    low, high = _finite_range(values)
    bar_labels = [f"{v:.3g}" for v in (high, (low + high) / 2, low)]
    bar_label_w = max(_text_width(label, 10) for label in bar_labels)
    left, top = label_w + 10, (20 if title else 6)
    bottom, bar_gap, bar_w = 30, 8, 12
    width = left + plot_w + bar_gap + bar_w + 6 + bar_label_w + 6
    height = top + max(plot_h, 40) + bottom
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    cells = _colour(values, low, high).repeat(row_px, axis=0).repeat(col_px, axis=1)
    canvas[top : top + plot_h, left : left + plot_w] = cells
    bar_left = left + plot_w + bar_gap
    gradient = _colour(np.linspace(high, low, max(plot_h, 40))[:, None], low, high)
    canvas[top : top + gradient.shape[0], bar_left : bar_left + bar_w] = gradient
    texts: list[tuple[tuple[int, int], str, int, str]] = []
    if title:
        texts.append(((left + plot_w // 2, 3), title, 11, "ma"))
    every_row = -(-rows // max(plot_h // 12, 1))
    for i in range(0, rows, every_row):
        texts.append(((left - 4, top + i * row_px + row_px // 2), row_labels[i], 11, "rm"))
    for j in _tick_positions(cols, 10):
        x = left + j * col_px + col_px // 2
        canvas[top + plot_h : top + plot_h + 4, x] = 0  # the tick
        texts.append(((x, top + plot_h + 4), str(col_labels[j]), 10, "ma"))
    texts.append(((left + plot_w // 2, top + plot_h + 17), "step", 10, "ma"))
    bar_h = gradient.shape[0]
    for label, y in zip(bar_labels, (top, top + bar_h // 2, top + bar_h - 1)):
        texts.append(((bar_left + bar_w + 4, y), label, 10, "lm"))
    if all(_draw_text(canvas, xy, text, size, anchor) for xy, text, size, anchor in texts[:1]):
        for xy, text, size, anchor in texts[1:]:
            _draw_text(canvas, xy, text, size, anchor)
        return canvas
    image = Image.fromarray(canvas)  # no anchors in this font: Pillow draws the text itself
    draw = ImageDraw.Draw(image)
    for xy, text, size, anchor in texts:
        draw.text(xy, text, fill=(0, 0, 0), font=font if size == 11 else small, anchor=anchor)
    return np.asarray(image, dtype=np.uint8).copy()


@functools.lru_cache(maxsize=4096)
def _text_width(text: str, size: int) -> int:
    from PIL import Image, ImageDraw

    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=_font(size)))


def _tick_positions(count: int, max_ticks: int) -> range:
    """Every k-th index, k as small as keeps at most ``max_ticks`` ticks (regular spacing, first index included)."""
    return range(0, count, -(-count // max(max_ticks, 1)))


def _render_matplotlib(
    values: np.ndarray, row_labels: list[str], col_labels: list[int], title: str, cmap: str, dpi: int
) -> np.ndarray:
    # The object API with an explicit Agg canvas: no pyplot state, no change to the user's global backend.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = values.shape
    # Axes placed in inches from the label sizes instead of by a layout engine, whose extra pass would cost about as
    # much again as drawing the figure. 7-point labels are ~0.055 in per character and ~0.11 in tall.
    label_in = 0.3 + 0.055 * max(len(label) for label in row_labels)
    plot_w = min(4.0 + 0.02 * cols, 10.0)
    plot_h = min(max(0.15 * rows, 1.6), 14.0)
    bar_in = 0.9  # gap, colour bar and its tick labels
    bottom_in, top_in = 0.5, (0.35 if title else 0.15)
    width, height = label_in + plot_w + bar_in, bottom_in + plot_h + top_in
    fig = Figure(figsize=(width, height), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((label_in / width, bottom_in / height, plot_w / width, plot_h / height))
    bar = fig.add_axes(((label_in + plot_w + 0.1) / width, bottom_in / height, 0.12 / width, plot_h / height))
    low, high = _finite_range(values)
    palette = matplotlib.colormaps[cmap].with_extremes(bad="#808080")
    mesh = ax.imshow(
        np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", cmap=palette, vmin=low, vmax=high
    )
    row_ticks = _tick_positions(rows, int(plot_h / 0.11))
    col_ticks = _tick_positions(cols, 10)
    ax.set_yticks(list(row_ticks), [row_labels[i] for i in row_ticks], fontsize=7)
    ax.set_xticks(list(col_ticks), [str(col_labels[i]) for i in col_ticks], fontsize=7)
    ax.set_xlabel("step", fontsize=8, labelpad=1)
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(mesh, cax=bar).ax.tick_params(labelsize=7)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def render_heatmap(
    values: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[int],
    title: str = "",
    cmap: str = "viridis",
    backend: str = "auto",
    dpi: int = 100,
    cell_px: int = 8,
) -> np.ndarray:
    """Draw ``values`` (layers x steps) as an RGB image of shape ``(H, W, 3)``, dtype uint8.

    Three renderers, all with NaN and infinite values grey and the colour range that of the finite values:

    * ``"pillow"``: the layer names on the y axis (every k-th one when there are more than about 60), the steps on
      the x axis, the title and a colour bar, cells coloured with an interpolated viridis; a few milliseconds, which
      is why ``"auto"`` picks it first (the monitor draws heatmaps while training runs).
    * ``"matplotlib"``: the same content as a matplotlib figure (any ``cmap``, ``dpi``), drawn on a private Agg canvas,
      so the user's pyplot backend and state are untouched; a few hundred milliseconds per image on a busy CPU.
    * ``"numpy"``: the bare grid, one ``cell_px`` by ``cell_px`` block per value, rows in the order of ``row_labels``
      from the top, no text.

    ``"auto"`` takes Pillow when it can be imported, else matplotlib, else numpy.

    Args:
        values: array of shape ``(len(row_labels), len(col_labels))``.
        row_labels: one name per row (layer).
        col_labels: one step per column.
        title: drawn above the figure (pillow and matplotlib).
        cmap: a matplotlib colormap name (matplotlib only; the others draw viridis).
        backend: ``"auto"``, ``"pillow"``, ``"matplotlib"`` or ``"numpy"``.
        dpi: resolution of the matplotlib figure.
        cell_px: size of one value's block in the numpy rendering.

    Raises:
        ValueError: on shapes that do not match, an unknown ``backend`` or ``cmap``, or a ``backend`` whose library
            is not installed.

    Example::

        >>> image = render_heatmap(np.arange(6.0).reshape(2, 3), ["conv1", "fc"], [0, 10, 20], backend="numpy")
        >>> image.shape, image.dtype
        ((16, 24, 3), dtype('uint8'))
    """
    values_arr, rows, cols = check_heatmap(values, row_labels, col_labels)
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 1:
        raise ValueError(f"`cell_px` must be an int >= 1, got {cell_px!r}")
    if backend == "auto":
        backend = "pillow" if pillow_available() else "matplotlib" if matplotlib_available() else "numpy"
    if backend == "numpy":
        return _render_numpy(values_arr, cell_px)
    if backend == "pillow":
        if not pillow_available():
            raise ValueError("`backend` is 'pillow' but Pillow is not installed; use 'auto' or 'numpy'")
        return _render_pillow(values_arr, rows, cols, title)
    if not matplotlib_available():
        raise ValueError("`backend` is 'matplotlib' but matplotlib is not installed; use 'auto' or 'numpy'")
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise ValueError(f"`cmap` must be a matplotlib colormap name such as 'viridis', got {cmap!r}")
    return _render_matplotlib(values_arr, rows, cols, title, cmap, dpi)
