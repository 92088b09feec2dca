"""A sink for ``WandbLogger``: scalars, histograms and heatmap images in the run's history."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from lightning_bn.sinks._validate import check_exact, check_heatmap, check_histogram, check_step, check_tag, check_tags
from lightning_bn.sinks.heatmap import LOG_SCALE_STATS, _draw_heatmap, uses_log_scale
from lightning_bn.sinks.histogram import _merge_checked_bins
from lightning_bn.sinks.logger_sink import LoggerSink

__all__ = ["WandbSink"]

# wandb.Histogram refuses more bins than this.
WANDB_MAX_BINS = 512


class WandbSink(LoggerSink):
    """Write to a Weights & Biases logger: scalars, histograms and heatmap images.

    Everything goes through ``logger.log_metrics``, so each entry carries ``trainer/global_step`` (the x axis that
    ``WandbLogger`` sets up) and the logger's ``prefix``.

    * Histograms become ``wandb.Histogram(np_histogram=(counts, edges))``; more than 512 bins (W&B's limit) are
      merged in runs of adjacent bins first (totals and outer edges kept). ``exact`` is not used: W&B stores bins only.
    * Heatmaps are drawn with :func:`~lightning_bn.sinks.render_heatmap` (on a log colour scale for the statistics
      in ``log_scale_stats``) and logged as ``wandb.Image``.
    * :meth:`set_layout` is checked and ignored: W&B groups panels by the ``area/statistic/`` key prefix by itself.

    Args:
        logger: a ``WandbLogger``.
        log_scale_stats: heatmaps of these statistics are drawn on a log colour scale, as in
            :class:`~lightning_bn.sinks.TensorBoardSink`.

    Raises:
        TypeError: if ``logger`` is not a ``WandbLogger`` or ``log_scale_stats`` not a list of str.
        ValueError: if an entry of ``log_scale_stats`` is empty.

    Example::

        from lightning.pytorch.loggers import WandbLogger

        sink = WandbSink(WandbLogger(project="norms", offline=True))
        sink.log_scalars({"act/std/fc": 1.1}, step=0)
        sink.log_histogram("act/hist/fc", edges=np.linspace(-3, 3, 7), counts=np.array([1, 4, 9, 9, 4, 1]), step=0)
    """

    def __init__(self, logger: WandbLogger, log_scale_stats: Collection[str] = LOG_SCALE_STATS) -> None:
        if not isinstance(logger, WandbLogger):
            raise TypeError(f"`logger` must be a WandbLogger, got {type(logger).__name__}")
        super().__init__(logger)
        self.log_scale_stats = check_tags(log_scale_stats, name="log_scale_stats")

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
        check_exact(exact)  # checked like every sink's, though W&B stores bins only
        if not self._writes():
            return
        import wandb

        edges_arr, counts_arr = _merge_checked_bins(edges_arr, counts_arr, max_bins=WANDB_MAX_BINS)
        histogram = wandb.Histogram(np_histogram=(counts_arr.tolist(), edges_arr.tolist()))
        self.logger.log_metrics({tag: histogram}, step)  # type: ignore[dict-item]

    @override
    def log_heatmap(
        self, tag: str, values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[int], step: int
    ) -> None:
        check_tag(tag)
        step = check_step(step)
        values_arr, rows, cols = check_heatmap(values, row_labels, col_labels)
        if not self._writes():
            return
        import wandb

        image = _draw_heatmap(values_arr, rows, cols, tag, uses_log_scale(tag, self.log_scale_stats))
        self.logger.log_metrics({tag: wandb.Image(image, caption=f"{tag} at step {step}")}, step)  # type: ignore[dict-item]
