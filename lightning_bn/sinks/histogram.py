"""Summary numbers of a histogram given only its bins, as TensorBoard's histogram record wants them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from lightning_bn._checks import check_positive_int
from lightning_bn.sinks._validate import check_exact, check_histogram

__all__ = ["HistogramSummary", "histogram_summary", "merge_bins"]


class HistogramSummary(NamedTuple):
    """The fields of TensorBoard's ``HistogramProto`` besides the buckets."""

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float


def histogram_summary(edges: Any, counts: Any, exact: Mapping[str, float] | None = None) -> HistogramSummary:
    """Min, max, count, sum and sum of squares of the values behind a histogram.

    From the bins alone the numbers are approximations: ``min``/``max`` are the outer edges of the first and last
    non-empty bins, ``sum``/``sum_squares`` treat every value as sitting at its bin centre. ``exact`` overrides any of
    ``min``, ``max``, ``sum``, ``sum_squares`` with the true values when the caller has them (for example from
    :func:`lightning_bn.moments.tensor_summary`). ``num`` is always ``counts.sum()``.

    An empty histogram (all counts zero) gives ``min``/``max`` at the outer edges and zeros elsewhere.

    Args:
        edges: bin edges, shape ``(K + 1,)``, strictly increasing.
        counts: values per bin, shape ``(K,)``, finite and ``>= 0``.
        exact: optional true values for some of ``min``, ``max``, ``sum``, ``sum_squares``.

    Raises:
        ValueError: on edges and counts of the wrong shape or values, or an unknown key in ``exact``.

    Example::

        >>> histogram_summary([0.0, 1.0, 2.0], [1, 3])
        HistogramSummary(min=0.0, max=2.0, num=4.0, sum=5.0, sum_squares=7.0)
    """
    edges_arr, counts_arr = check_histogram(edges, counts)
    return _summarize_bins(edges_arr, counts_arr, check_exact(exact))


def _summarize_bins(edges_arr: np.ndarray, counts_arr: np.ndarray, known: Mapping[str, float]) -> HistogramSummary:
    """:func:`histogram_summary` of checked float64 bins and checked ``exact`` values (the sinks check once)."""
    nonempty = np.flatnonzero(counts_arr > 0)
    if nonempty.size:
        low, high = float(edges_arr[nonempty[0]]), float(edges_arr[nonempty[-1] + 1])
    else:
        low, high = float(edges_arr[0]), float(edges_arr[-1])
    centres = 0.5 * (edges_arr[:-1] + edges_arr[1:])
    return HistogramSummary(
        min=known.get("min", low),
        max=known.get("max", high),
        num=float(counts_arr.sum()),
        sum=known.get("sum", float(np.dot(centres, counts_arr))),
        sum_squares=known.get("sum_squares", float(np.dot(centres * centres, counts_arr))),
    )


def merge_bins(edges: Any, counts: Any, max_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge runs of adjacent bins so that at most ``max_bins`` remain; totals and outer edges are kept.

    Raises:
        ValueError: on edges and counts of the wrong shape or values, or a ``max_bins`` that is not a positive int.

    Example::

        >>> merge_bins([0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1], max_bins=2)
        (array([0., 3., 5.]), array([3., 2.]))
    """
    edges_arr, counts_arr = check_histogram(edges, counts)
    return _merge_checked_bins(edges_arr, counts_arr, check_positive_int("max_bins", max_bins))


def _merge_checked_bins(edges_arr: np.ndarray, counts_arr: np.ndarray, max_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`merge_bins` of checked float64 bins and a checked ``max_bins``."""
    num_bins = counts_arr.size
    if num_bins <= max_bins:
        return edges_arr, counts_arr
    group = -(-num_bins // max_bins)
    starts = np.arange(0, num_bins, group)
    return np.append(edges_arr[starts], edges_arr[-1]), np.add.reduceat(counts_arr, starts)
