"""Draw a layers-by-steps heatmap with matplotlib as an RGB image (HWC, uint8) that any logger can take."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from lightning_bn._checks import check_positive_int
from lightning_bn.sinks._validate import check_heatmap

__all__ = ["LOG_SCALE_STATS", "render_heatmap", "shorten_labels", "uses_log_scale"]

# Magnitudes that may differ between layers by decades (an exploding layer next to a collapsing one): on a linear
# scale every layer but the largest would be one colour.
LOG_SCALE_STATS = (
    "act/std",
    "act/rms",
    "act/abs_max",
    "act_in/std",
    "act_in/rms",
    "act_in/abs_max",
    "act_grad/rms",
    "act_grad/abs_max",
    "param/norm",
    "grad/norm",
    "grad/ratio",
    "update/ratio",
)

MISSING_COLOUR = "#808080"  # NaN and infinite values
NONPOSITIVE_COLOUR = "#000000"  # values <= 0 on a log scale (a dead layer's std), the colour bar's lower triangle
MAX_LABEL_CHARS = 32

# Sizes in inches at the figure's dpi (100 by default: 8-point text is 11 pixels tall).
_ROW_IN = 0.15  # one layer's row: an 8-point label and a gap
_MAX_PLOT_IN = 12.0  # up to 80 layers each get a labelled row; beyond, rows shrink and every k-th one is labelled
_MIN_PLOT_IN = 1.5
_TICK_PT, _LABEL_PT, _TITLE_PT = 8, 9, 10


def uses_log_scale(tag: str, stats: Collection[str] = LOG_SCALE_STATS) -> bool:
    """Whether a heatmap tagged ``tag`` shows one of ``stats``: ``tag`` is a statistic or ends in ``/<statistic>``.

    Example::

        >>> uses_log_scale("heatmap/act/std"), uses_log_scale("heatmap/act/frac_zero")
        (True, False)
    """
    return any(tag == stat or tag.endswith("/" + stat) for stat in stats)


def shorten_labels(labels: Sequence[str], max_chars: int = MAX_LABEL_CHARS) -> tuple[str, list[str]]:
    """Labels of at most ``max_chars`` characters for ``labels``, and the prefix taken off them to get there.

    Labels that fit are kept whole, with no prefix. Otherwise the dotted prefix all labels share is taken off (whole
    parts of the names, ``"bert.encoder.layer."``, never a name's last part; the caller says it once), and a name
    still too long keeps its tail, which tells layers apart, from a dot after an ellipsis:
    ``"decoder.layers.11.self_attn.out_proj"`` at 24 characters becomes ``"…11.self_attn.out_proj"``. Names that
    would then read alike keep longer tails until they differ.

    Example::

        >>> shorten_labels(["model.layers.0.mlp.fc1", "model.head"], max_chars=16)
        ('model.', ['layers.0.mlp.fc1', 'head'])
        >>> shorten_labels(["encoder.layers.11.self_attn.out_proj", "lm_head"], max_chars=24)
        ('', ['…11.self_attn.out_proj', 'lm_head'])
    """
    if all(len(label) <= max_chars for label in labels):
        return "", list(labels)
    parts = [label.split(".") for label in labels]
    shared = min((len(p) - 1 for p in parts), default=0) if len(parts) > 1 else 0
    for depth in range(shared):
        if any(p[depth] != parts[0][depth] for p in parts):
            shared = depth
            break
    prefix = "".join(part + "." for part in parts[0][:shared]) if shared else ""
    rest = [label[len(prefix) :] for label in labels]
    budget = [max_chars] * len(rest)
    while True:
        shown = [_elide(label, chars) for label, chars in zip(rest, budget)]
        originals: dict[str, set[str]] = {}
        for label, text in zip(rest, shown):
            originals.setdefault(text, set()).add(label)
        clashing = [i for i, text in enumerate(shown) if len(originals[text]) > 1 and text != rest[i]]
        if not clashing:
            return prefix, shown
        for i in clashing:
            budget[i] += 4


def _elide(label: str, max_chars: int) -> str:
    if len(label) <= max_chars:
        return label
    tail = label[len(label) - max_chars + 1 :]
    dot = tail.find(".")
    if 0 <= dot < min(12, len(tail) - 1):  # start at a whole part of the name when that loses few characters
        tail = tail[dot + 1 :]
    return "…" + tail


def render_heatmap(
    values: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[int],
    title: str = "",
    log_scale: bool = False,
    cmap: str = "viridis",
    dpi: int = 100,
) -> np.ndarray:
    """Draw ``values`` (layers x steps) with matplotlib as an RGB image of shape ``(H, W, 3)``, dtype uint8.

    The figure has the layer names on the y axis, first row at the top, the steps on the x axis, ``title`` above and
    a colour bar. Names longer than 32 characters lose the prefix they all share (said once, in the axis label) and
    then keep their tail (:func:`shorten_labels`). The image's height follows the number of layers: each name is
    drawn at 8 points (11 pixels at 100 dpi) in a row of its own up to 80 layers; beyond that rows shrink and every
    k-th one is labelled. NaN and infinite values are grey; the colour range is that of the finite values.

    With ``log_scale`` the colours follow the logarithm of the values, for statistics whose layers differ by decades
    (``act/std``, ``act_grad/rms``; the sinks pick it by tag, see :func:`uses_log_scale`). The range is that of the
    positive finite values; values <= 0 are black (the colour bar's lower triangle). Without any positive value the
    scale is linear.

    Drawn on a private Agg canvas (``matplotlib.figure.Figure``): pyplot, its open figures and the backend are not
    touched. What an image costs: ``python -m benchmarks.writing``.

    Args:
        values: array of shape ``(len(row_labels), len(col_labels))``.
        row_labels: one name per row (layer).
        col_labels: one step per column.
        title: drawn above the plot; also the colour bar's label.
        log_scale: colours on a logarithmic scale.
        cmap: a matplotlib colormap name.
        dpi: pixels per inch of the figure.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: on shapes that do not match, an unknown ``cmap`` or a ``dpi`` that is not a positive int.

    Example::

        >>> image = render_heatmap(np.arange(6.0).reshape(2, 3), ["conv1", "fc"], [0, 10, 20], title="act/std")
        >>> image.ndim, image.shape[2], image.dtype
        (3, 3, dtype('uint8'))
    """
    values_arr, rows, cols = check_heatmap(values, row_labels, col_labels)
    check_positive_int("dpi", dpi)
    colormaps = _matplotlib().colormaps
    if cmap not in colormaps:
        raise ValueError(f"`cmap` must be a matplotlib colormap name such as 'viridis', got {cmap!r}")
    return _draw_heatmap(values_arr, rows, cols, title, bool(log_scale), cmap, dpi)


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("heatmaps are drawn with matplotlib: `pip install matplotlib`") from None
    return matplotlib


def _draw_heatmap(
    values: np.ndarray,
    row_labels: list[str],
    col_labels: list[int],
    title: str,
    log_scale: bool,
    cmap: str = "viridis",
    dpi: int = 100,
) -> np.ndarray:
    """:func:`render_heatmap` on input already checked (the sinks check theirs once, in their public methods)."""
    matplotlib = _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    rows, cols = values.shape
    finite = np.isfinite(values)
    positive = finite & (values > 0)
    log_scale = log_scale and bool(positive.any())
    nonpositive = log_scale and bool((finite & ~positive).any())
    if log_scale:
        low, high = _value_range(values[positive])
        low, high = (low / 2, high * 2) if low == high else (low, high)
        norm: Normalize = LogNorm(vmin=low, vmax=high)
        # below the range, so drawn in the colour map's "under" colour; NaN and inf stay masked ("bad", grey)
        shown = np.where(finite & ~positive, low / 10, values)
    else:
        low, high = _value_range(values[finite])
        low, high = (low - 0.5, high + 0.5) if low == high else (low, high)
        norm, shown = Normalize(vmin=low, vmax=high), values
    palette = matplotlib.colormaps[cmap].with_extremes(bad=MISSING_COLOUR, under=NONPOSITIVE_COLOUR)

    prefix, shown_labels = shorten_labels(row_labels)
    labelled = _every_kth(rows, int(_MAX_PLOT_IN / _ROW_IN))
    fig = Figure(dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    # Axes placed in inches from the measured label widths: the figure grows with the layers and their names, where a
    # layout engine would squeeze the axes into a figure of fixed size.
    renderer = canvas.get_renderer()
    tick_font = FontProperties(size=_TICK_PT)
    label_px = max(renderer.get_text_width_height_descent(shown_labels[i], tick_font, ismath=False)[0]
                   for i in labelled)
    left_in = 0.45 + label_px / dpi  # y label, tick labels, ticks
    plot_w = float(np.clip(0.03 * cols, 3.0, 9.0))
    plot_h = float(np.clip(_ROW_IN * rows, _MIN_PLOT_IN, _MAX_PLOT_IN))
    right_in = 1.35  # gap, colour bar, its tick labels and its label
    bottom_in, top_in = 0.6, (0.4 if title else 0.15)
    width, height = left_in + plot_w + right_in, bottom_in + plot_h + top_in
    fig.set_size_inches(width, height)
    ax = fig.add_axes((left_in / width, bottom_in / height, plot_w / width, plot_h / height))
    bar = fig.add_axes(((left_in + plot_w + 0.15) / width, bottom_in / height, 0.15 / width, plot_h / height))

    mesh = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", interpolation="nearest", cmap=palette, norm=norm)
    ax.set_yticks(list(labelled), [shown_labels[i] for i in labelled], fontsize=_TICK_PT)
    steps = _every_kth(cols, 8)
    ax.set_xticks(list(steps), [str(col_labels[j]) for j in steps], fontsize=_TICK_PT)
    ax.set_xlabel("step", fontsize=_LABEL_PT)
    # the prefix every name shares, once, cut to the height of the plot (9-point characters are ~0.075 in wide)
    ax.set_ylabel(f"layer ({_elide(prefix, int(plot_h / 0.075) - 9)}…)" if prefix else "layer", fontsize=_LABEL_PT)
    if title:
        ax.set_title(title, fontsize=_TITLE_PT)
    colour_bar = fig.colorbar(mesh, cax=bar, extend="min" if nonpositive else "neither")
    colour_bar.ax.tick_params(labelsize=_TICK_PT)
    if log_scale and high / low >= 100:
        colour_bar.minorticks_off()
    colour_bar.set_label(f"{title or 'value'}{' (log scale)' if log_scale else ''}", fontsize=_LABEL_PT)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def _value_range(finite: np.ndarray) -> tuple[float, float]:
    if finite.size == 0:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())


def _every_kth(count: int, max_ticks: int) -> range:
    """Every k-th index, k as small as keeps at most ``max_ticks`` of them (the first index included)."""
    return range(0, count, -(-count // max(max_ticks, 1)))
