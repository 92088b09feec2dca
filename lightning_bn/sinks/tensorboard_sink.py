"""A sink for ``TensorBoardLogger``: scalars, a custom-scalars layout, raw histograms and heatmap images."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from lightning.fabric.loggers import TensorBoardLogger
from typing_extensions import override

from lightning_bn.sinks._validate import (
    check_charts,
    check_exact,
    check_heatmap,
    check_histogram,
    check_scalars,
    check_step,
    check_tag,
    check_tags,
)
from lightning_bn.sinks.heatmap import LOG_SCALE_STATS, _draw_heatmap, uses_log_scale
from lightning_bn.sinks.histogram import _summarize_bins
from lightning_bn.sinks.logger_sink import LoggerSink

__all__ = ["TensorBoardSink"]


class TensorBoardSink(LoggerSink):
    """Write to a TensorBoard logger: scalars, one multi-line chart per statistic, histograms and heatmaps.

    * :meth:`log_scalars` writes all the step's scalars as one event (one ``Summary`` with a value per key) to the
      logger's ``SummaryWriter`` instead of one event per key as ``logger.log_metrics`` does: hundreds of scalars per
      step cost one queue entry for the writer thread, not hundreds. The tags are the keys as given (the logger's
      ``prefix`` is not added: Lightning does not expose it); a closed writer or one of tensorboardX falls back to
      ``add_scalar`` per key.
    * :meth:`set_layout` writes TensorBoard's custom-scalars layout: every chart becomes one multi-line chart in the
      category ``category``, holding every scalar whose tag matches one of its regexes (the *Custom Scalars* tab).
      Layouts from several calls are merged and written again in full.
    * :meth:`log_histogram` writes a raw histogram (``SummaryWriter.add_histogram_raw``) with the given buckets from
      the first to the last non-empty one (as TensorBoard's own ``add_histogram`` does; the viewer trims them anyway).
      TensorBoard's record also wants min, max, sum and sum of squares: without ``exact`` they come from the bins,
      min/max as the outer edges of the non-empty bins and sum/sum of squares with every value at its bin centre
      (see :func:`~lightning_bn.sinks.histogram_summary`).
    * :meth:`log_heatmap` draws the values with :func:`~lightning_bn.sinks.render_heatmap` (on a log colour scale
      for the statistics in ``log_scale_stats``) and writes the image with ``add_image`` (TensorBoard's PNG, by
      Pillow at its default level).

    The histogram and image tags are written as given: the logger's ``prefix`` is not added to them.

    Args:
        logger: a ``TensorBoardLogger`` (Lightning's or Fabric's).
        category: the custom-scalars category that holds the charts.
        log_scale_stats: heatmaps of these statistics are drawn on a log colour scale: those whose tag is one of them
            or ends in ``/<statistic>`` (``heatmap/act/std``); see :func:`~lightning_bn.sinks.uses_log_scale`. The
            default, :data:`~lightning_bn.sinks.LOG_SCALE_STATS`, holds the magnitudes (std, RMS, maxima, norms and
            ratios); ``()`` draws every heatmap on a linear scale.

    Raises:
        TypeError: if ``logger`` is not a ``TensorBoardLogger`` or ``log_scale_stats`` not a list of str.
        ValueError: if ``category`` or an entry of ``log_scale_stats`` is empty.

    Example::

        from lightning.pytorch.loggers import TensorBoardLogger

        sink = TensorBoardSink(TensorBoardLogger("lightning_logs"))
        sink.set_layout({"act/std": ["act/std/.*"]})
        sink.log_scalars({"act/std/conv1": 0.8, "act/std/fc": 1.1}, step=0)
        sink.log_histogram("act/hist/fc", edges=np.linspace(-3, 3, 7), counts=np.array([1, 4, 9, 9, 4, 1]), step=0)
    """

    def __init__(
        self,
        logger: TensorBoardLogger,
        category: str = "lightning_bn",
        log_scale_stats: Collection[str] = LOG_SCALE_STATS,
    ) -> None:
        if not isinstance(logger, TensorBoardLogger):
            raise TypeError(f"`logger` must be a TensorBoardLogger, got {type(logger).__name__}")
        super().__init__(logger)
        self.category = check_tag(category, name="category")
        self.log_scale_stats = check_tags(log_scale_stats, name="log_scale_stats")
        self._charts: dict[str, list[str]] = {}
        self._scalar_cache: tuple[tuple[str, ...], Any] | None = None

    @override
    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        values = check_scalars(metrics)
        step = check_step(step)
        writer = self._experiment()
        if writer is None or not values:
            return
        file_writer = getattr(writer, "file_writer", None) if _is_torch_writer(writer) else None
        if file_writer is None:  # a closed writer (add_scalar reopens it) or tensorboardX's, with its own protos
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)
            return
        # The keys are written as given, like the histograms and images: a TensorBoardLogger's `prefix` is not
        # applied (Lightning offers no public way to read it). The monitor logs the same keys at every logging step:
        # the Summary is built once and its values replaced (add_summary copies it into the event).
        tags = tuple(values)
        if self._scalar_cache is not None and self._scalar_cache[0] == tags:
            summary = self._scalar_cache[1]
            for slot, value in zip(summary.value, values.values()):
                slot.simple_value = value
        else:
            summary = scalar_summary(values)
            self._scalar_cache = (tags, summary)
        file_writer.add_summary(summary, step)

    @override
    def set_layout(self, charts: Mapping[str, Sequence[str]]) -> None:
        checked = check_charts(charts)
        writer = self._experiment()
        if writer is None or not checked:
            return
        merged = {**self._charts, **checked}
        if merged == self._charts:
            return
        writer.add_custom_scalars({self.category: {title: ["Multiline", tags] for title, tags in merged.items()}})
        self._charts = merged

    @override
    def log_histogram(
        self,
        tag: str,
        edges: np.ndarray,
        counts: np.ndarray,
        step: int,
        exact: Mapping[str, float] | None = None,
    ) -> None:
        check_tag(tag)
        step = check_step(step)
        edges_arr, counts_arr = check_histogram(edges, counts)
        summary = _summarize_bins(edges_arr, counts_arr, check_exact(exact))
        writer = self._experiment()
        if writer is None:
            return
        # Like TensorBoard's own writer, keep the buckets from the first to the last non-empty one: the viewer draws
        # the first bucket from `min` and the last one up to `max`, so empty outer buckets would collapse to zero width.
        nonempty = np.flatnonzero(counts_arr > 0)
        first, last = (nonempty[0], nonempty[-1]) if nonempty.size else (0, counts_arr.size - 1)
        writer.add_histogram_raw(
            tag,
            min=summary.min,
            max=summary.max,
            num=summary.num,
            sum=summary.sum,
            sum_squares=summary.sum_squares,
            bucket_limits=edges_arr[first + 1 : last + 2].tolist(),
            bucket_counts=counts_arr[first : last + 1].tolist(),
            global_step=step,
        )

    @override
    def log_heatmap(
        self, tag: str, values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[int], step: int
    ) -> None:
        check_tag(tag)
        step = check_step(step)
        values_arr, rows, cols = check_heatmap(values, row_labels, col_labels)
        writer = self._experiment()
        if writer is None:
            return
        image = _draw_heatmap(values_arr, rows, cols, tag, uses_log_scale(tag, self.log_scale_stats))
        # TensorBoard's own encoder: a lower zlib level would save under a tenth of the cost of drawing the image
        # (benchmarks/results/writing.md).
        writer.add_image(tag, image, global_step=step, dataformats="HWC")

    @override
    def flush(self) -> None:
        writer = self._experiment()
        if writer is not None:
            writer.flush()


def scalar_summary(values: Mapping[str, float], prefix: str = "") -> Any:
    """One TensorBoard ``Summary`` holding every ``{tag: value}`` as a scalar (``simple_value``, as ``add_scalar``)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=prefix + tag, simple_value=value) for tag, value in values.items()])


def _is_torch_writer(writer: Any) -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # no tensorboard package: the logger runs on tensorboardX
        return False
    return isinstance(writer, SummaryWriter)
