"""A sink for ``WandbLogger``: scalars, histograms and heatmap images in the run's history."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from lightning_bn.sinks._validate import check_heatmap, check_histogram, check_step, check_tag
from lightning_bn.sinks.heatmap import BACKENDS, render_heatmap
from lightning_bn.sinks.histogram import merge_bins
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
    * Heatmaps are rendered with :func:`~lightning_bn.sinks.render_heatmap` and logged as ``wandb.Image``.
    * :meth:`set_layout` is checked and ignored: W&B groups panels by the ``area/statistic/`` key prefix by itself.

    Args:
        logger: a ``WandbLogger``.
        heatmap_backend: ``"auto"``, ``"pillow"``, ``"matplotlib"`` or ``"numpy"``; see
            :func:`~lightning_bn.sinks.render_heatmap`.

    Raises:
        TypeError: if ``logger`` is not a ``WandbLogger``.
        ValueError: if ``heatmap_backend`` is unknown.

    Example::

        from lightning.pytorch.loggers import WandbLogger

        sink = WandbSink(WandbLogger(project="norms", offline=True))
        sink.log_scalars({"act/std/fc": 1.1}, step=0)
        sink.log_histogram("act/hist/fc", edges=np.linspace(-3, 3, 7), counts=np.array([1, 4, 9, 9, 4, 1]), step=0)
    """

    def __init__(self, logger: WandbLogger, heatmap_backend: str = "auto") -> None:
        if not isinstance(logger, WandbLogger):
            raise TypeError(f"`logger` must be a WandbLogger, got {type(logger).__name__}")
        super().__init__(logger)
        if heatmap_backend not in BACKENDS:
            raise ValueError(f"`heatmap_backend` must be one of {', '.join(BACKENDS)}, got {heatmap_backend!r}")
        self.heatmap_backend = heatmap_backend

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
        checked = check_histogram(edges, counts)  # once: the checks of the base class, kept for the merge
        if not self._writes():
            return
        import wandb

        edges_arr, counts_arr = merge_bins(*checked, max_bins=WANDB_MAX_BINS)
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

        image = render_heatmap(values_arr, rows, cols, title=tag, backend=self.heatmap_backend)
        self.logger.log_metrics({tag: wandb.Image(image, caption=f"{tag} at step {step}")}, step)  # type: ignore[dict-item]
