"""The interface every sink implements: where the monitor's figures go."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np

from lightning_bn.sinks._validate import (
    check_charts,
    check_exact,
    check_heatmap,
    check_histogram,
    check_step,
    check_tag,
)

__all__ = ["Sink"]


class Sink(ABC):
    """Writes scalars, a chart layout, histograms and heatmaps to one destination.

    Only :meth:`log_scalars` is required; a destination that cannot show charts, histograms or images keeps the
    default methods, which check their input (so a mistake fails the same way whichever logger is attached) and then
    ignore it. Sinks do not decide who writes: call them on rank zero only.

    Example::

        class PrintSink(Sink):
            def log_scalars(self, metrics, step):
                print(step, metrics)

        PrintSink().log_histogram("act/hist/fc", edges=[0.0, 1.0, 2.0], counts=[3, 4], step=0)  # ignored
    """

    @abstractmethod
    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Write ``{key: value}`` at ``step``."""

    def set_layout(self, charts: Mapping[str, Sequence[str]]) -> None:
        """Group scalars into charts: ``{chart title: [tag regex, ...]}``, e.g. ``{"act/std": ["act/std/.*"]}``."""
        check_charts(charts)

    def log_histogram(
        self,
        tag: str,
        edges: np.ndarray,
        counts: np.ndarray,
        step: int,
        exact: Mapping[str, float] | None = None,
    ) -> None:
        """Write a histogram given by its bins: ``edges`` of shape ``(K + 1,)``, ``counts`` of shape ``(K,)``.

        ``exact`` optionally carries the true ``min``, ``max``, ``sum`` and ``sum_squares`` of the values; without
        them a sink that needs them approximates from the bins (see :func:`~lightning_bn.sinks.histogram_summary`).
        """
        check_tag(tag)
        check_histogram(edges, counts)
        check_step(step)
        check_exact(exact)

    def log_heatmap(
        self, tag: str, values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[int], step: int
    ) -> None:
        """Write ``values`` (layers x steps) as a heatmap with layer names on one axis and steps on the other."""
        check_tag(tag)
        check_heatmap(values, row_labels, col_labels)
        check_step(step)

    def flush(self) -> None:  # noqa: B027 - deliberately a no-op by default
        """Push buffered output to disk or to the service, where the destination buffers."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
