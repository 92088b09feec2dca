"""A sink for any Lightning logger: scalars through ``logger.log_metrics``, everything else ignored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.fabric.loggers import Logger
from lightning.fabric.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_bn.sinks._validate import check_scalars, check_step
from lightning_bn.sinks.sink import Sink

__all__ = ["LoggerSink"]


class LoggerSink(Sink):
    """Write scalars to any Lightning logger (CSV, MLflow, Comet, Neptune, your own) via ``log_metrics``.

    The chart layout, histograms and heatmaps are checked and ignored: a generic logger has no way to show them.
    Nothing happens on ranks other than zero (as with Lightning's own ``log_metrics``), and the logger's experiment is
    only touched when something is written, so building a sink is free.

    Args:
        logger: a ``lightning.pytorch.loggers.Logger`` (or Fabric logger).

    Raises:
        TypeError: if ``logger`` is not a Lightning logger.

    Example::

        from lightning.pytorch.loggers import CSVLogger

        sink = LoggerSink(CSVLogger("logs"))
        sink.log_scalars({"act/std/fc": 0.9}, step=10)
    """

    def __init__(self, logger: Logger) -> None:
        if not isinstance(logger, Logger):
            raise TypeError(f"`logger` must be a Lightning logger, got {type(logger).__name__}")
        self.logger = logger

    @override
    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        values = check_scalars(metrics)
        step = check_step(step)
        if values and self._writes():
            self.logger.log_metrics(values, step)

    @override
    def flush(self) -> None:
        if self._writes():
            self.logger.save()

    def _writes(self) -> bool:
        return getattr(rank_zero_only, "rank", 0) == 0

    def _experiment(self) -> Any:
        """The logger's experiment, or None where there is none to write to (created on first use)."""
        return getattr(self.logger, "experiment", None) if self._writes() else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.logger).__name__})"
